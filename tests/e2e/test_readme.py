"""The README, run as a user would: `make up`, its curl and Python examples, `make down`."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _block(lang: str, after: str) -> str:
    start = README.index(after)
    match = re.search(rf"```{lang}\n(.*?)```", README[start:], re.S)
    assert match, f"no {lang} block after {after!r}"
    return match.group(1)


@pytest.fixture(scope="module")
def fleet_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("e2e") / "make-up.log"
    commands = _block("bash", "## Two commands on a fresh machine")
    up = next(line.split("#")[0].strip() for line in commands.splitlines() if line.startswith("make up"))
    try:
        with log.open("w") as out:
            done = subprocess.run(
                up, shell=True, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=1500
            )
        text = log.read_text()
        assert done.returncode == 0, text[-3000:]
        assert "Fleet is up: http://127.0.0.1:8000/v1" in text
        yield text
    finally:
        subprocess.run("make down", shell=True, cwd=ROOT, capture_output=True, timeout=300)


def test_make_up_shows_progress(fleet_up: str) -> None:
    assert "Deploying configs/local.yaml (serve deploy)" in fleet_up
    assert "fleet: RUNNING" in fleet_up


def test_readme_curl_examples_answer(fleet_up: str) -> None:
    block = _block("bash", "## Talk to the fleet")
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.startswith("curl")]
    models = json.loads(
        subprocess.run(commands[0], shell=True, capture_output=True, text=True, check=True).stdout
    )
    assert "orchestrator" in {m["id"] for m in models["data"]}
    chat = json.loads(
        subprocess.run(commands[1], shell=True, capture_output=True, text=True, check=True).stdout
    )
    assert '"remaining_days": 14' in chat["choices"][0]["message"]["content"]


def test_readme_python_example_runs(fleet_up: str, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(_block("python", "## Talk to the fleet"), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'orchestrator'" in printed and '"order_now": true' in printed
    assert "Carry-over of leave" in printed and "total_tokens" in printed
