"""configs/policies under the real engine: data-driven allow/deny cases for every point."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve.errors import ConfigError
from serve.governance import GovernanceConfig, build_engines
from serve.policy.engine import PolicyFailure, PolicyModule, RegoEngine, load_modules
from serve.policy.schema import POINTS, PolicyInput
from tests.unit.conftest import ROOT

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
    result = engine.evaluate(case["point"], document(case))
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
        engine.evaluate("ingress", {})
    with pytest.raises(PolicyFailure, match="undefined"):
        engine.evaluate("tool", {"ok": False})
    assert engine.evaluate("tool", {"ok": True}).outcome == "allow"


def test_a_decision_of_the_wrong_shape_fails_closed() -> None:
    engine = RegoEngine([PolicyModule("t.rego", 'package fleet.tool\nimport rego.v1\ndecision := "yes"\n')])
    with pytest.raises(PolicyFailure, match="not \\{outcome, reasons\\}"):
        engine.evaluate("tool", {})


def test_conflicting_rules_fail_closed() -> None:
    source = 'package fleet.tool\nimport rego.v1\ndecision := {"outcome": "allow"} if input.a\ndecision := {"outcome": "deny"} if input.b\n'
    engine = RegoEngine([PolicyModule("t.rego", source)])
    with pytest.raises(PolicyFailure, match="evaluation failed"):
        engine.evaluate("tool", {"a": True, "b": True})


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
    assert engine.evaluate("tool", document(case)).outcome == outcome


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
        engine.evaluate("tool", document(case))
