"""The application builder: the ``import_path`` Ray Serve configs point at.

``serve.app:build_app`` takes the config's ``args`` (validated by :class:`FleetArgs`),
reads the agents, and binds one deployment per agent (autoscaling from its manifest),
one per model backend that holds an engine, and the ingress. Everything is validated,
tool modules included, before Ray Serve starts a single replica.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve as rayserve
from ray.serve import Application
from ray.serve.deployment import Deployment

from serve.agent import AgentDeployment
from serve.audit.service import AuditService
from serve.errors import ConfigError, field_path
from serve.governance.config import GovernanceConfig, build_engines
from serve.handles import Transport
from serve.ingress import Ingress, IngressOptions
from serve.manifest import MANIFEST_FILE, AgentSpec, delegation_order, load_fleet
from serve.memory.service import MemoryService
from serve.memory.store import MemoryConfig
from serve.models import BACKEND_KINDS, BackendConfig, VLLMConfig
from serve.models.deployment import ModelDeployment
from serve.settings import settings
from serve.tools import load_tools

__all__ = [
    "FleetArgs",
    "agent_card",
    "audit_path",
    "build_app",
    "memory_path",
    "project_root",
    "validate_fleet",
]

# Fleet's replicas wait on I/O (models, tools, handles); a whole CPU each would not let
# a laptop hold a fleet. The deploy config's ``deployments:`` section overrides these.
AGENT_ACTOR_OPTIONS = {"num_cpus": 0.1}
SERVICE_ACTOR_OPTIONS = {"num_cpus": 0.1}
# Ray's default (5 requests in flight per replica) queues in the caller's router beyond
# that: the deployments that only wait on others (a scripted or upstream model) take many.
PROXY_MAX_ONGOING_REQUESTS = 512
# The audit log and the memory store are files: their one writer lives on the head node,
# whose disk outlives workers.
AUDIT_ACTOR_OPTIONS = {"num_cpus": 0.1, "resources": {"node:__internal_head__": 0.001}}
MEMORY_ACTOR_OPTIONS = AUDIT_ACTOR_OPTIONS


class FleetArgs(BaseModel):
    """The ``args`` of a Fleet application in a Ray Serve config."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    agents_dir: str = Field(
        default="agents",
        description="Folder of agent folders; relative paths start at $FLEET_HOME, else the project root.",
    )
    agents: list[str] = Field(min_length=1, description="Agents to deploy (folder names).")
    models: dict[str, BackendConfig] = Field(min_length=1, description="Model backends by name.")
    ingress: IngressOptions = Field(default_factory=IngressOptions, description="HTTP front door.")
    governance: GovernanceConfig = Field(
        default_factory=GovernanceConfig, description="Policies, API keys and the audit log."
    )
    memory: MemoryConfig = Field(
        default_factory=MemoryConfig, description="Sessions, shared context and long-term memory."
    )
    transport: Transport = Field(
        default="grpc",
        description="How the ingress, agents and models call each other: Ray Serve's gRPC "
        "transport between replicas, or Ray actor calls ('actor', Serve's default).",
    )


def project_root() -> Path:
    """Where relative paths in configs start: $FLEET_HOME, else this checkout."""
    return settings().home or Path(__file__).resolve().parent.parent


