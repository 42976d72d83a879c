"""configs/policies under the real engine: data-driven allow/deny cases for every point."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve.auth import ANONYMOUS
from serve.canonical import canonical
from serve.context import Context
from serve.errors import ConfigError, PolicyFailure
from serve.governance.config import GovernanceConfig, build_engines
from serve.governance.governor import Governor
from serve.policy.engine import PolicyModule, RegoEngine, load_modules
from serve.policy.schema import POINTS, AgentFacts, PolicyInput, PolicyResult, Principal, RequestFacts
from serve.testing import MemorySink
from tests.unit.conftest import ROOT, run

CASES: list[dict[str, Any]] = yaml.safe_load((ROOT / "tests/policies/cases.yaml").read_text())

BASE: dict[str, Any] = {
    "version": "fleet.policy/v1",
    "request": {"id": "req_case", "chain": ["orchestrator"]},
    "principal": {"tenant": "acme", "roles": ["employee"], "authenticated": True},
    "agent": {
        "name": "orchestrator",
        "version": "1.0.0",
        "role": "orchestration",
        "scopes": ["hr.handbook.read", "hr.leave.read"],
        "declared_scopes": ["hr.handbook.read", "hr.leave.read"],
        "data": ["internal", "pii"],
        "pii": "redact",
        "compliance": [],
        "delegates": ["hr-policy-advisor"],
    },
}


@pytest.fixture(scope="module")
def engine() -> Any:
    enforced, _ = build_engines(GovernanceConfig(), ROOT)
    return enforced


def document(case: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    for part in ("principal", "agent", "request"):
        doc[part].update(case.get(part, {}))
    doc.update(point=case["point"], action=case["action"])
    return PolicyInput.model_validate(doc).model_dump(mode="json")  # the documented schema


def test_every_point_has_allow_and_deny_cases() -> None:
    for point in POINTS:
        outcomes = {c["expect"] for c in CASES if c["point"] == point}
        assert {"allow", "deny"} <= outcomes, point


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_policy_case(engine: Any, case: dict[str, Any]) -> None:
    if "data" in case:  # the case's own policy data, over configs/policies/access.yaml's
        merged = yaml.safe_load((ROOT / "configs/policies/access.yaml").read_text()) | case["data"]
        engine = RegoEngine(load_modules([ROOT / "configs/policies"]), {"config": merged})
    result = run(engine.evaluate(case["point"], document(case)))
    assert result.outcome == case["expect"], result.reasons
    if "reason" in case:
        assert any(case["reason"] in r for r in result.reasons), result.reasons


def test_bad_rego_fails_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "tool.rego"
    bad.write_text("package fleet.tool\n\nimport rego.v1\n\ndecision := {\n  input.a ==\n}\n")
    with pytest.raises(ConfigError) as err:
        build_engines(GovernanceConfig(policies=[str(bad)]), ROOT)
    assert err.value.file == str(bad)
    assert str(err.value).startswith(f"{bad}: line 6, column")


def test_missing_point_and_undefined_results_fail_closed() -> None:
    engine = RegoEngine(
        [
            PolicyModule(
                "t.rego", 'package fleet.tool\nimport rego.v1\ndecision := {"outcome": "allow"} if input.ok\n'
            )
        ]
    )
    with pytest.raises(PolicyFailure, match=r"no policy defines data\.fleet\.ingress"):
        run(engine.evaluate("ingress", {}))
    with pytest.raises(PolicyFailure, match="undefined"):
        run(engine.evaluate("tool", {"ok": False}))
    assert run(engine.evaluate("tool", {"ok": True})).outcome == "allow"


def test_a_decision_of_the_wrong_shape_fails_closed() -> None:
    engine = RegoEngine([PolicyModule("t.rego", 'package fleet.tool\nimport rego.v1\ndecision := "yes"\n')])
    with pytest.raises(PolicyFailure, match="not \\{outcome, reasons\\}"):
        run(engine.evaluate("tool", {}))


def test_conflicting_rules_fail_closed() -> None:
    source = 'package fleet.tool\nimport rego.v1\ndecision := {"outcome": "allow"} if input.a\ndecision := {"outcome": "deny"} if input.b\n'
    engine = RegoEngine([PolicyModule("t.rego", source)])
    with pytest.raises(PolicyFailure, match="evaluation failed"):
        run(engine.evaluate("tool", {"a": True, "b": True}))


def test_policy_version_is_the_module_digest(engine: Any) -> None:
    policy, version = engine.describe("tool")
    source = (ROOT / "configs/policies/tool.rego").read_text()
    assert (policy, version) == ("tool.rego", PolicyModule("x", source).version)


def test_policy_input_schema_file_is_current() -> None:
    import json

    from serve.policy.schema import policy_input_json_schema

    committed = json.loads((ROOT / "docs/policy-input.schema.json").read_text())
    assert committed == policy_input_json_schema()


@pytest.mark.parametrize(
    ("arguments", "outcome"),
    [({"a": 5}, "allow"), ({"a": -5}, "deny"), ({"a": "-5"}, "deny"), ({"a": 50}, "deny"), ({}, "allow")],
)
def test_numeric_bounds_from_policy_data(arguments: dict[str, Any], outcome: str) -> None:
    data = {"config": {"roles": {}, "tools": {"add": {"a": {"min": 0, "max": 10}}}}}
    engine = RegoEngine(load_modules([ROOT / "configs/policies"]), data)
    case = {
        "point": "tool",
        "action": {
            "known": True,
            "tool": "add",
            "scope": "hr.leave.read",
            "approval": False,
            "arguments": arguments,
        },
    }
    assert run(engine.evaluate("tool", document(case))).outcome == outcome


@pytest.mark.parametrize("value", ["E1001\x00../../etc", 2**64 + 5])
def test_values_the_engine_cannot_represent_fail_closed(value: Any) -> None:
    engine, _ = build_engines(GovernanceConfig(), ROOT)
    case = {
        "point": "tool",
        "action": {
            "known": True,
            "tool": "leave_balance",
            "scope": "hr.leave.read",
            "approval": False,
            "arguments": {"employee_id": value},
        },
    }
    with pytest.raises(PolicyFailure):
        run(engine.evaluate("tool", document(case)))


class Capturing:
    """An engine that answers allow and keeps what it was asked."""

    def __init__(self) -> None:
        self.asked: list[tuple[dict[str, Any], Any]] = []

    async def evaluate(self, point: str, document: dict[str, Any], encoded: Any = None) -> PolicyResult:
        self.asked.append((document, encoded))
        return PolicyResult(outcome="allow")

    def describe(self, point: str) -> tuple[str, str]:
        return "capturing", "1"


ACTIONS: list[tuple[str, dict[str, Any]]] = [
    ("ingress", {"agent": "orchestrator"}),
    ("model_input", {"pii": ["email"], "turn": 2}),
    ("tool", {"known": True, "tool": "t", "scope": None, "approval": False, "arguments": {"q": "Zoë ✓", "n": 1.5}}),
    ("delegation", {"target": "hr-policy-advisor", "target_scopes": []}),
    ("memory", {"operation": "read", "store": "facts", "namespace": None}),
    ("tool", {"known": True, "tool": "t", "scope": None, "approval": False, "arguments": {"n": float("nan"), "m": [float("-inf")]}}),
    ("data", {"tool": "t", "classes": {"internal"}, "pii": []}),  # a set: not JSON, dumped as a list
]  # fmt: skip


@pytest.mark.parametrize(("point", "action"), ACTIONS)
@pytest.mark.parametrize(
    "principal", [None, Principal(tenant="acmé", roles=["r"], authenticated=True, scopes=["a"])]
)
def test_a_decision_asks_with_the_documented_input_and_its_canonical_encoding(
    point: Any, action: dict[str, Any], principal: Principal | None
) -> None:
    """The governor builds the input as a dict and its canonical JSON from parts (once per
    principal and agent): both must be what the schema's model and ``canonical`` give."""
    engine, sink = Capturing(), MemorySink()
    facts = AgentFacts.model_validate(BASE["agent"])
    ctx = Context.new("req_ü1", principal).enter("orchestrator").enter("hr-policy-advisor")
    governor = Governor(engine, None, sink)
    for _ in range(2):  # the second decision reuses the encoded principal and agent
        run(governor.decide(point, ctx, facts, action, "label"))
    expected = PolicyInput(
        point=point,
        request=RequestFacts(id=ctx.request_id, chain=list(ctx.chain)),
        principal=principal or ANONYMOUS,
        agent=facts,
        action=action,
    ).model_dump(mode="json")
    without_id = {**expected, "request": {"chain": list(ctx.chain)}}
    for document, encoded in engine.asked:
        assert document == expected
        assert encoded.whole == canonical(expected)
        assert encoded.without_request_id == canonical(without_id)
    assert [r["input_sha256"] for r in sink.records] == [hashlib.sha256(canonical(expected)).hexdigest()] * 2


