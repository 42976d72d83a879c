"""serve.app without Ray running: FleetArgs, validate_fleet, agent cards and what build_app binds."""

from __future__ import annotations

import copy
import pickle
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve.app import FleetArgs, agent_card, build_app, validate_fleet
from serve.cards import AgentCard
from serve.errors import ConfigError
from serve.governance.config import EngineConfig, GovernanceConfig, build_engines
from serve.ingress import IngressOptions
from serve.manifest import load_agent
from serve.memory.store import MemoryLimits
from serve.models.scripted import ScriptedConfig
from serve.placement import project_root
from serve.settings import settings
from tests.unit.conftest import AGENTS, EXAMPLE_AGENTS, LOCAL_CONFIG, ROOT, TEST_APP_CONFIG, write_agent

SCRIPTED = {"kind": "scripted", "script": [{"replies": [{"content": "hi"}]}]}


def local_args() -> dict[str, Any]:
    config = yaml.safe_load(LOCAL_CONFIG.read_text(encoding="utf-8"))
    (app,) = config["applications"]
    assert app["import_path"] == "serve.app:build_app"
    args: dict[str, Any] = app["args"]
    return args


@pytest.fixture
def fleet_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("FLEET_HOME", str(tmp_path))
    settings.cache_clear()
    yield tmp_path
    monkeypatch.delenv("FLEET_HOME")
    settings.cache_clear()


def test_local_config_validates() -> None:
    fleet, agents_dir, specs = validate_fleet(local_args())
    assert agents_dir == ROOT / "agents"
    assert fleet.agents == EXAMPLE_AGENTS
    assert list(specs) == EXAMPLE_AGENTS
    assert isinstance(fleet.models["default"], ScriptedConfig)
    assert fleet.ingress.request_timeout_s == 300.0
    assert specs["orchestrator"].manifest.delegates == [
        "hr-policy-advisor",
        "supply-chain-optimizer",
        "fleet-monitor",
    ]


def test_integration_test_config_validates() -> None:
    app = yaml.safe_load(TEST_APP_CONFIG.read_text(encoding="utf-8"))
    fleet, agents_dir, specs = validate_fleet(app["args"])
    assert agents_dir == ROOT / "tests" / "integration" / "agents"
    assert list(specs) == ["tester", "helper", "relay", "keeper", "reader", "frugal"]
    assert specs["relay"].manifest.model.backend == "upstream"
    assert fleet.ingress.request_timeout_s == 8
    assert fleet.models["default"].words_per_chunk == 1


def test_project_root_is_the_checkout() -> None:
    assert project_root() == ROOT


def test_fleet_home_moves_relative_agents_dir_and_policies(fleet_home: Path) -> None:
    write_agent(fleet_home / "agents", "solo")
    with pytest.raises(ConfigError, match=r"governance\.policies") as err:
        validate_fleet({"agents": ["solo"], "models": {"default": SCRIPTED}})
    assert err.value.file == str(fleet_home / "configs" / "policies")
    shutil.copytree(ROOT / "configs" / "policies", fleet_home / "configs" / "policies")
    _, agents_dir, specs = validate_fleet({"agents": ["solo"], "models": {"default": SCRIPTED}})
    assert agents_dir == fleet_home / "agents"
    assert list(specs) == ["solo"]


def test_absolute_agents_dir(tmp_path: Path) -> None:
    write_agent(tmp_path, "solo")
    fleet, agents_dir, _ = validate_fleet(
        {"agents_dir": str(tmp_path), "agents": ["solo"], "models": {"default": SCRIPTED}}
    )
    assert agents_dir == tmp_path
    assert fleet.agents_dir == str(tmp_path)


def test_fleet_args_defaults() -> None:
    args = FleetArgs.model_validate({"agents": ["a"], "models": {"default": SCRIPTED}})
    assert args.agents_dir == "agents"
    assert args.ingress.model_dump() == {
        "max_body_bytes": 1 << 20,
        "num_replicas": 1,
        "max_ongoing_requests": 512,
        "max_queued_requests": None,
        "request_timeout_s": 300.0,
        "retry_after_s": 1,
    }