def _parse_args(args: dict[str, Any]) -> FleetArgs:
    try:
        return FleetArgs.model_validate(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = "args." + field_path(err["loc"], BACKEND_KINDS)
        raise ConfigError(err["msg"], field=field) from None


def validate_fleet(args: dict[str, Any]) -> tuple[FleetArgs, Path, dict[str, AgentSpec]]:
    """Everything ``fleet validate`` and the builder check, with no Ray involved."""
    fleet = _parse_args(args)
    agents_dir = Path(fleet.agents_dir)
    if not agents_dir.is_absolute():
        agents_dir = project_root() / agents_dir
    specs = load_fleet(agents_dir, fleet.agents)
    for _name, spec in specs.items():
        if spec.manifest.model.backend not in fleet.models:
            raise ConfigError(
                f"model backend {spec.manifest.model.backend!r} is not in the config's models "
                f"({', '.join(sorted(fleet.models))})",
                file=str(spec.folder / MANIFEST_FILE),
                field="model.backend",
            )
        load_tools(spec.folder, [t.name for t in spec.manifest.tools])
        if spec.manifest.policies.files:  # the agent's own modules beside the fleet's
            build_engines(fleet.governance, project_root(), spec.manifest.policies.files)
    build_engines(fleet.governance, project_root())
    return fleet, agents_dir, specs


def audit_path(fleet: FleetArgs) -> Path:
    path = Path(fleet.governance.audit.path)
    return path if path.is_absolute() else project_root() / path


def memory_path(fleet: FleetArgs) -> Path:
    path = Path(fleet.memory.path)
    return path if path.is_absolute() else project_root() / path


def agent_card(spec: AgentSpec) -> dict[str, Any]:
    """The public description of an agent (``GET /v1/agents/{name}``)."""
    m = spec.manifest
    tools = load_tools(spec.folder, [t.name for t in m.tools])
    return {
        "object": "agent",
        "name": m.name,
        "version": m.version,
        "role": m.role,
        "description": m.description,
        "owner": m.owner.model_dump(),
        "model": m.model.backend,
        "tools": [{**g.model_dump(), "description": tools[g.name].description} for g in m.tools],
        "delegates": list(m.delegates),
        "scopes": list(m.scopes),
        "data": list(m.data),
        "policies": m.policies.model_dump(mode="json"),
        "sla": m.sla.model_dump(),
        "kpis": [k.model_dump() for k in m.kpis],
        "autoscaling": m.autoscaling.model_dump(),
        "max_turns": m.max_turns,
        "memory": m.memory.model_dump(),
    }


def model_deployment_options(name: str, config: Any) -> dict[str, Any]:
    """Options of a model backend's deployment; an engine gets LLM-shaped ones."""
    if not isinstance(config, VLLMConfig):  # a script, or a client of an upstream API: async, light
        return {
            "name": f"model-{name}",
            "ray_actor_options": SERVICE_ACTOR_OPTIONS,
            "max_ongoing_requests": PROXY_MAX_ONGOING_REQUESTS,
        }
    return {
        "name": f"model-{name}",
        "ray_actor_options": config.ray_actor_options(),
        # Scale on queue depth: a replica is "full" when its engine batch is; requests
        # beyond twice that wait in the handle's queue instead of the engine's.
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 1,
            "target_ongoing_requests": config.max_num_seqs,
            "upscale_delay_s": 15,
            "downscale_delay_s": 600,
        },
        "max_ongoing_requests": 2 * config.max_num_seqs,
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 30,
    }


def _delegate(handle: Any, spec: AgentSpec) -> tuple[Any, str, list[str], list[str]]:
    """What a caller knows of a delegate: its handle, description, scopes and data classes."""
    m = spec.manifest
    # What a delegate answers may hold what it sees, bar PII (that is scanned for).
    return handle, m.description, list(m.scopes), [c for c in m.data if c != "pii"]


# Ray Serve logs every request each replica handles (INFO, one line per hop): a Fleet
# request already has its metrics, audit records and trace, and the lines cost each hop
# CPU. A deploy config's ``logging_config`` turns them back on.
QUIET_LOGS = {"enable_access_log": False}


def _deployment(cls: type) -> Deployment:
    # rayserve.deployment's overloads do not tell a class from options; it is a class here.
    return cast(Deployment, rayserve.deployment(cls, logging_config=QUIET_LOGS))


def build_app(args: dict[str, Any]) -> Application:
    fleet, agents_dir, specs = validate_fleet(args)
    used = {spec.manifest.model.backend for spec in specs.values()}
    models: dict[str, Any] = {}
    for name in sorted(used):
        config = fleet.models[name]
        if config.inline:
            models[name] = config.model_dump(mode="json")
        else:
            models[name] = (
                _deployment(ModelDeployment)
                .options(**model_deployment_options(name, config))
                .bind(name, config.model_dump(mode="json"))
            )
    governance, root = fleet.governance.model_dump(mode="json"), str(project_root())
    audit = (
        _deployment(AuditService)
        .options(
            name="audit", num_replicas=1, ray_actor_options=AUDIT_ACTOR_OPTIONS, max_ongoing_requests=1000
        )
        .bind(str(audit_path(fleet)))
    )
    memory = (
        _deployment(MemoryService)
        .options(
            name="memory", num_replicas=1, ray_actor_options=MEMORY_ACTOR_OPTIONS, max_ongoing_requests=1000
        )
        .bind(str(memory_path(fleet)), fleet.memory.limits.model_dump())
    )
    bound: dict[str, Any] = {}
    for name in delegation_order(specs):
        m = specs[name].manifest
        bound[name] = (
            _deployment(AgentDeployment)
            .options(
                name=name,
                autoscaling_config=m.autoscaling.ray_config(),
                max_ongoing_requests=m.autoscaling.max_ongoing_requests,
                ray_actor_options=AGENT_ACTOR_OPTIONS,
            )
            .bind(
                str(agents_dir),
                name,
                models[m.model.backend],
                {d: _delegate(bound[d], specs[d]) for d in m.delegates},
                governance,
                root,
                audit,
                memory,
                fleet.memory.call_timeout_s,
                fleet.transport,
            )
        )
    cards = {name: agent_card(spec) for name, spec in specs.items()}
    return (
        _deployment(Ingress)
        .options(
            name="ingress",
            ray_actor_options=SERVICE_ACTOR_OPTIONS,
            max_ongoing_requests=fleet.ingress.max_ongoing_requests,
        )
        .bind(cards, bound, fleet.ingress.model_dump(), governance, root, audit, fleet.transport)
    )