def test_the_memo_answers_a_repeated_input_of_another_request_and_keys_on_the_id_if_read() -> None:
    modules = load_modules([ROOT / "configs/policies"])
    memo = RegoEngine(modules)
    sink = MemorySink()
    governor = Governor(memo, None, sink)
    facts = AgentFacts.model_validate(BASE["agent"])
    action = {"target": "hr-policy-advisor", "target_scopes": []}
    for request_id in ("req_1", "req_2"):
        run(governor.decide("delegation", Context.new(request_id).enter("orchestrator"), facts, action, "d"))
    assert memo._memo is not None and len(memo._memo) == 1  # one entry serves both requests
    reading = RegoEngine(
        [*modules, PolicyModule("extra.rego", "package fleet.extra\nseen := input.request.id\n")]
    )
    governor = Governor(reading, None, sink)
    for request_id in ("req_1", "req_2"):
        run(governor.decide("delegation", Context.new(request_id).enter("orchestrator"), facts, action, "d"))
    assert reading._memo is not None and len(reading._memo) == 2  # a module reads the id: keyed on it
    fresh = Governor(RegoEngine(modules, memo=False), None, MemorySink())
    expected = run(fresh.decide("delegation", Context.new("req_3").enter("orchestrator"), facts, action, "d"))
    assert [(r["outcome"], r["reasons"]) for r in sink.records] == [(expected.outcome, expected.reasons)] * 4
