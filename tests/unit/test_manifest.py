"""serve.manifest: agent.yaml validation, prompt templates, fleets and the JSON Schema."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator

from serve.errors import ConfigError
from serve.manifest import (
    AgentSpec,
    delegate_tool_name,
    delegation_order,
    load_agent,
    load_fleet,
    manifest_json_schema,
)
from tests.unit.conftest import AGENTS, DROP, EXAMPLE_AGENTS, write_agent

# --- the example agents -------------------------------------------------------------


@pytest.mark.parametrize("name", EXAMPLE_AGENTS)
def test_example_manifest_loads(name: str) -> None:
    spec = load_agent(AGENTS / name)
    assert isinstance(spec, AgentSpec)
    assert spec.manifest.name == name
    assert spec.manifest.api_version == "fleet/v1"
    assert spec.folder == AGENTS / name
    assert spec.prompt_source == (AGENTS / name / "prompt.md").read_text(encoding="utf-8")


def test_example_manifest_values() -> None:
    m = load_agent(AGENTS / "hr-policy-advisor").manifest
    assert m.role == "domain"
    assert m.owner.team == "People Operations"
    assert [(t.name, t.scope, t.timeout_s, t.approval) for t in m.tools] == [
        ("search_handbook", "hr.handbook.read", 5.0, False),
        ("leave_balance", "hr.leave.read", 5.0, False),
        ("request_leave", "hr.leave.write", 5.0, True),
    ]
    assert m.prompt.variables["company"].default == "Acme Corp"
    assert str(m.policies.cost.per_request_usd) == "0.05"
    assert m.max_turns == 4
    # Ray's autoscaling_config: max_ongoing_requests goes to the deployment, unset keys are left out.
    assert m.autoscaling.ray_config() == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 4.0,
        "upscale_delay_s": 10.0,
        "downscale_delay_s": 300.0,
    }
    assert m.autoscaling.max_ongoing_requests == 32


def test_manifest_defaults(tmp_path: Path) -> None:
    m = load_agent(write_agent(tmp_path, "minimal")).manifest
    assert m.model.backend == "default"
    assert m.tools == [] and m.delegates == [] and m.scopes == []
    assert m.max_turns == 6
    assert m.policies.pii == "redact"
    assert (m.autoscaling.min_replicas, m.autoscaling.max_replicas) == (1, 1)
    assert m.autoscaling.max_queued_requests is None  # deployed as max_ongoing_requests (serve.placement)


def test_example_fleet_loads_in_delegation_order() -> None:
    specs = load_fleet(AGENTS, EXAMPLE_AGENTS)
    assert list(specs) == EXAMPLE_AGENTS
    order = delegation_order(specs)
    assert sorted(order) == sorted(EXAMPLE_AGENTS)
    assert order[-1] == "orchestrator"  # every delegate is deployed before its caller


def test_delegate_tool_name() -> None:
    assert delegate_tool_name("hr-policy-advisor") == "delegate_to_hr_policy_advisor"


# --- broken manifests ---------------------------------------------------------------

BROKEN: list[tuple[str, dict[str, Any], str, str]] = [
    ("unknown-key", {"colour": "blue"}, "colour", "Extra inputs are not permitted"),
    ("missing-sla", {"sla": DROP}, "sla", "Field required"),
    (
        "bad-role",
        {"role": "boss"},
        "role",
        "Input should be 'orchestration', 'domain' or 'infrastructure'",
    ),
    (
        "min-above-max",
        {"autoscaling": {"min_replicas": 5, "max_replicas": 2}},
        "autoscaling",
        "min_replicas must not exceed max_replicas",
    ),
    (
        "initial-out-of-bounds",
        {"autoscaling": {"min_replicas": 1, "max_replicas": 3, "initial_replicas": 5}},
        "autoscaling",
        "initial_replicas must lie between min_replicas and max_replicas",
    ),
    (
        "empty-queue",
        {"autoscaling": {"max_queued_requests": 0}},
        "autoscaling.max_queued_requests",
        "Input should be greater than or equal to 1",
    ),
    (
        "unbounded-queue",  # Ray's -1: Fleet's queues are bounded
        {"autoscaling": {"max_queued_requests": -1}},
        "autoscaling.max_queued_requests",
        "Input should be greater than or equal to 1",
    ),
    ("bad-api-version", {"apiVersion": "fleet/v2"}, "apiVersion", "Input should be 'fleet/v1'"),
    ("bad-version", {"version": "1.0"}, "version", "String should match pattern"),
    ("zero-turns", {"max_turns": 0}, "max_turns", "Input should be greater than or equal to 1"),
    ("bad-delegate-name", {"delegates": ["Bad_Name"]}, "delegates[0]", "String should match pattern"),
    ("owner-without-contact", {"owner": {"team": "QA"}}, "owner.contact", "Field required"),
    ("unknown-data-class", {"data": ["secret"]}, "data[0]", "Input should be 'public'"),
    (
        "bad-kpi-direction",
        {"kpis": [{"name": "k", "target": 1, "direction": "up"}]},
        "kpis[0].direction",
        "Input should be 'higher' or 'lower'",
    ),
    (
        "zero-timeout",
        {
            "tools": [{"name": "a", "scope": "s"}, {"name": "b", "scope": "s", "timeout_s": 0}],
            "scopes": ["s"],
        },
        "tools[1].timeout_s",
        "Input should be greater than 0",
    ),
    (
        "variable-not-identifier",
        {"prompt": {"template": "prompt.md", "variables": {"bad-name": {}}}},
        "prompt.variables",
        "variable name 'bad-name' is not an identifier",
    ),
]


@pytest.mark.parametrize(("name", "changes", "field", "message"), BROKEN, ids=[case[0] for case in BROKEN])
def test_broken_manifest_names_file_and_field(
    tmp_path: Path, name: str, changes: dict[str, Any], field: str, message: str
) -> None:
    folder = write_agent(tmp_path, name, **changes)
    manifest = str(folder / "agent.yaml")
    with pytest.raises(ConfigError) as info:
        load_agent(folder)
    assert info.value.file == manifest
    assert info.value.field == field
    assert str(info.value).startswith(f"{manifest}: {field}: ")
    assert message in str(info.value)


CROSS_FIELD: list[tuple[str, dict[str, Any], str]] = [
    (
        "scope-not-granted",
        {"tools": [{"name": "lookup", "scope": "hr.leave.read"}], "scopes": ["hr.handbook.read"]},
        "tools[0].scope: 'hr.leave.read' is not among the agent's scopes",
    ),
    ("self-delegation", {"delegates": ["selfish"]}, "delegates: an agent cannot delegate to itself"),
    ("duplicate-delegates", {"delegates": ["x", "x"]}, "delegates: duplicate entries"),
    (
        "duplicate-tools",
        {"tools": [{"name": "a", "scope": "s"}, {"name": "a", "scope": "s"}], "scopes": ["s"]},
        "tools: duplicate tool names ['a']",
    ),
    (
        "reserved-tool-name",
        {"tools": [{"name": "delegate_to_helper", "scope": "s"}], "scopes": ["s"], "delegates": ["helper"]},
        "tools: name 'delegate_to_helper' is reserved",
    ),
]


@pytest.mark.parametrize(("name", "changes", "message"), CROSS_FIELD, ids=[c[0] for c in CROSS_FIELD])
def test_cross_field_errors_name_file_and_field(
    tmp_path: Path, name: str, changes: dict[str, Any], message: str
) -> None:
    folder = write_agent(tmp_path, "selfish" if name == "self-delegation" else name, **changes)
    manifest = str(folder / "agent.yaml")
    with pytest.raises(ConfigError) as info:
        load_agent(folder)
    assert info.value.file == manifest
    assert str(info.value).startswith(f"{manifest}: ")
    assert message in str(info.value)


ROUTES = {"delegates": ["helper", "other"]}
ROUTING_BROKEN: list[tuple[str, dict[str, Any], str, str]] = [
    ("no-delegates", {"routing": {}}, "routing", "needs delegates to route to"),
    (
        "one-turn-to-choose",
        {**ROUTES, "routing": {"mode": "choose"}, "max_turns": 1},
        "max_turns",
        "`mode: choose` needs 2 at least",
    ),
    (
        "none-is-a-delegate",
        {"delegates": ["none"], "routing": {}},
        "routing.direct",
        "'none' is a delegate's name",
    ),
    (
        "describes-a-stranger",
        {**ROUTES, "routing": {"descriptions": {"stranger": "x"}}},
        "routing.descriptions.stranger",
        "not among the delegates",
    ),
    (
        "example-to-a-stranger",
        {
            **ROUTES,
            "routing": {"examples": [{"question": "q", "route": "helper"}, {"question": "q", "route": "x"}]},
        },
        "routing.examples[1].route",
        "'x' is not one of ['helper', 'other', 'none']",
    ),
    (
        "none-without-direct",
        {**ROUTES, "routing": {"direct": False, "examples": [{"question": "hello", "route": "none"}]}},
        "routing.examples[0].route",
        "is not one of ['helper', 'other']",
    ),
    (
        "unknown-mode",
        {**ROUTES, "routing": {"mode": "guess"}},
        "routing.mode",
        "Input should be 'match' or 'choose'",
    ),
    (
        "unknown-key",
        {**ROUTES, "routing": {"labels": {}}},
        "routing.labels",
        "Extra inputs are not permitted",
    ),
    (
        "empty-question",
        {**ROUTES, "routing": {"examples": [{"question": "", "route": "helper"}]}},
        "routing.examples[0].question",
        "at least 1 character",
    ),
]


@pytest.mark.parametrize(
    ("name", "changes", "field", "message"), ROUTING_BROKEN, ids=[c[0] for c in ROUTING_BROKEN]
)
def test_a_routing_that_cannot_work_names_file_and_field(
    tmp_path: Path, name: str, changes: dict[str, Any], field: str, message: str
) -> None:
    folder = write_agent(tmp_path, name, **changes)
    with pytest.raises(ConfigError) as info:
        load_agent(folder)
    assert (info.value.file, info.value.field) == (str(folder / "agent.yaml"), field)
    assert message in str(info.value)


def test_routing_by_words_with_a_handoff_is_the_default_and_needs_one_turn(tmp_path: Path) -> None:
    routing = load_agent(write_agent(tmp_path, "router", **ROUTES, routing={}, max_turns=1)).manifest.routing
    assert routing is not None
    assert (routing.mode, routing.answer, routing.direct, routing.examples) == ("match", "delegate", True, [])
    assert load_agent(write_agent(tmp_path, "plain", **ROUTES)).manifest.routing is None


def test_the_orchestrator_routes_by_words_with_examples_for_every_route() -> None:
    manifest = load_agent(AGENTS / "orchestrator").manifest
    routing = manifest.routing
    assert routing is not None and routing.mode == "match" and routing.direct
    assert set(routing.descriptions) == set(manifest.delegates)
    assert {e.route for e in routing.examples} == {*manifest.delegates, "none"}


def test_name_must_match_folder(tmp_path: Path) -> None:
    folder = write_agent(tmp_path, "other-name", folder="agent-x")
    manifest = str(folder / "agent.yaml")
    with pytest.raises(ConfigError) as info:
        load_agent(folder)
    assert info.value.field == "name"
    assert str(info.value) == f"{manifest}: name: name 'other-name' differs from its folder 'agent-x'"


def test_missing_template(tmp_path: Path) -> None:
    folder = write_agent(tmp_path, "no-template", prompt={"template": "missing.md"})
    manifest = str(folder / "agent.yaml")
    with pytest.raises(ConfigError) as info:
        load_agent(folder)
    assert info.value.field == "prompt.template"
    assert str(info.value) == (
        f"{manifest}: prompt.template: template {str(folder / 'missing.md')!r} not found"
    )


def test_template_with_undeclared_variable(tmp_path: Path) -> None:
    folder = write_agent(
        tmp_path, "undeclared", prompt_text="Hi {{ customer }} in {{ region }} from {{ agent }}"
    )
    manifest = str(folder / "agent.yaml")
    with pytest.raises(ConfigError) as info:
        load_agent(folder)
    assert info.value.file == manifest
    assert info.value.field == "prompt.variables"
    # `agent` is always provided; only `region` is missing.
    assert str(info.value) == f"{manifest}: prompt.variables: template uses undeclared variables ['region']"


def test_template_syntax_error_names_the_template(tmp_path: Path) -> None:
    folder = write_agent(tmp_path, "bad-jinja", prompt_text="Hello {{ customer ")
    with pytest.raises(ConfigError) as info:
        load_agent(folder)
    assert info.value.file == str(folder / "prompt.md")
    assert str(info.value).startswith(f"{folder / 'prompt.md'}: line 1: ")


def test_bad_yaml(tmp_path: Path) -> None:
    folder = write_agent(tmp_path, "bad-yaml", yaml_text="name: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_agent(folder)
    assert info.value.file == str(folder / "agent.yaml")
    assert str(info.value).startswith(f"{folder / 'agent.yaml'}: invalid YAML: ")


def test_manifest_must_be_a_mapping(tmp_path: Path) -> None:
    folder = write_agent(tmp_path, "a-list", yaml_text="- a\n- b\n")
    with pytest.raises(ConfigError) as info:
        load_agent(folder)
    assert str(info.value) == f"{folder / 'agent.yaml'}: a manifest must be a YAML mapping"


def test_missing_manifest_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as info:
        load_agent(tmp_path / "empty")
    assert str(info.value) == f"{tmp_path / 'empty' / 'agent.yaml'}: file not found"


def test_variable_default_must_match_its_type(tmp_path: Path) -> None:
    folder = write_agent(
        tmp_path,
        "bad-default",
        prompt={"template": "prompt.md", "variables": {"priority": {"type": "integer", "default": "abc"}}},
        prompt_text="Priority {{ priority }}",
    )
    with pytest.raises(ConfigError, match=r"prompt\.variables"):
        load_agent(folder)


# --- fleets --------------------------------------------------------------------------


def test_delegate_outside_the_fleet(tmp_path: Path) -> None:
    write_agent(tmp_path, "a", delegates=["b"])
    write_agent(tmp_path, "b")
    manifest = str(tmp_path / "a" / "agent.yaml")
    with pytest.raises(ConfigError) as info:
        load_fleet(tmp_path, ["a"])
    assert info.value.file == manifest
    assert info.value.field == "delegates[0]"
    assert str(info.value) == f"{manifest}: delegates[0]: delegate 'b' is not part of this fleet"


def test_delegation_cycle(tmp_path: Path) -> None:
    write_agent(tmp_path, "a", delegates=["b"])
    write_agent(tmp_path, "b", delegates=["a"])
    with pytest.raises(ConfigError) as info:
        load_fleet(tmp_path, ["a", "b"])
    assert info.value.field == "delegates"
    assert info.value.file == str(tmp_path / "a" / "agent.yaml")
    assert "delegation cycle a -> b -> a" in str(info.value)


def test_longer_delegation_cycle(tmp_path: Path) -> None:
    write_agent(tmp_path, "entry", delegates=["a"])
    write_agent(tmp_path, "a", delegates=["b"])
    write_agent(tmp_path, "b", delegates=["c"])
    write_agent(tmp_path, "c", delegates=["a"])
    with pytest.raises(ConfigError, match="delegation cycle a -> b -> c -> a"):
        load_fleet(tmp_path, ["entry", "a", "b", "c"])


def test_diamond_is_not_a_cycle(tmp_path: Path) -> None:
    write_agent(tmp_path, "top", delegates=["left", "right"])
    write_agent(tmp_path, "left", delegates=["base"])
    write_agent(tmp_path, "right", delegates=["base"])
    write_agent(tmp_path, "base")
    specs = load_fleet(tmp_path, ["top", "left", "right", "base"])
    assert delegation_order(specs) == ["base", "left", "right", "top"]


def test_unknown_agent_in_fleet(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_fleet(tmp_path, ["ghost"])
    assert str(info.value) == f"no agent 'ghost': {str(tmp_path / 'ghost' / 'agent.yaml')!r} not found"


def test_missing_agents_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agents folder .* does not exist"):
        load_fleet(tmp_path / "nope", ["a"])


# --- JSON Schema ---------------------------------------------------------------------


def test_json_schema_is_valid_draft_2020_12() -> None:
    schema = manifest_json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "apiVersion" in schema["properties"]
    assert "api_version" not in schema["properties"]
    assert {"apiVersion", "name", "version", "role", "description", "owner", "prompt", "sla"} <= set(
        schema["required"]
    )
    Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("name", EXAMPLE_AGENTS)
def test_json_schema_accepts_example_manifests(name: str) -> None:
    instance = yaml.safe_load((AGENTS / name / "agent.yaml").read_text(encoding="utf-8"))
    errors = list(Draft202012Validator(manifest_json_schema()).iter_errors(instance))
    assert errors == []


def test_json_schema_describes_every_routing_field() -> None:
    defs = manifest_json_schema()["$defs"]
    for name in ("Routing", "RoutingExample"):
        assert defs[name]["additionalProperties"] is False
        assert all(field.get("description") for field in defs[name]["properties"].values()), name


def test_json_schema_rejects_what_load_agent_rejects() -> None:
    instance = yaml.safe_load((AGENTS / "orchestrator" / "agent.yaml").read_text(encoding="utf-8"))
    validator = Draft202012Validator(manifest_json_schema())
    assert not validator.is_valid({**instance, "colour": "blue"})
    assert not validator.is_valid({**instance, "role": "boss"})
    assert not validator.is_valid({k: v for k, v in instance.items() if k != "sla"})
