"""Agent cards: the public description of an agent, and the facts policies see of it.

``GET /v1/agents/{name}`` answers a card's JSON (:meth:`AgentCard.wire`). The ingress
(which holds no manifests) and each agent's guard decide on the same
:class:`~serve.policy.schema.AgentFacts`, derived here from a card in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from serve.manifest import AgentSpec, Autoscaling, Kpi, MemoryUse, Owner, Policies, Sla, ToolGrant
from serve.policy.schema import AgentFacts

__all__ = ["AgentCard", "CardTool"]

# Scope sets a card keeps facts for: a few per agent in practice (subsets of its own),
# but API keys with many different scopes must not grow it without end.
MAX_SCOPE_SETS = 1024


class CardTool(ToolGrant):
    """A tool the agent may run: its grant, and what it does."""

    description: str | None = Field(
        description="What the tool does, as its model is told; null on a card built without "
        "the agent's tool module (a guard's, which only derives facts)."
    )


class AgentCard(BaseModel):
    """The public description of an agent (``GET /v1/agents/{name}``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    object: Literal["agent"] = Field(default="agent", description="OpenAI-style object type.")
    name: str = Field(description="Agent name; the API's `model`.")
    version: str = Field(description="The manifest's semantic version.")
    role: Literal["orchestration", "domain", "infrastructure"] = Field(description="Agent role.")
    description: str = Field(description="What the agent does.")
    owner: Owner = Field(description="Business owner.")
    model: str = Field(description="The model backend it calls.")
    tools: list[CardTool] = Field(description="Tools it may run.")
    delegates: list[str] = Field(description="Agents it may delegate to.")
    scopes: list[str] = Field(description="Scopes it declares.")
    data: list[str] = Field(description="Data classes it may see.")
    policies: Policies = Field(description="Its governance settings.")
    sla: Sla = Field(description="Service level targets.")
    kpis: list[Kpi] = Field(description="Business KPIs.")
    autoscaling: Autoscaling = Field(description="Replica scaling.")
    max_turns: int = Field(description="Model calls per request, at most.")
    memory: MemoryUse = Field(description="Sessions and shared memory.")

    # One AgentFacts per set of effective scopes, so the governor encodes each once (it
    # keys its encodings by identity).
    _facts: dict[tuple[str, ...] | None, AgentFacts] = PrivateAttr(default_factory=dict)

    @classmethod
    def of(cls, spec: AgentSpec, descriptions: Mapping[str, str] | None = None) -> AgentCard:
        """The card of ``spec``; ``descriptions`` are its tools' (None: not loaded)."""
        m = spec.manifest
        tools = [
            CardTool(**g.model_dump(), description=None if descriptions is None else descriptions[g.name])
            for g in m.tools
        ]
        return cls(
            name=m.name,
            version=m.version,
            role=m.role,
            description=m.description,
            owner=m.owner,
            model=m.model.backend,
            tools=tools,
            delegates=list(m.delegates),
            scopes=list(m.scopes),
            data=list(m.data),
            policies=m.policies,
            sla=m.sla,
            kpis=list(m.kpis),
            autoscaling=m.autoscaling,
            max_turns=m.max_turns,
            memory=m.memory,
        )

    def wire(self) -> dict[str, Any]:
        """The card as ``GET /v1/agents/{name}`` answers it."""
        return self.model_dump(mode="json")

    def facts(self, scopes: Sequence[str] | None) -> AgentFacts:
        """The agent as policies see it, acting with its scopes narrowed to ``scopes``
        (None: not narrowed). The same object for the same scopes."""
        key = None if scopes is None else tuple(scopes)
        facts = self._facts.get(key)
        if facts is None:
            if len(self._facts) >= MAX_SCOPE_SETS:
                self._facts.clear()
            facts = self._facts[key] = AgentFacts(
                name=self.name,
                version=self.version,
                role=self.role,
                scopes=list(self.scopes) if key is None else [s for s in self.scopes if s in key],
                declared_scopes=list(self.scopes),
                data=list(self.data),
                pii=self.policies.pii,
                compliance=list(self.policies.compliance),
                delegates=list(self.delegates),
            )
        return facts
