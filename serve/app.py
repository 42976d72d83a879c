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
from serve.approvals.config import ApprovalsConfig
from serve.approvals.service import ApprovalsService
from serve.audit.service import AuditService
from serve.auth import is_loopback, resolve_keys
from serve.budget.config import BudgetsConfig
from serve.budget.service import BudgetService
from serve.cards import AgentCard
from serve.errors import ConfigError, field_path
from serve.governance.config import GovernanceConfig, build_engines
from serve.handles import Transport
from serve.ingress import Ingress, IngressOptions
from serve.manifest import MANIFEST_FILE, AgentSpec, delegation_order, load_fleet
from serve.memory.service import MemoryService
from serve.memory.store import MemoryConfig
from serve.models import BACKEND_KINDS, BackendConfig
from serve.models.deployment import ModelDeployment
from serve.placement import (
    agent_options,
    approvals_options,
    approvals_path,
    audit_options,
    audit_path,
    budget_options,
    budget_path,
    ingress_options,
    memory_options,
    memory_path,
    model_deployment_options,
    project_root,
)
from serve.tools import load_tools

__all__ = ["FleetArgs", "agent_card", "build_app", "check_exposure", "serve_http_host", "validate_fleet"]


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
    budgets: BudgetsConfig = Field(
        default_factory=BudgetsConfig,
        description="The ledger of spend per day and month: tenants' caps (keys' are beside each key).",
    )
    approvals: ApprovalsConfig = Field(
        default_factory=ApprovalsConfig,
        description="Parked turns that wait for people to approve their gated calls.",
    )
    transport: Transport = Field(
        default="grpc",
        description="How the ingress, agents and models call each other: Ray Serve's gRPC "
        "transport between replicas, or Ray actor calls ('actor', Serve's default).",
    )


def _parse_args(args: dict[str, Any]) -> FleetArgs:
    try:
        return FleetArgs.model_validate(args)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = "args." + field_path(err["loc"], BACKEND_KINDS)
        raise ConfigError(err["msg"], field=field) from None


def check_exposure(fleet: FleetArgs, host: str) -> None:
    """Serving beyond loopback needs tenant keys, unless the config turns auth off in so many words."""
    if fleet.governance.keys_required or fleet.governance.auth == "off" or is_loopback(host):
        return
    raise ConfigError(
        f"http_options.host is {host!r}, beyond loopback, and governance.tenants lists no API key: "
        "anyone who reaches the port could call every agent. List tenant keys (`fleet keys new`), "
        'or set args.governance.auth: "off" to serve without keys on purpose',
        field="args.governance.tenants",
    )


def serve_http_host() -> str | None:
    """The host Ray Serve's HTTP proxies bind, asked of the running Serve controller.

    ``serve deploy`` and ``serve run`` build the app on the cluster after Serve has taken
    the config's ``http_options`` (the builder is handed only ``args``). None where no
    Serve runs (``fleet validate``, unit tests): the caller knows the host there."""
    import ray

    if not ray.is_initialized():
        return None
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    from ray.serve.config import HTTPOptions

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:  # no Serve on this cluster: nothing listens yet
        return None
    # Unanswered within the minute, the deploy fails: it never goes on without knowing.
    options = cast(HTTPOptions, ray.get(controller.get_http_config.remote(), timeout=60))
    return None if options.host is None else str(options.host)


def validate_fleet(
    args: dict[str, Any], host: str | None = None
) -> tuple[FleetArgs, Path, dict[str, AgentSpec]]:
    """Everything ``fleet validate`` and the builder check, with no Ray involved.

    ``host``: the address the fleet will serve on (``http_options.host``), if known."""
    fleet = _parse_args(args)
    if host is not None:
        check_exposure(fleet, host)
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


def agent_card(spec: AgentSpec) -> AgentCard:
    """The public description of an agent (``GET /v1/agents/{name}``), its tools described."""
    tools = load_tools(spec.folder, [t.name for t in spec.manifest.tools])
    return AgentCard.of(spec, {name: t.description for name, t in tools.items()})


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
    fleet, agents_dir, specs = validate_fleet(args, serve_http_host())
    # Keys held in environment variables or secret files are read now, on the cluster:
    # the replicas are handed the hashes, wherever they start.
    tenants = resolve_keys(fleet.governance.tenants, "args.governance.tenants")
    fleet = fleet.model_copy(update={"governance": fleet.governance.model_copy(update={"tenants": tenants})})
    used = {spec.manifest.model.backend for spec in specs.values()}
    models: dict[str, Any] = {}
    for name in sorted(used):
        config = fleet.models[name]
        if config.inline:  # the backend runs in the replica of each agent that names it
            models[name] = config
        else:
            options = model_deployment_options(name, config)
            models[name] = _deployment(ModelDeployment).options(**options).bind(name, config)
    root = str(project_root())
    audit = _deployment(AuditService).options(**audit_options()).bind(str(audit_path(fleet.governance.audit)))
    memory = (
        _deployment(MemoryService)
        .options(**memory_options())
        .bind(str(memory_path(fleet.memory)), fleet.memory.limits)
    )
    # The ledger, when any budget per day or month is set (an agent's, a tenant's, a key's).
    budgeted = (
        any(s.manifest.policies.cost.per_day_usd is not None for s in specs.values())
        or bool(fleet.budgets.tenants)
        or any(t.budget is not None for t in tenants)
    )
    ledger = (
        _deployment(BudgetService)
        .options(**budget_options())
        .bind(str(budget_path(fleet.budgets)), fleet.budgets.lease_s, fleet.budgets.test_clock)
        if budgeted
        else None
    )
    cards = {name: agent_card(spec) for name, spec in specs.items()}
    webhooks = {n: s.manifest.approval_webhook for n, s in specs.items() if s.manifest.approval_webhook}
    webhooks |= {n: url for n, url in fleet.approvals.webhooks.items() if n in specs}
    approvals = (
        _deployment(ApprovalsService)
        .options(**approvals_options())
        .bind(
            str(approvals_path(fleet.approvals)),
            fleet.approvals,
            cards,
            fleet.governance,
            root,
            audit,
            webhooks,
        )
    )
    bound: dict[str, Any] = {}
    for name in delegation_order(specs):
        m = specs[name].manifest
        bound[name] = (
            _deployment(AgentDeployment)
            .options(**agent_options(m))
            .bind(
                str(agents_dir),
                name,
                models[m.model.backend],
                {d: _delegate(bound[d], specs[d]) for d in m.delegates},
                fleet.governance,
                root,
                audit,
                memory,
                fleet.memory.call_timeout_s,
                fleet.transport,
                fleet.models[m.model.backend].price,
                ledger,
                fleet.budgets,
                approvals,
                fleet.approvals.call_timeout_s,
                fleet.approvals.lease_s,
            )
        )
    front = fleet.ingress
    options = ingress_options(
        front.max_ongoing_requests, front.max_queued_requests, front.retry_after_s, front.num_replicas
    )
    return (
        _deployment(Ingress)
        .options(**options)
        .bind(
            cards,
            bound,
            fleet.ingress,
            fleet.governance,
            root,
            audit,
            fleet.transport,
            ledger,
            fleet.budgets,
            approvals,
            fleet.approvals,
        )
    )
