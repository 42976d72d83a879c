"""The README, run as a user would: `make up`, its curl and Python examples, `make down`."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.e2e.conftest import BASE_URL, ROOT, readme_block


def test_make_up_shows_progress(fleet_up: str) -> None:
    assert "preparing the embedded model" in fleet_up
    assert "Deploying configs/local.yaml (serve deploy)" in fleet_up
    assert "fleet: RUNNING" in fleet_up


def test_readme_curl_examples_answer(fleet_up: str) -> None:
    block = readme_block("bash", "## Talk to the fleet")
    commands = [c for c in block.replace("\\\n", " ").splitlines() if c.startswith("curl")]
    models = json.loads(
        subprocess.run(commands[0], shell=True, capture_output=True, text=True, check=True).stdout
    )
    assert {m["id"] for m in models["data"]} >= {"orchestrator", "hr-policy-advisor"}
    chat = json.loads(
        subprocess.run(commands[1], shell=True, capture_output=True, text=True, check=True).stdout
    )
    assert "Paris" in chat["choices"][0]["message"]["content"]
    routed = json.loads(
        subprocess.run(commands[2], shell=True, capture_output=True, text=True, check=True).stdout
    )
    # routed by words to HR, whose reply is the answer: the orchestrator's model is not called
    assert routed["fleet"]["delegations"] == ["hr-policy-advisor"] and routed["fleet"]["turns"] == 0
    assert routed["choices"][0]["message"]["content"].strip()


def test_readme_python_example_runs(fleet_up: str, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(readme_block("python", "## Talk to the fleet"), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "'orchestrator'" in printed and "Paris" in printed and "total_tokens" in printed


def test_readme_governance_commands(fleet_up: str) -> None:
    block = readme_block("bash", "## Governance").replace("\\\n", " ")
    script = "set -euo pipefail\n" + block + 'echo "request=$REQUEST_ID"\n'
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "key_sha256:" in done.stdout and "API key (shown once" in done.stderr
    start = done.stdout.index('{"object":"request.explanation"')
    explanation, _ = json.JSONDecoder().raw_decode(done.stdout[start:])  # curl adds no newline
    assert explanation["agents"] == ["hr-policy-advisor"]
    assert explanation["decisions"][0]["action"] == "call:hr-policy-advisor"
    assert explanation["model_calls"][0]["completion_tokens"] > 0
    assert "chain and checkpoint intact" in done.stdout


def test_readme_observability_commands(fleet_up: str) -> None:
    generate, scrape = readme_block("bash", "## Observability").strip().splitlines()
    done = subprocess.run(["bash", "-c", generate], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert subprocess.run(["git", "diff", "--quiet", "configs/"], cwd=ROOT).returncode == 0  # already current
    deadline = time.monotonic() + 60  # Ray's metrics agent exports every few seconds
    while True:
        done = subprocess.run(["bash", "-c", scrape], cwd=ROOT, capture_output=True, text=True, timeout=60)
        if 'agent="orchestrator"' in done.stdout or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert 'agent="orchestrator"' in done.stdout and 'status="200"' in done.stdout


def test_readme_memory_commands(fleet_up: str) -> None:
    """Two turns of one session on the real engine: the second prompt holds the first turn."""
    session = f"e2e-{time.time_ns()}"  # not the README's demo-1: earlier runs kept that one
    commands = readme_block("bash", "## Memory").replace("\\\n", " ").replace("demo-1", session)
    first, second = (
        json.loads(subprocess.run(c, shell=True, capture_output=True, text=True, check=True).stdout)
        for c in commands.strip().splitlines()
    )
    assert second["fleet"]["session_id"] == session
    alone = commands.strip().splitlines()[1].replace(f"-H 'x-fleet-session-id: {session}' ", "")
    without = json.loads(subprocess.run(alone, shell=True, capture_output=True, text=True, check=True).stdout)
    assert without["fleet"]["session_id"] is None

    def first_prompt(reply: dict[str, object]) -> int:
        request_id = reply["fleet"]["request_id"]  # type: ignore[index]
        url = f"{BASE_URL}/v1/requests/{request_id}/explain"
        report = json.loads(subprocess.run(["curl", "-s", url], capture_output=True, text=True).stdout)
        return int(report["model_calls"][0]["prompt_tokens"])

    # The same question, with the session's first turn (question and answer) before it.
    assert first["choices"][0]["message"]["content"]
    assert first_prompt(second) >= first_prompt(without) + 8


def test_readme_approval_commands(fleet_up: str, up_env: dict[str, str]) -> None:
    """The README's approval walk-through on the real engine: the forced call parks, the
    operator approves it through Ray, the turn resumes and the tool runs once."""
    block = readme_block("bash", "### Human approval").replace("\\\n", " ")
    script = "set -euo pipefail\n" + block + 'echo "approval=$APPROVAL"\n'
    # As a user's shell runs it: make exports RAY_AUTH_MODE, a shell does not.
    shell = {k: v for k, v in up_env.items() if k != "RAY_AUTH_MODE"}
    done = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=shell, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    approval_id = done.stdout.rsplit("approval=", 1)[1].strip()
    assert approval_id.startswith("apr_") and approval_id in done.stdout  # listed, shown, approved
    assert "request_leave" in done.stdout
    start = done.stdout.index('{"object":"approval"')
    final, _ = json.JSONDecoder().raw_decode(done.stdout[start:])
    assert final["status"] == "completed", final
    assert final["decision"] == {
        **final["decision"],
        "outcome": "approved",
        "by": "operator",
        "reason": "manager agreed",
    }
    completion = final["result"]["completion"]
    assert completion["object"] == "chat.completion" and completion["choices"][0]["finish_reason"] in (
        "stop",
        "length",
    )
    report = json.loads(
        subprocess.run(
            ["curl", "-s", f"{BASE_URL}/v1/requests/{final['request_id']}/explain"],
            capture_output=True,
            text=True,
        ).stdout
    )
    steps = [a["event"] for a in report["approvals"]]
    assert steps[:2] == ["requested", "approved"] and "ran" in steps and steps[-1] == "completed", steps
    ran = [t for t in report["tool_calls"] if t["tool"] == "request_leave"]
    assert [t["status"] for t in ran] == ["escalated", "ok"], ran
