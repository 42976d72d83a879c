"""`fleet eval --config`: a fleet of its own, on a local Ray cluster this package's one
test starts through the CLI and the CLI stops, leaving the checkout's state alone.

A package of its own: its cluster must not meet another package's (one per package)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _checkout_audit() -> str:
    logs = (ROOT / "var" / "audit").glob("*.jsonl*")
    return "".join(p.read_text(errors="replace") for p in logs if p.is_file())


def test_an_agents_suites_on_a_scripted_fleet_of_their_own(tmp_path: Path) -> None:
    results = tmp_path / "hr.json"
    scratch = set(Path(tempfile.gettempdir()).glob("fleet-eval-*"))
    done = subprocess.run(
        [
            str(BIN / "fleet"),
            "eval",
            "hr-policy-advisor",
            "--config",
            "configs/scripted.yaml",
            "--output",
            str(results),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    body = json.loads(results.read_text())
    assert body["passed"] and set(body["agents"]) == {"hr-policy-advisor"}
    assert body["target"].startswith("http://127.0.0.1:") and len(body["cases"]) >= 25
    assert "starting a local fleet from configs/scripted.yaml" in done.stderr
    # The scripts were played (a safety case saw its model attempt the call it forbids).
    assert "scripted attempt was not seen" not in done.stdout
    # Its folder (Ray's logs, its state) is gone with its cluster.
    assert set(Path(tempfile.gettempdir()).glob("fleet-eval-*")) == scratch and "kept in" not in done.stderr
    # Its audit log (and memory, ledger, approvals) lived in that folder, not in var/.
    audited = _checkout_audit()
    assert not any(rid in audited for case in body["cases"] for rid in case["request_ids"])