BROKEN_ARGS: list[tuple[str, dict[str, Any], str]] = [
    ("no-agents", {"models": {"default": SCRIPTED}}, "args.agents: Field required"),
    (
        "empty-agents",
        {"agents": [], "models": {"default": SCRIPTED}},
        "args.agents: List should have at least 1 item after validation, not 0",
    ),
    (
        "empty-models",
        {"agents": ["orchestrator"], "models": {}},
        "args.models: Dictionary should have at least 1 item after validation, not 0",
    ),
    (
        "unknown-kind",
        {"agents": ["orchestrator"], "models": {"default": {"kind": "llama"}}},
        "args.models.default: Input tag 'llama' found using 'kind' does not match any of the expected "
        "tags: 'scripted', 'openai', 'vllm'",
    ),
    (
        "unknown-key",
        {"agents": ["orchestrator"], "models": {"default": SCRIPTED}, "replicas": 3},
        "args.replicas: Extra inputs are not permitted",
    ),
    (
        "unknown-ingress-option",
        {"agents": ["orchestrator"], "models": {"default": SCRIPTED}, "ingress": {"port": 1}},
        "args.ingress.port: Extra inputs are not permitted",
    ),
    (
        "unknown-transport",
        {"agents": ["orchestrator"], "models": {"default": SCRIPTED}, "transport": "http"},
        "args.transport: Input should be 'grpc' or 'actor'",
    ),
    (
        "bad-timeout",
        {"agents": ["orchestrator"], "models": {"default": SCRIPTED}, "ingress": {"request_timeout_s": 0}},
        "args.ingress.request_timeout_s: Input should be greater than 0",
    ),
    (
        "empty-ingress-queue",
        {"agents": ["orchestrator"], "models": {"default": SCRIPTED}, "ingress": {"max_queued_requests": 0}},
        "args.ingress.max_queued_requests: Input should be greater than or equal to 1",
    ),
    (
        "unbounded-model-queue",
        {"agents": ["orchestrator"], "models": {"default": {**SCRIPTED, "max_queued_requests": -1}}},
        "args.models.default.max_queued_requests: Input should be greater than or equal to 1",
    ),
    (
        "inline-model-queue",
        {
            "agents": ["orchestrator"],
            "models": {"default": {**SCRIPTED, "inline": True, "max_queued_requests": 8}},
        },
        "args.models.default: Value error, max_queued_requests bounds a deployment's queue; "
        "an inline backend has none",
    ),
    (
        "unknown-auth",
        {"agents": ["orchestrator"], "models": {"default": SCRIPTED}, "governance": {"auth": "none"}},
        "args.governance.auth: Input should be 'keys' or 'off'",
    ),
    (
        "auth-off-with-keys",
        {
            "agents": ["orchestrator"],
            "models": {"default": SCRIPTED},
            "governance": {"auth": "off", "tenants": [{"tenant": "acme", "key_sha256": "0" * 64}]},
        },
        "args.governance: Value error, auth: 'off' serves without keys, yet tenants lists some: "
        "drop one or the other",
    ),
    (
        "keys-without-a-key",
        {"agents": ["orchestrator"], "models": {"default": SCRIPTED}, "governance": {"auth": "keys"}},
        "args.governance: Value error, auth: 'keys' needs at least one key in tenants "
        "(`fleet keys new` makes one)",
    ),
    (
        "tenant-without-a-hash",
        {
            "agents": ["orchestrator"],
            "models": {"default": SCRIPTED},
            "governance": {"tenants": [{"tenant": "a"}]},
        },
        "args.governance.tenants[0]: Value error, key_sha256: give the key's hash in exactly one of "
        "key_sha256, key_sha256_env, key_sha256_file (got none)",
    ),
]


