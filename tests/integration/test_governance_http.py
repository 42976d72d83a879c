"""Governance over HTTP on a real Ray: keys, policy denials, PII, audit, explain, shadow mode.

The test application (fleet-test.yaml) runs the real Rego policies in configs/policies
plus tests/integration/policies, with three tenant keys and a shadow tool policy.
"""

from __future__ import annotations

import concurrent.futures
import json
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from serve.audit.log import audit_key, verify
from tests.integration.agents.tester.tools import PROFILE
from tests.integration.conftest import ACME_KEY, LIMITED_KEY, QA_KEY, Fleet

CANARIES = ["dana.canary@example.org", "219-09-9999", "4000 0566 5566 5556"]
PROMPT_CANARY = "reach me at prompt.canary@example.net or 078-05-1120"


def chat(fleet: Fleet, text: str, key: str | None = QA_KEY, **extra: Any) -> httpx.Response:
    body = {"model": "tester", "messages": [{"role": "user", "content": text}], **extra}
    with fleet.client(fleet.test_url, key) as client:
        return client.post("/v1/chat/completions", json=body)


def records(fleet: Fleet, request_id: str) -> list[dict[str, Any]]:
    lines = fleet.audit_log.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["request_id"] == request_id]


def explain(fleet: Fleet, request_id: str, key: str = QA_KEY, **params: str) -> httpx.Response:
    with fleet.client(fleet.test_url, key) as client:
        return client.get(f"/v1/requests/{request_id}/explain", params=params)


@pytest.mark.parametrize("key", [None, "fk-wrong"])
def test_missing_or_wrong_key_is_401(fleet: Fleet, key: str | None) -> None:
    r = chat(fleet, "hello", key)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"


def test_principal_not_allowed_to_call_the_agent_is_403_with_a_decision_id(fleet: Fleet) -> None:
    r = chat(fleet, "hello", ACME_KEY)
    assert r.status_code == 403
    error = r.json()["error"]
    assert error["code"] == "policy_denied" and error["param"] == "model"
    assert error["decision_id"] == r.headers["x-fleet-decision-id"]
    [record] = records(fleet, r.headers["x-fleet-request-id"])
    assert (record["decision_id"], record["outcome"], record["tenant"]) == (
        error["decision_id"],
        "deny",
        "acme",
    )


def test_forbidden_tool_is_denied_audited_and_the_request_still_answered(fleet: Fleet) -> None:
    r = chat(fleet, "#unknown")  # the model calls launch_missiles, which tester does not have
    assert r.status_code == 200
    content = r.json()["choices"][0]["message"]["content"]
    assert "the call to 'launch_missiles' was denied by policy" in content
    assert r.json()["fleet"]["policy_denials"] == 1
    denied = [
        x for x in records(fleet, r.headers["x-fleet-request-id"]) if x["action"] == "tool:launch_missiles"
    ]
    assert [(x["outcome"], x["enforced"]) for x in denied] == [("deny", True), ("allow", False)]
    assert denied[0]["decision_id"] in content


def test_tool_beyond_the_keys_scopes_is_denied(fleet: Fleet) -> None:
    r = chat(fleet, "#echo hi", LIMITED_KEY)
    assert r.status_code == 200
    assert "scope test.run is not granted to tester" in r.json()["choices"][0]["message"]["content"]


def test_argument_constraint_from_policy_data(fleet: Fleet) -> None:
    r = chat(fleet, "#bigadd")
    assert "argument a exceeds 1000" in r.json()["choices"][0]["message"]["content"]


def test_forbidden_delegation_is_denied_and_audited(fleet: Fleet) -> None:
    r = chat(fleet, "#stranger")
    assert r.status_code == 200
    assert "the delegation to 'relay' was denied by policy" in r.json()["choices"][0]["message"]["content"]
    [record] = [x for x in records(fleet, r.headers["x-fleet-request-id"]) if x["action"] == "delegate:relay"]
    assert record["outcome"] == "deny" and record["policy"] == "delegation.rego"


