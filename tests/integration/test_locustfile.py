"""The locustfile, headless for a few seconds against the example fleet (scripted)."""

from __future__ import annotations

import csv
import os
import shlex
import subprocess
from pathlib import Path

from tests.integration.conftest import BIN, ROOT, Fleet


def locust(
    fleet: Fleet, out: Path, *args: str, env: dict[str, str] | None = None
) -> dict[str, dict[str, str]]:
    command = [
        str(BIN / "locust"),
        "-f",
        "loadtests/locustfile.py",
        "--headless",
        *args,  # then this test's host and outputs: the last of a repeated flag wins
        "--host",
        fleet.url,
        "--csv",
        str(out / "run"),
        "--html",
        str(out / "report.html"),
        "--only-summary",
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "report.html").stat().st_size > 10_000
    with (out / "run_stats.csv").open() as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def readme_command() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## Load tests and benchmarks") :]
    line = next(x for x in block.splitlines() if x.startswith(".venv/bin/locust"))
    return shlex.split(line)[1:]


def test_readme_command_runs_headless_and_writes_reports(fleet: Fleet, tmp_path: Path) -> None:
    args = readme_command()
    assert args[:2] == ["-f", "loadtests/locustfile.py"] and "--scenario" in args
    # The README's own flags, then a shorter run and this test's output folder (last wins).
    stats = locust(fleet, tmp_path, *args[2:], "-u", "4", "-r", "4", "-t", "6s")
    for name in ("chat", "tools", "delegation", "stream", "stream: time to first token"):
        assert int(stats[name]["Request Count"]) > 0, name
        assert stats[name]["Failure Count"] == "0", name
    assert float(stats["stream: time to first token"]["Median Response Time"]) > 0


def test_step_load_shape_adds_users_in_steps(fleet: Fleet, tmp_path: Path) -> None:
    shape = {
        "FLEET_LOAD_SHAPE": "step",
        "FLEET_STEP_USERS": "2",
        "FLEET_STEP_SECONDS": "2",
        "FLEET_STEPS": "2",
    }
    stats = locust(fleet, tmp_path, "--scenario", "chat", env=shape)
    assert int(stats["chat"]["Request Count"]) > 0 and stats["chat"]["Failure Count"] == "0"
    with (tmp_path / "run_stats_history.csv").open() as f:
        users = {int(row["User Count"]) for row in csv.DictReader(f)}
    assert {2, 4} <= users
