"""The agent manifest: ``agents/<name>/agent.yaml``, a strict, versioned schema.

``load_agent`` and ``load_fleet`` validate manifests, their prompt templates and their
tool modules before anything is deployed; every error names the file and the field.
"""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import jinja2
import jinja2.meta
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from serve.errors import ConfigError, field_path

__all__ = [
    "API_VERSION",
    "DIRECT_ROUTE",
    "AgentManifest",
    "AgentSpec",
    "Routing",
    "RoutingExample",
    "load_agent",
    "load_fleet",
    "manifest_json_schema",
]

API_VERSION = "fleet/v1"
MANIFEST_FILE = "agent.yaml"
NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
SCOPE_PATTERN = r"^[a-z][a-z0-9_.:-]*$"


VARIABLE_TYPES: dict[str, type] = {"string": str, "integer": int, "number": float, "boolean": bool}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Owner(Strict):
    team: str = Field(description="Business team that owns the agent and its KPIs.")
    contact: str = Field(description="Where to reach the owner (e-mail or channel).")


class ModelRef(Strict):
    backend: str = Field(
        default="default",
        description="Name of a model backend declared in the deploy config's `models`.",
    )
    temperature: float | None = Field(default=None, ge=0, le=2, description="Sampling default.")
    top_p: float | None = Field(default=None, gt=0, le=1, description="Sampling default.")
    max_tokens: int | None = Field(
        default=None, gt=0, description="Default completion token limit per model call."
    )


class PromptVariable(Strict):
    type: Literal["string", "integer", "number", "boolean"] = Field(
        default="string", description="Type the value is validated against."
    )
    description: str = Field(default="", description="What the variable means.")
    default: str | int | float | bool | None = Field(
        default=None, description="Value used when the request does not set one."
    )
    required: bool = Field(
        default=False, description="A request must set it (ignored when a default exists)."
    )

    @model_validator(mode="after")
    def _default_has_the_type(self) -> PromptVariable:
        if self.default is not None:
            try:
                TypeAdapter(VARIABLE_TYPES[self.type]).validate_python(
                    self.default, strict=self.type != "number"
                )
            except ValidationError:
                raise ValueError(f"default {self.default!r} is not of type {self.type}") from None
        return self


class Prompt(Strict):
    template: str = Field(
        description="Jinja2 template file, relative to the agent folder; it renders the system prompt."
    )
    variables: dict[str, PromptVariable] = Field(
        default_factory=dict,
        description="Typed variables the template takes; requests set them in `metadata`.",
    )

    @field_validator("variables")
    @classmethod
    def _identifiers(cls, value: dict[str, PromptVariable]) -> dict[str, PromptVariable]:
        for key in value:
            if not key.isidentifier():
                raise ValueError(f"variable name {key!r} is not an identifier")
            if key == "agent":
                raise ValueError("variable name 'agent' is reserved: templates get the agent's name as it")
        return value


DataClass = Literal["public", "internal", "pii", "financial", "health", "confidential"]


