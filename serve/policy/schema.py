"""The policy input document (``fleet.policy/v1``) and the decision a policy returns.

This is a compatibility contract: Rego modules read these fields. A change that removes
or renames a field is a new version. The JSON Schema is exported to
``docs/policy-input.schema.json`` (``fleet schema --policy-input``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "INPUT_VERSION",
    "POINTS",
    "AgentFacts",
    "Outcome",
    "Point",
    "PolicyInput",
    "PolicyResult",
    "Principal",
    "RequestFacts",
    "policy_input_json_schema",
]

Point = Literal[
    "ingress", "model_input", "model_output", "tool", "delegation", "data", "memory", "budget", "approval"
]
POINTS: tuple[Point, ...] = (
    "ingress",
    "model_input",
    "model_output",
    "tool",
    "delegation",
    "data",
    "memory",
    "budget",
    "approval",
)
Outcome = Literal["allow", "deny", "redact", "escalate"]
INPUT_VERSION: Literal["fleet.policy/v1"] = "fleet.policy/v1"


class _Doc(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Principal(_Doc):
    tenant: str = Field(description="Tenant the API key belongs to ('anonymous' when auth is off).")
    roles: list[str] = Field(default_factory=list, description="Roles of the key.")
    authenticated: bool = Field(description="Whether a valid API key was presented.")
    scopes: list[str] | None = Field(
        default=None, description="Scopes the key may grant agents (null: no limit beyond the agent's own)."
    )


class RequestFacts(_Doc):
    id: str = Field(description="Fleet request id.")
    chain: list[str] = Field(description="Agents from the ingress to this one, in call order.")


class AgentFacts(_Doc):
    name: str
    version: str
    role: str
    scopes: list[str] = Field(description="Effective scopes: declared, narrowed by the caller and the key.")
    declared_scopes: list[str] = Field(description="Scopes the manifest declares.")
    data: list[str] = Field(description="Data classes the agent may see.")
    pii: Literal["allow", "redact", "block"] = Field(description="The manifest's PII mode.")
    compliance: list[str] = Field(description="Compliance tags (gdpr, soc2, ...).")
    delegates: list[str]


class PolicyInput(_Doc):
    """``input`` of every decision. ``action`` depends on ``point``:

    - ingress: ``{"agent": name}`` (the agent the principal calls; ``agent`` is that agent)
    - model_input / model_output: ``{"pii": [kinds], "turn": n}``
    - tool: ``{"tool": name, "known": b, "scope": s, "approval": b, "arguments": {...}}``
      (``known``: the agent has this tool; ``scope``/``approval`` from its grant)
    - delegation: ``{"target": name, "target_scopes": [...]}``
    - data: ``{"tool": name, "classes": [...], "pii": [kinds]}`` (a tool's result)
    - memory: ``{"operation": "read"|"write", "store": "context"|"artifacts"|"facts",
      "namespace": ns}`` (``namespace`` for facts; null for the request's shared context)
    - budget: ``{"budget": name, "amount": usd, "left": usd, "limit": usd}`` (a model
      call's worst case that the named budget cannot cover; amounts are decimal strings;
      ``allow`` lets the call overdraw it)
    - approval: ``{"operation": "approve"|"reject"|"view", "approval": id, "tool": name,
      "requester": id, "requester_tenant": t, "decider": id}`` (``principal`` is who decides
      or looks; ``agent`` the agent whose call waits; ids as ``<tenant>:<16 hex>``)
    """

    version: Literal["fleet.policy/v1"] = INPUT_VERSION
    point: Point
    request: RequestFacts
    principal: Principal
    agent: AgentFacts
    action: dict[str, Any]


class PolicyResult(_Doc):
    """What ``data.fleet.<point>.decision`` must evaluate to."""

    outcome: Outcome
    reasons: list[str] = Field(default_factory=list, description="Why, for the audit log and the caller.")


def policy_input_json_schema() -> dict[str, Any]:
    """JSON Schema of the policy input (``docs/policy-input.schema.json``)."""
    schema = PolicyInput.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Fleet policy input (fleet.policy/v1)"
    return schema