@pytest.mark.parametrize(("name", "args", "message"), BROKEN_ARGS, ids=[c[0] for c in BROKEN_ARGS])
def test_broken_args(name: str, args: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_fleet(args)
    assert str(info.value) == message
    assert info.value.file is None
    assert info.value.field == message.split(": ", 1)[0]


def test_broken_model_config_names_the_path_the_user_wrote() -> None:
    with pytest.raises(ConfigError) as info:
        validate_fleet({"agents": ["orchestrator"], "models": {"default": {"kind": "scripted"}}})
    assert info.value.field == "args.models.default.script"


def test_missing_agent() -> None:
    args = local_args()
    args["agents"] = [*args["agents"], "ghost"]
    with pytest.raises(ConfigError) as info:
        validate_fleet(args)
    assert str(info.value) == f"no agent 'ghost': {str(ROOT / 'agents' / 'ghost' / 'agent.yaml')!r} not found"


def test_delegate_left_out_of_the_config() -> None:
    args = local_args()
    args["agents"] = ["orchestrator", "hr-policy-advisor"]
    with pytest.raises(ConfigError) as info:
        validate_fleet(args)
    assert info.value.file == str(AGENTS / "orchestrator" / "agent.yaml")
    assert info.value.field == "delegates[1]"
    assert "delegate 'supply-chain-optimizer' is not part of this fleet" in str(info.value)


def test_backend_not_in_models() -> None:
    args = copy.deepcopy(local_args())
    args["models"] = {"other": args["models"]["default"]}
    with pytest.raises(ConfigError) as info:
        validate_fleet(args)
    manifest = str(AGENTS / "orchestrator" / "agent.yaml")
    assert str(info.value) == (
        f"{manifest}: model.backend: model backend 'default' is not in the config's models (other)"
    )


def test_tool_modules_are_checked(tmp_path: Path) -> None:
    folder = write_agent(tmp_path, "toolless", tools=[{"name": "echo", "scope": "s"}], scopes=["s"])
    with pytest.raises(ConfigError) as info:
        validate_fleet({"agents_dir": str(tmp_path), "agents": ["toolless"], "models": {"default": SCRIPTED}})
    assert info.value.file == str(folder / "agent.yaml")
    assert "does not exist" in str(info.value)


def test_agent_card() -> None:
    card = agent_card(load_agent(AGENTS / "hr-policy-advisor")).wire()
    assert card == {
        "object": "agent",
        "name": "hr-policy-advisor",
        "version": "1.0.0",
        "role": "domain",
        "description": "Answers employee questions from the HR handbook and looks up leave balances.",
        "owner": {"team": "People Operations", "contact": "people-ops@example.com"},
        "model": "default",
        "tools": [
            {
                "name": "search_handbook",
                "scope": "hr.handbook.read",
                "approval": False,
                "approval_ttl_s": None,
                "timeout_s": 5.0,
                "data": [],
                "description": "Search the HR handbook; returns the best matching sections, best first.",
            },
            {
                "name": "leave_balance",
                "scope": "hr.leave.read",
                "approval": False,
                "approval_ttl_s": None,
                "timeout_s": 5.0,
                "data": [],
                "description": "Annual leave of an employee: entitlement, carried over, taken, pending, remaining.",
            },
            {
                "name": "request_leave",
                "scope": "hr.leave.write",
                "approval": True,
                "approval_ttl_s": None,
                "timeout_s": 5.0,
                "data": [],
                "description": "File an annual leave request for an employee; the employee's manager signs it off.",
            },
        ],
        "delegates": [],
        "scopes": ["hr.handbook.read", "hr.leave.read", "hr.leave.write"],
        "data": ["internal", "pii"],
        "policies": {
            "pii": "redact",
            "compliance": ["gdpr"],
            "cost": {"per_request_usd": "0.05", "per_day_usd": "25"},
            "files": [],
        },
        "sla": {"p95_latency_ms": 4000, "availability": 0.995},
        "kpis": [
            {"name": "resolution_rate", "target": 0.85, "direction": "higher", "unit": ""},
            {"name": "handle_time_s", "target": 60.0, "direction": "lower", "unit": "s"},
        ],
        "autoscaling": {
            "min_replicas": 1,
            "max_replicas": 4,
            "initial_replicas": None,
            "target_ongoing_requests": 4.0,
            "upscale_delay_s": 10.0,
            "downscale_delay_s": 300.0,
            "max_ongoing_requests": 32,
            "max_queued_requests": None,
        },
        "max_turns": 4,
        "memory": {"session": True, "tools": False},
    }


def test_orchestrator_card_lists_delegates_and_no_tools() -> None:
    card = agent_card(load_agent(AGENTS / "orchestrator")).wire()
    assert card["tools"] == []
    assert card["delegates"] == ["hr-policy-advisor", "supply-chain-optimizer", "fleet-monitor"]
    assert card["role"] == "orchestration"


def test_build_app_hands_every_replica_its_configs_typed() -> None:
    """Replicas are bound the validated objects (pydantic models pickle), not dicts to
    validate again."""
    args = yaml.safe_load(TEST_APP_CONFIG.read_text(encoding="utf-8"))["args"]
    fleet, _, specs = validate_fleet(args)
    ingress = build_app(args)._bound_deployment
    cards, agents, options, governance, *_ = ingress.init_args
    assert cards == {name: agent_card(spec) for name, spec in specs.items()}
    assert all(isinstance(card, AgentCard) for card in cards.values())
    assert isinstance(options, IngressOptions) and options == fleet.ingress
    assert isinstance(governance, GovernanceConfig) and governance == fleet.governance
    tester = agents["tester"]._bound_deployment
    assert tester.init_args[4] == fleet.governance
    model = tester.init_args[2]._bound_deployment
    assert model.init_args == ("default", fleet.models["default"])
    memory = tester.init_args[7]._bound_deployment
    assert memory.init_args[1] == fleet.memory.limits and isinstance(memory.init_args[1], MemoryLimits)
    for value in (cards, options, governance, fleet.models["default"], fleet.memory.limits):
        assert pickle.loads(pickle.dumps(value)) == value


def test_build_app_bounds_the_queue_of_every_deployment_a_request_waits_for() -> None:
    """The ingress (at Ray's proxy), each agent (at the ingress and its callers) and each
    model deployment (at the agents): a request that finds one full is refused at once."""
    args = copy.deepcopy(yaml.safe_load(TEST_APP_CONFIG.read_text(encoding="utf-8"))["args"])
    args["ingress"]["max_queued_requests"] = 40
    args["models"]["default"]["max_queued_requests"] = 30
    fleet, _, specs = validate_fleet(args)
    ingress = build_app(args)._bound_deployment
    tester = ingress.init_args[1]["tester"]._bound_deployment
    model = tester.init_args[2]._bound_deployment
    assert ingress._deployment_config.max_queued_requests == 40
    assert ingress._deployment_config.backpressure_config.retry_after_s == fleet.ingress.retry_after_s
    assert (
        tester._deployment_config.max_queued_requests
        == specs["tester"].manifest.autoscaling.max_ongoing_requests
    )
    assert model._deployment_config.max_queued_requests == 30


def test_policies_are_compiled_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """``validate_fleet`` compiles the fleet's Rego; the builder's replicas, in the same
    process, reuse it (an OPA engine is new each time: its client binds to a loop)."""
    import serve.governance.config as governance

    compiled: list[int] = []
    real = governance.RegoEngine

    def counted(*args: Any, **kwargs: Any) -> Any:
        compiled.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(governance, "_compiled", {})
    monkeypatch.setattr(governance, "RegoEngine", counted)
    args = local_args()
    validate_fleet(args)
    once = len(compiled)
    validate_fleet(args)
    fleet, *_ = validate_fleet(args)
    enforced, _ = build_engines(fleet.governance, project_root())
    assert build_engines(fleet.governance, project_root())[0] is enforced
    assert len(compiled) == once >= 1
    opa = fleet.governance.model_copy(update={"engine": EngineConfig(kind="opa", url="http://127.0.0.1:9")})
    first, second = build_engines(opa, project_root())[0], build_engines(opa, project_root())[0]
    assert first is not second and len(compiled) == once


# --- secure by default: beyond loopback, keys or `auth: "off"` ------------------------

OPEN = "http_options.host is '0.0.0.0', beyond loopback, and governance.tenants lists no API key"


def test_serving_beyond_loopback_without_keys_is_refused_naming_the_field_and_the_setting() -> None:
    for host in ("127.0.0.1", "localhost", "::1"):
        validate_fleet(local_args(), host)  # loopback: auth off is fine
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        with pytest.raises(ConfigError) as err:
            validate_fleet(local_args(), host)
        assert err.value.field == "args.governance.tenants"
        assert f"http_options.host is {host!r}, beyond loopback" in str(err.value)
        assert 'args.governance.auth: "off"' in str(err.value)


def test_auth_off_or_keys_serve_beyond_loopback() -> None:
    validate_fleet({**local_args(), "governance": {"auth": "off"}}, "0.0.0.0")
    keyed = {"tenants": [{"tenant": "acme", "key_sha256_env": "FLEET_KEY_ACME"}]}
    validate_fleet({**local_args(), "governance": keyed}, "0.0.0.0")  # the variable is read at build time


def test_build_app_asks_serve_where_it_listens_and_refuses_beyond_loopback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``serve deploy`` hands the builder only ``args``: it asks the Serve controller."""
    import serve.app

    assert serve.app.serve_http_host() is None  # no Ray here
    monkeypatch.setattr(serve.app, "serve_http_host", lambda: "0.0.0.0")
    with pytest.raises(ConfigError, match=OPEN) as err:
        build_app(local_args())
    assert err.value.field == "args.governance.tenants"
    build_app({**local_args(), "governance": {"auth": "off"}})


def test_build_app_reads_key_hashes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve.auth import hash_key

    governance = {"tenants": [{"tenant": "acme", "key_sha256_env": "FLEET_KEY_ACME", "roles": ["hr"]}]}
    args = {**local_args(), "governance": governance}
    monkeypatch.delenv("FLEET_KEY_ACME", raising=False)
    with pytest.raises(ConfigError, match="environment variable FLEET_KEY_ACME is not set") as err:
        build_app(args)
    assert err.value.field == "args.governance.tenants[0].key_sha256_env"
    monkeypatch.setenv("FLEET_KEY_ACME", hash_key("fk-acme"))
    _, _, _, bound, *_ = build_app(args)._bound_deployment.init_args
    (tenant,) = bound.tenants
    assert (tenant.tenant, tenant.key_sha256, tenant.key_sha256_env) == ("acme", hash_key("fk-acme"), None)