class ToolGrant(Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$", description="Tool name in tools.py.")
    scope: str = Field(pattern=SCOPE_PATTERN, description="Scope the agent needs to run it.")
    approval: bool = Field(default=False, description="A human must approve each call.")
    approval_ttl_s: float | None = Field(
        default=None,
        gt=0,
        description="How long a call waits for its approval before it is rejected "
        "(default: the agent's approval_ttl_s).",
    )
    timeout_s: float = Field(default=10.0, gt=0, le=600, description="Per-call timeout.")
    data: list[DataClass] = Field(
        default_factory=list,
        description="Data classes the tool's results hold (the agent must be granted them).",
    )


class CostLimits(Strict):
    per_request_usd: Decimal | None = Field(default=None, ge=0, description="Cap per request.")
    per_day_usd: Decimal | None = Field(default=None, ge=0, description="Cap per day.")


class Policies(Strict):
    pii: Literal["allow", "redact", "block"] = Field(
        default="redact",
        description="What to do with PII in model input and output. `block` also stops the "
        "model at an answer's first PII (finish_reason `content_filter`): the answer is refused.",
    )
    compliance: list[Literal["gdpr", "soc2", "hipaa", "pci", "sox"]] = Field(
        default_factory=list, description="Compliance tags that turn on stricter rules."
    )
    cost: CostLimits = Field(default_factory=CostLimits, description="Spending limits.")
    files: list[str] = Field(
        default_factory=list, description="Extra Rego modules (configs/policies/) for this agent."
    )


class Sla(Strict):
    p95_latency_ms: int = Field(gt=0, description="95th percentile latency target.")
    availability: float = Field(gt=0, le=1, description="Fraction of successful requests.")


class Autoscaling(Strict):
    """Ray Serve's autoscaling config (the subset a manifest may set)."""

    min_replicas: int = Field(default=1, ge=0, description="Lowest replica count.")
    max_replicas: int = Field(default=1, ge=1, description="Highest replica count.")
    initial_replicas: int | None = Field(default=None, ge=0, description="Replicas at start.")
    target_ongoing_requests: float = Field(
        default=2.0, gt=0, description="Ongoing requests per replica that autoscaling aims for."
    )
    upscale_delay_s: float = Field(default=30.0, ge=0, description="Wait before scaling up.")
    downscale_delay_s: float = Field(default=600.0, ge=0, description="Wait before scaling down.")
    max_ongoing_requests: int = Field(
        default=16, gt=0, description="Requests one replica takes at once before queueing."
    )
    max_queued_requests: int | None = Field(
        default=None,
        ge=1,
        description="Requests each caller (an ingress replica, a delegating agent's replica) queues "
        "for this agent while all its replicas are full; one more is refused at once (503, "
        "Retry-After). Unset: max_ongoing_requests, one replica's worth.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def ray_config(self) -> dict[str, Any]:
        """The ``autoscaling_config`` dict for ``Deployment.options``."""
        return self.model_dump(exclude={"max_ongoing_requests", "max_queued_requests"}, exclude_none=True)


class MemoryUse(Strict):
    session: bool = Field(
        default=True,
        description="Remember the conversation across requests that name a session (top-level calls).",
    )
    tools: bool = Field(
        default=False,
        description=(
            "Give the model the memory tools: remember, recall, search_memory (long-term facts, "
            "scopes memory:<namespace>:read|write) and write_context, read_context (the request's "
            "shared context)."
        ),
    )


MEMORY_TOOL_NAMES = ("remember", "recall", "search_memory", "write_context", "read_context")


DIRECT_ROUTE = "none"  # the routing choice that delegates to no one


class RoutingExample(Strict):
    question: str = Field(min_length=1, description="A message as a user would write it.")
    route: str = Field(
        pattern=NAME_PATTERN,
        description=f"The delegate that should take it, or `{DIRECT_ROUTE}` (no delegate; needs `direct`).",
    )


class Routing(Strict):
    """How an agent with delegates picks the one that takes a request."""

    mode: Literal["match", "choose"] = Field(
        default="match",
        description="How the delegate is picked, when the client set no `tool_choice` (or `auto`) "
        "and sent no tools of its own. `match`: by words, without a model call: the user's message is "
        "scored (BM25 over word stems) against each delegate's description, its routing description "
        "and the examples that take it; no clear winner goes `none`. `choose`: the first model call is "
        "a constrained choice among the delegates' names, from a short prompt built from the same "
        "descriptions and examples (for a model that can read them: a 135M one names the same "
        "delegate for everything). Either way the chosen delegate gets the user's message as its task "
        "through the same policy, audit and spans as a model's own call.",
    )
    answer: Literal["delegate", "model"] = Field(
        default="delegate",
        description="`delegate`: the delegate's reply is the answer (a handoff: it passes this agent's "
        "output policy, and no second model call is made). `model`: the model answers from the "
        "reply, as after any call. A delegation that fails is always told to the model.",
    )
    direct: bool = Field(
        default=True,
        description=f"Offer `{DIRECT_ROUTE}` among the choices: delegate to no one, and go on as "
        "without routing (the model answers, its tools and delegates still offered).",
    )
    descriptions: dict[str, str] = Field(
        default_factory=dict,
        description="What each delegate handles, by delegate name, beside the delegate's own "
        "`description`: the words users write (leave, SKU, replicas) route best.",
    )
    examples: list[RoutingExample] = Field(
        default_factory=list,
        max_length=64,
        description="Messages and the route each should take: words of the route for `match`, "
        "solved examples shown to the model for `choose`.",
    )


class Kpi(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="KPI identifier.")
    target: float = Field(description="Target value.")
    direction: Literal["higher", "lower"] = Field(description="Which way is better.")
    unit: str = Field(default="", description="Unit of the value, for reports.")


class AgentManifest(Strict):
    """One agent, as declared by its team."""

    api_version: Literal["fleet/v1"] = Field(alias="apiVersion", description="Manifest schema version.")
    name: str = Field(pattern=NAME_PATTERN, description="Agent name; the API's `model`.")
    version: str = Field(pattern=r"^\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?$", description="Semantic version.")
    role: Literal["orchestration", "domain", "infrastructure"] = Field(description="Agent role.")
    description: str = Field(min_length=1, description="What the agent does, for its card.")
    owner: Owner = Field(description="Business owner.")
    model: ModelRef = Field(default_factory=ModelRef, description="Model backend and sampling.")
    prompt: Prompt = Field(description="System prompt template and its typed variables.")
    tools: list[ToolGrant] = Field(default_factory=list, description="Tools the agent may run.")
    delegates: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(
        default_factory=list, description="Agents this agent may delegate to."
    )
    scopes: list[Annotated[str, Field(pattern=SCOPE_PATTERN)]] = Field(
        default_factory=list, description="Permissions granted to the agent."
    )
    data: list[DataClass] = Field(default_factory=list, description="Data classes the agent may see.")
    policies: Policies = Field(default_factory=Policies, description="Governance settings.")
    sla: Sla = Field(description="Service level targets.")
    autoscaling: Autoscaling = Field(
        default_factory=Autoscaling, description="Ray Serve autoscaling for the agent."
    )
    kpis: list[Kpi] = Field(default_factory=list, description="Business KPIs.")
    memory: MemoryUse = Field(default_factory=MemoryUse, description="Sessions and shared memory.")
    routing: Routing | None = Field(
        default=None,
        description="How the agent picks the delegate for a request before its model speaks "
        "(default: no routing; the model decides through its `delegate_to_<agent>` tools).",
    )
    max_turns: int = Field(default=6, ge=1, le=50, description="Model calls per request, at most.")
    approval_ttl_s: float = Field(
        default=86_400.0,
        gt=0,
        description="How long a gated call (a tool with approval: true, or one a policy escalates) "
        "waits for a person before it is rejected.",
    )
    approval_webhook: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="URL that gets a POST of each approval this agent asks for (retried with backoff).",
    )

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _cross_fields(self) -> AgentManifest:
        names = [t.name for t in self.tools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"tools: duplicate tool names {dupes}")
        for i, grant in enumerate(self.tools):
            if grant.scope not in self.scopes:
                raise ValueError(f"tools[{i}].scope: {grant.scope!r} is not among the agent's scopes")
            missing = sorted(set(grant.data) - set(self.data))
            if missing:
                raise ValueError(f"tools[{i}].data: {missing} are not among the agent's data classes")
        if self.name in self.delegates:
            raise ValueError("delegates: an agent cannot delegate to itself")
        if len(set(self.delegates)) != len(self.delegates):
            raise ValueError("delegates: duplicate entries")
        if self.memory.tools:
            taken = sorted(set(names) & set(MEMORY_TOOL_NAMES))
            if taken:
                raise ValueError(f"tools: {taken} are the memory tools' names (memory.tools is on)")
        for name in self.delegates:
            if delegate_tool_name(name) in names:
                raise ValueError(f"tools: name {delegate_tool_name(name)!r} is reserved")
        return self

    @model_validator(mode="after")
    def _routing_fits(self) -> AgentManifest:
        routing = self.routing
        if routing is None:
            return self
        if not self.delegates:
            raise ValueError("routing: needs delegates to route to")
        if routing.mode == "choose" and self.max_turns < 2:
            raise ValueError("max_turns: `mode: choose` needs 2 at least (the choice, then the answer)")
        if routing.direct and DIRECT_ROUTE in self.delegates:
            raise ValueError(f"routing.direct: {DIRECT_ROUTE!r} is a delegate's name; set direct: false")
        for name in routing.descriptions:
            if name not in self.delegates:
                raise ValueError(f"routing.descriptions.{name}: not among the delegates")
        routes = [*self.delegates, DIRECT_ROUTE] if routing.direct else self.delegates
        for i, example in enumerate(routing.examples):
            if example.route not in routes:
                raise ValueError(f"routing.examples[{i}].route: {example.route!r} is not one of {routes}")
        return self


def delegate_tool_name(agent: str) -> str:
    """The tool name under which the model sees a delegate."""
    return "delegate_to_" + re.sub(r"[^a-zA-Z0-9]", "_", agent)


class AgentSpec(BaseModel):
    """A validated manifest plus what was read from its folder."""

    model_config = ConfigDict(frozen=True)

    manifest: AgentManifest
    folder: Path
    prompt_source: str


def manifest_json_schema() -> dict[str, Any]:
    """JSON Schema of ``agent.yaml`` for editors (``fleet schema``)."""
    schema = AgentManifest.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Fleet agent manifest (fleet/v1)"
    return schema


def _manifest_error(exc: ValidationError, path: Path) -> ConfigError:
    first = exc.errors()[0]
    field, message = field_path(first["loc"]), first["msg"].removeprefix("Value error, ")
    if not field and ": " in message:  # a cross-field check names its field first
        field, message = message.split(": ", 1)
    return ConfigError(message, file=str(path), field=field)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError("file not found", file=str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=str(path)) from None


def load_agent(folder: Path) -> AgentSpec:
    """Read and validate one agent folder (manifest and prompt template)."""
    path = folder / MANIFEST_FILE
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError("a manifest must be a YAML mapping", file=str(path))
    try:
        manifest = AgentManifest.model_validate(raw)
    except ValidationError as exc:
        raise _manifest_error(exc, path) from None
    if manifest.name != folder.name:
        raise ConfigError(
            f"name {manifest.name!r} differs from its folder {folder.name!r}",
            file=str(path),
            field="name",
        )
    return AgentSpec(manifest=manifest, folder=folder, prompt_source=_read_prompt(folder, manifest))


def _read_prompt(folder: Path, manifest: AgentManifest) -> str:
    path = folder / manifest.prompt.template
    try:
        source = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"template {str(path)!r} not found",
            file=str(folder / MANIFEST_FILE),
            field="prompt.template",
        ) from None
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    try:
        used = jinja2.meta.find_undeclared_variables(env.parse(source))
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"line {exc.lineno}: {exc.message}", file=str(path)) from None
    undeclared = sorted(used - set(manifest.prompt.variables) - {"agent"})
    if undeclared:
        raise ConfigError(
            f"template uses undeclared variables {undeclared}",
            file=str(folder / MANIFEST_FILE),
            field="prompt.variables",
        )
    return source


