"""Tenant keys, the governance config, the governor (awaited decisions, steps) and the explanation report."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import ValidationError

from serve.audit.service import explanation
from serve.auth import ANONYMOUS, TenantKey, authenticate, hash_key
from serve.context import Context
from serve.errors import Unauthorized
from serve.explain import render_html
from serve.governance.config import GovernanceConfig
from serve.governance.governor import Governor
from serve.policy.schema import AgentFacts, PolicyResult, Principal
from serve.steps import OutcomeStep, ToolCallStep
from serve.testing import MemorySink
from tests.unit.conftest import run

TENANTS = [
    TenantKey(tenant="acme", key_sha256=hash_key("fk-acme"), roles=["hr"]),
    TenantKey(
        tenant="globex", key_sha256=hash_key("fk-globex"), roles=["sre"], scopes=["platform.status.read"]
    ),
]


def test_a_valid_key_is_its_tenants_principal() -> None:
    principal = authenticate("Bearer fk-globex", TENANTS)
    assert (principal.tenant, principal.roles, principal.authenticated) == ("globex", ["sre"], True)
    assert principal.scopes == ["platform.status.read"]
    assert authenticate("bearer  fk-acme ", TENANTS).tenant == "acme"


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Basic fk-acme", "Bearer fk-acmE", "fk-acme"]
)
def test_missing_or_wrong_keys_are_401(header: str | None) -> None:
    with pytest.raises(Unauthorized) as err:
        authenticate(header, TENANTS)
    assert err.value.status == 401
    assert "fk-" not in err.value.message  # the key is never echoed


def test_no_tenants_means_auth_is_off() -> None:
    assert authenticate(None, []) == ANONYMOUS


def test_keys_are_stored_hashed() -> None:
    with pytest.raises(ValidationError, match="key_sha256"):
        TenantKey(tenant="acme", key_sha256="fk-plain-text-key", roles=[])


def test_opa_engine_needs_a_url() -> None:
    with pytest.raises(ValidationError, match="url"):
        GovernanceConfig.model_validate({"engine": {"kind": "opa"}})


def test_explanation_report_and_its_page() -> None:
    decisions = [
        {
            "seq": 8,
            "request_id": "r1",
            "tenant": "acme",
            "agent": "helper",
            "action": "model_output",
            "outcome": "redact",
            "enforced": True,
            "reasons": ["PII redacted: <email>"],
            "policy": "model_output.rego",
            "policy_version": "v",
            "decision_id": "dec_2",
            "prev": "p",
            "hash": "h",
            "time": 2.0,
        },
        {
            "seq": 7,
            "request_id": "r1",
            "tenant": "acme",
            "agent": "boss",
            "action": "call:boss",
            "outcome": "allow",
            "enforced": True,
            "reasons": [],
            "policy": "ingress.rego",
            "policy_version": "v",
            "decision_id": "dec_1",
            "prev": "p",
            "hash": "h",
            "time": 1.0,
        },
    ]
    events = [
        {
            "kind": "model_call",
            "request_id": "r1",
            "tenant": "acme",
            "agent": "boss",
            "turn": 1,
            "prompt_tokens": 5,
            "completion_tokens": 2,
            "tool_calls": 1,
            "finish_reason": "tool_calls",
            "time": 1.1,
        },
        {
            "kind": "delegation",
            "request_id": "r1",
            "tenant": "acme",
            "agent": "boss",
            "target": "helper",
            "time": 1.2,
        },
        {
            "kind": "model_call",
            "request_id": "r1",
            "tenant": "acme",
            "agent": "helper",
            "turn": 1,
            "prompt_tokens": 3,
            "completion_tokens": 4,
            "tool_calls": 0,
            "finish_reason": "stop",
            "time": 1.3,
        },
        {"kind": "outcome", "request_id": "r1", "tenant": "acme", "agent": None, "status": 200, "time": 3.0},
    ]
    report = explanation("r1", decisions, events)
    assert report["agents"] == ["boss", "helper"]
    assert [d["decision_id"] for d in report["decisions"]] == ["dec_1", "dec_2"]
    assert report["usage"] == {"prompt_tokens": 8, "completion_tokens": 6, "cost_usd": "0"}
    assert report["delegations"] == [{"agent": "boss", "target": "helper", "time": 1.2}]
    assert report["outcome"] == {"agent": None, "status": 200, "time": 3.0}
    page = render_html(report)
    assert "dec_2" in page and "&lt;email&gt;" in page and "<email>" not in page  # escaped


class Allowing:
    """An engine that allows after a real wait: the governor must not need an inline answer."""

    def __init__(self) -> None:
        self.asked = 0

    async def evaluate(self, point: str, document: dict[str, Any], encoded: Any = None) -> PolicyResult:
        self.asked += 1
        await asyncio.sleep(0)  # yields to the loop, as a server's answer would
        return PolicyResult(outcome="allow", reasons=["ok"])

    def describe(self, point: str) -> tuple[str, str]:
        return "allowing", "1"


def test_a_decision_is_awaited_and_audited_once_per_engine() -> None:
    enforced, shadow, sink = Allowing(), Allowing(), MemorySink()
    governor = Governor(enforced, (shadow, frozenset({"tool"})), sink, clock=lambda: 7.0)  # type: ignore[arg-type]
    facts = AgentFacts(
        name="clerk", version="1", role="domain", scopes=[], declared_scopes=[], data=[], pii="allow",
        compliance=[], delegates=[],
    )  # fmt: skip
    ctx = Context.new("req_1", Principal(tenant="acme", roles=[], authenticated=True))

    async def decide() -> list[str]:
        tool = await governor.decide("tool", ctx, facts, {"tool": "t"}, "tool:t")
        data = await governor.decide("data", ctx, facts, {"tool": "t"}, "data:t")  # not shadowed
        return [tool.outcome, data.outcome]

    assert run(decide()) == ["allow", "allow"]
    assert (enforced.asked, shadow.asked) == (2, 1)
    assert [(r["action"], r["enforced"]) for r in sink.records] == [
        ("tool:t", True),
        ("tool:t", False),
        ("data:t", True),
    ]


def test_a_step_is_stored_as_its_record_with_the_requests_envelope() -> None:
    sink = MemorySink()
    governor = Governor(Allowing(), None, sink, clock=lambda: 1.23456789)
    ctx = Context.new("req_9", Principal(tenant="acme", roles=[], authenticated=True))
    governor.step(ctx, ToolCallStep("clerk", "lookup", "ok", 0.5))
    governor.step(Context.new("req_10"), OutcomeStep(200, finish_reason="stop"))
    assert sink.events == [
        {"time": 1.234568, "request_id": "req_9", "tenant": "acme", "kind": "tool_call", "agent": "clerk",
         "tool": "lookup", "status": "ok", "duration_s": 0.5, "arguments": None},
        {"time": 1.234568, "request_id": "req_10", "tenant": "anonymous", "kind": "outcome", "agent": None,
         "status": 200, "finish_reason": "stop"},
    ]  # fmt: skip
