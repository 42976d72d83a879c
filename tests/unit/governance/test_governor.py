"""Tenant keys, the governance config, and the explanation report."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve.audit.service import explanation
from serve.auth import ANONYMOUS, TenantKey, authenticate, hash_key
from serve.errors import Unauthorized
from serve.explain import render_html
from serve.governance.config import GovernanceConfig

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
    assert report["usage"] == {"prompt_tokens": 8, "completion_tokens": 6}
    assert report["delegations"] == [{"agent": "boss", "target": "helper", "time": 1.2}]
    assert report["outcome"] == {"agent": None, "status": 200, "time": 3.0}
    page = render_html(report)
    assert "dec_2" in page and "&lt;email&gt;" in page and "<email>" not in page  # escaped