@pytest.mark.parametrize("stream", [False, True])
def test_pii_is_redacted_in_answers_and_absent_from_logs_and_audit(fleet: Fleet, stream: bool) -> None:
    r = chat(fleet, f"#profile {PROMPT_CANARY}", stream=stream)
    assert r.status_code == 200
    answer = r.text
    assert "Dana Canary" in PROFILE and "[REDACTED:email]" in answer and "[REDACTED:ssn]" in answer
    for canary in [*CANARIES, "prompt.canary@example.net", "078-05-1120"]:
        assert canary not in answer
        for path in _readable_files(fleet):
            assert canary not in path.read_text(errors="replace"), f"{canary} leaked into {path}"


def _readable_files(fleet: Fleet) -> list[Path]:
    logs = [
        p for p in fleet.logs_dir.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt")
    ]
    audit = [p for p in fleet.audit_log.parent.iterdir() if p.is_file() and not p.name.endswith(".key")]
    spans = [fleet.spans] if fleet.spans is not None and fleet.spans.exists() else []
    return logs + audit + spans


def test_shadow_policy_is_audited_not_enforced(fleet: Fleet) -> None:
    r = chat(fleet, "#multiply")
    assert r.json()["choices"][0]["message"]["content"] == "product: 42"
    tool = [x for x in records(fleet, r.headers["x-fleet-request-id"]) if x["action"] == "tool:multiply"]
    assert [(x["outcome"], x["enforced"], x["reasons"]) for x in tool] == [
        ("allow", True, ["tool scope held"]),
        ("deny", False, ["v2: multiply is retired"]),
    ]


def test_explain_report_as_json_and_html(fleet: Fleet) -> None:
    r = chat(fleet, "#delegate now")
    request_id = r.headers["x-fleet-request-id"]
    report = explain(fleet, request_id).json()
    assert report["agents"] == ["tester", "helper"]
    assert [m["agent"] for m in report["model_calls"]] == ["tester", "helper", "tester"]
    assert (
        report["usage"]["completion_tokens"] == sum(m["completion_tokens"] for m in report["model_calls"]) > 0
    )
    assert [(t["tool"], t["status"]) for t in report["tool_calls"]] == [("delegate_to_helper", "ok")]
    assert [d["target"] for d in report["delegations"]] == ["helper"]
    actions = [d["action"] for d in report["decisions"] if d["enforced"]]
    assert actions[0] == "call:tester" and "delegate:helper" in actions and "model_input" in actions
    assert all(d["reasons"] or d["outcome"] == "allow" for d in report["decisions"])
    assert report["outcome"]["status"] == 200
    page = explain(fleet, request_id, format="html")
    assert page.headers["content-type"].startswith("text/html")
    assert request_id in page.text and "delegate:helper" in page.text
    assert explain(fleet, request_id, ACME_KEY).status_code == 404  # another tenant's request
    assert explain(fleet, "req_nope").status_code == 404


def test_concurrent_requests_write_one_record_per_decision_and_the_chain_verifies(fleet: Fleet) -> None:
    reference = chat(fleet, "#echo one")
    per_request = len(records(fleet, reference.headers["x-fleet-request-id"]))
    assert per_request == 7  # ingress, model in, tool (+shadow), data, model in, model out

    def one(i: int) -> str:
        r = chat(fleet, f"#echo n{i}")
        assert r.status_code == 200
        return r.headers["x-fleet-request-id"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(one, range(48)))
    lines = [json.loads(line) for line in fleet.audit_log.read_text().splitlines()]
    counts = Counter(r["request_id"] for r in lines)
    assert {counts[i] for i in ids} == {per_request}
    # Each record once: a decision by its id, another record (an approval step) by its own.
    assert len({r.get("decision_id") or r["record_id"] for r in lines}) == len(lines)
    report = verify(fleet.audit_log, audit_key(fleet.audit_log))
    assert report.ok, report