def load_fleet(agents_dir: Path, names: list[str]) -> dict[str, AgentSpec]:
    """Load the named agents; delegates must exist in the set and form no cycle."""
    if not agents_dir.is_dir():
        raise ConfigError(f"agents folder {str(agents_dir)!r} does not exist")
    specs: dict[str, AgentSpec] = {}
    for name in names:
        folder = agents_dir / name
        if not (folder / MANIFEST_FILE).is_file():
            raise ConfigError(f"no agent {name!r}: {str(folder / MANIFEST_FILE)!r} not found")
        specs[name] = load_agent(folder)
    for spec in specs.values():
        for i, other in enumerate(spec.manifest.delegates):
            if other not in specs:
                raise ConfigError(
                    f"delegate {other!r} is not part of this fleet",
                    file=str(spec.folder / MANIFEST_FILE),
                    field=f"delegates[{i}]",
                )
    delegation_order(specs)
    return specs


def delegation_order(specs: dict[str, AgentSpec]) -> list[str]:
    """Agents ordered so that every delegate comes before its callers; cycles are errors."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = [*path[path.index(name) :], name]
            raise ConfigError(
                "delegation cycle " + " -> ".join(cycle),
                file=str(specs[name].folder / MANIFEST_FILE),
                field="delegates",
            )
        state[name] = 1
        for other in specs[name].manifest.delegates:
            visit(other, [*path, name])
        state[name] = 2
        order.append(name)

    for name in specs:
        visit(name, [])
    return order
