"""Governance: who may call, and the decision that every governed step goes through.

:class:`GovernanceConfig` is the ``governance`` section of a deploy config. Each replica
(ingress and agents) holds a :class:`Governor`: it asks the policy engine at a decision
point, fails closed, evaluates shadow policies beside the enforced ones, and hands one
audit record per decision to the audit service. The agent loop reaches it through
:class:`serve.policy.guard.AgentGuard`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, model_validator

from serve.audit import canonical
from serve.errors import ConfigError, Unauthorized
from serve.loop import Context
from serve.policy.engine import (
    EncodedInput,
    OpaEngine,
    PolicyEngine,
    PolicyFailure,
    RegoEngine,
    encode_input,
    load_modules,
)
from serve.policy.pii import redact, scan
from serve.policy.schema import INPUT_VERSION, POINTS, AgentFacts, Outcome, Point, Principal

__all__ = [
    "ANONYMOUS",
    "AuditSink",
    "Decision",
    "GovernanceConfig",
    "Governor",
    "TenantKey",
    "authenticate",
    "hash_key",
]

REDACTING_POINTS = frozenset({"model_input", "model_output", "data"})
_JSON_ACTION: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])
ANONYMOUS = Principal(tenant="anonymous", roles=["anonymous"], authenticated=False)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TenantKey(_Strict):
    tenant: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$", description="Tenant the key belongs to.")
    key_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$", description="SHA-256 (hex) of the API key; never the key."
    )
    roles: list[str] = Field(default_factory=list, description="Roles policies see for this key.")
    scopes: list[str] | None = Field(
        default=None, description="Most scopes an agent may use for this key (default: no limit)."
    )


class EngineConfig(_Strict):
    kind: Literal["rego", "opa"] = Field(default="rego", description="regopy in-process, or an OPA server.")
    url: str | None = Field(default=None, description="OPA server (kind opa), e.g. http://127.0.0.1:8181.")
    timeout_s: float = Field(default=0.5, gt=0, le=30, description="OPA request timeout (then deny).")

    @model_validator(mode="after")
    def _url(self) -> EngineConfig:
        if self.kind == "opa" and not self.url:
            raise ValueError("url: an OPA engine needs the server's url")
        return self


class AuditConfig(_Strict):
    path: str = Field(
        default="var/audit/audit.jsonl", description="Audit log file (relative: from the project root)."
    )
    commit_timeout_s: float = Field(
        default=10.0, gt=0, description="How long a request waits for its records to be durable (then 503)."
    )


class GovernanceConfig(_Strict):
    policies: list[str] = Field(
        default_factory=lambda: ["configs/policies"],
        description="Rego modules and policy data (*.rego, *.yaml): files or folders.",
    )
    shadow: list[str] = Field(
        default_factory=list,
        description="Rego modules evaluated and audited beside the enforced ones, never enforced.",
    )
    engine: EngineConfig = Field(default_factory=EngineConfig, description="Where policies are evaluated.")
    tenants: list[TenantKey] = Field(
        default_factory=list,
        description="API keys (hashed). None listed: auth is off, callers are 'anonymous'.",
    )
    audit: AuditConfig = Field(default_factory=AuditConfig, description="The audit log.")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def authenticate(authorization: str | None, tenants: list[TenantKey]) -> Principal:
    """The principal of an ``Authorization: Bearer <key>`` header."""
    if not tenants:
        return ANONYMOUS
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'")
    presented = hash_key(key.strip())
    found = None
    for tenant in tenants:  # every entry is compared: the time does not tell which matched
        if hmac.compare_digest(presented, tenant.key_sha256):
            found = tenant
    if found is None:
        raise Unauthorized("Incorrect API key provided")
    return Principal(tenant=found.tenant, roles=list(found.roles), authenticated=True, scopes=found.scopes)


def _resolve(root: Path, items: list[str]) -> list[Path]:
    paths = [Path(p) if Path(p).is_absolute() else root / p for p in items]
    for path in paths:
        if not path.exists():
            raise ConfigError("no such policy file or folder", file=str(path), field="governance.policies")
    return paths


def load_data(paths: list[Path]) -> dict[str, Any]:
    """Policy data (``*.yaml`` beside the modules), merged, as ``data.config``."""
    merged: dict[str, Any] = {}
    for path in paths:
        for file in (
            sorted(path.glob("*.yaml")) if path.is_dir() else [path] if path.suffix == ".yaml" else []
        ):
            try:
                merged.update(yaml.safe_load(file.read_text()) or {})
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"invalid policy data: {exc}", file=str(file)) from None
    return {"config": merged}


Shadow = tuple[PolicyEngine, frozenset[Point]]


def build_engines(
    config: GovernanceConfig,
    root: Path,
    extra: list[str] = (),  # type: ignore[assignment]
    *,
    memo: bool = True,
) -> tuple[PolicyEngine, Shadow | None]:
    """The enforced engine, and the shadow one with the points its modules change."""
    for item in extra:  # an agent adds rules, never data that would override the platform's
        if not item.endswith(".rego"):
            raise ConfigError("an agent's policies.files may only name .rego modules", file=item)
    paths = _resolve(root, [*config.policies, *extra])
    modules = [m for m in load_modules(paths) if m.path.endswith(".rego")]
    data = load_data(paths)
    local = RegoEngine(modules, data, memo=memo)  # compiled even for OPA: a bad file fails the deploy
    engine: PolicyEngine = local
    if config.engine.kind == "opa":
        assert config.engine.url is not None
        engine = OpaEngine(config.engine.url, config.engine.timeout_s)
    if not config.shadow:
        return engine, None
    shadow_modules = load_modules(_resolve(root, config.shadow))
    replaced = {m.package for m in shadow_modules}
    kept = [m for m in modules if m.package not in replaced]
    points = {p for p in POINTS if f"fleet.{p}" in replaced}
    if replaced - {f"fleet.{p}" for p in POINTS}:  # a shared module changed: every point may
        points = set(POINTS)
    return engine, (RegoEngine([*kept, *shadow_modules], data, memo=memo), frozenset(points))


@dataclass(frozen=True)
class Decision:
    id: str
    point: Point
    outcome: Outcome
    reasons: list[str]
    policy: str
    version: str

    @property
    def allowed(self) -> bool:
        """Whether the step may go on; ``redact`` only where there is content to redact."""
        return self.outcome == "allow" or (self.outcome == "redact" and self.point in REDACTING_POINTS)


class AuditSink(Protocol):
    def append(self, record: dict[str, Any]) -> None: ...

    def event(self, event: dict[str, Any]) -> None: ...


class Governor:
    """Decisions for one replica: policy, fail closed, shadow, one audit record each."""

    def __init__(
        self,
        engine: PolicyEngine,
        shadow: Shadow | None,
        sink: AuditSink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine, self._shadow, self._sink, self._clock = engine, shadow, sink, clock
        # The principal and agent facts of recent decisions, as JSON and canonical JSON, by
        # identity: a request's decisions share them (its guard keeps one AgentFacts per
        # scope set), so each is dumped and encoded once, not once per decision.
        self._dumped: dict[int, tuple[Principal | AgentFacts, dict[str, Any], bytes]] = {}

    def decide(
        self, point: Point, ctx: Context, agent: AgentFacts, action: dict[str, Any], label: str
    ) -> Decision:
        # The PolicyInput document (``fleet.policy/v1``), built as the dict its model dumps
        # to (a test holds the two equal): validating it again per decision cost more than
        # the decision.
        chain = list(ctx.chain)
        principal, principal_json = self._dump(ctx.principal or ANONYMOUS)
        facts, facts_json = self._dump(agent)
        # As the model dumps it (~1 µs): NaN and infinities (json.loads reads them in a model's
        # tool arguments) become null, a set a list.
        action = _JSON_ACTION.dump_python(action, mode="json")
        encoded = encode_input(point, ctx.request_id, chain, principal_json, facts_json, action)
        # Engines read the document and never change it: its principal and agent parts are
        # shared by a replica's decisions.
        document = {
            "version": INPUT_VERSION,
            "point": point,
            "request": {"id": ctx.request_id, "chain": chain},
            "principal": principal,
            "agent": facts,
            "action": action,
        }
        input_sha = hashlib.sha256(encoded.whole).hexdigest()
        decision = self._evaluate(self._engine, point, document, encoded)
        self._audit(ctx, agent.name, label, decision, input_sha, enforced=True)
        if self._shadow is not None and point in self._shadow[1]:
            shadow = self._evaluate(self._shadow[0], point, document, encoded)
            self._audit(ctx, agent.name, label, shadow, input_sha, enforced=False)
        return decision

    def _dump(self, model: Principal | AgentFacts) -> tuple[dict[str, Any], bytes]:
        hit = self._dumped.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1], hit[2]
        if len(self._dumped) >= 256:  # principals arrive with each request: keep the recent ones
            self._dumped.clear()
        dumped = model.model_dump(mode="json")
        encoded = canonical(dumped)
        self._dumped[id(model)] = (model, dumped, encoded)
        return dumped, encoded

    def _evaluate(
        self, engine: PolicyEngine, point: Point, document: dict[str, Any], encoded: EncodedInput
    ) -> Decision:
        policy, version = engine.describe(point)
        decision_id = "dec_" + os.urandom(10).hex()
        try:
            result = engine.evaluate(point, document, encoded)
        except PolicyFailure as exc:  # fail closed
            return Decision(decision_id, point, "deny", [f"policy failed, denied: {exc}"], policy, version)
        except Exception as exc:  # an engine bug or a malformed answer: still closed
            reason = f"policy failed, denied: {type(exc).__name__}"
            return Decision(decision_id, point, "deny", [reason], policy, version)
        return Decision(decision_id, point, result.outcome, result.reasons, policy, version)

    def _audit(
        self, ctx: Context, agent: str, label: str, d: Decision, input_sha: str, *, enforced: bool
    ) -> None:
        principal = ctx.principal or ANONYMOUS
        self._sink.append(
            {
                "time": round(self._clock(), 6),
                "request_id": ctx.request_id,
                "decision_id": d.id,
                "tenant": principal.tenant,
                "agent": agent,
                "point": d.point,
                "action": label,
                "policy": d.policy,
                "policy_version": d.version,
                "outcome": d.outcome,
                "enforced": enforced,
                # A policy may quote what it saw: reasons are scrubbed like any output.
                "reasons": [redact(r, scan(r)) for r in d.reasons],
                "input_sha256": input_sha,
            }
        )

    def event(self, ctx: Context, kind: str, **fields: Any) -> None:
        """A step for the request's explanation report (no content, no PII)."""
        principal = ctx.principal or ANONYMOUS
        self._sink.event(
            {
                "time": round(self._clock(), 6),
                "request_id": ctx.request_id,
                "tenant": principal.tenant,
                "kind": kind,
                **fields,
            }
        )
