"""The request context: what travels with a request across replicas and delegations."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from opentelemetry import trace as otel

from serve import telemetry
from serve.policy.schema import Principal

__all__ = ["Carried", "Context"]


@dataclass
class Carried:
    """Audit records and steps handed from one replica to another, to ship with its own."""

    records: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.records or self.events)


@dataclass(frozen=True)
class Context:
    """What travels with a request across delegations."""

    request_id: str
    chain: tuple[str, ...] = ()
    principal: Principal | None = None
    # The most scopes the next agent may act with: its caller's (None: no limit yet).
    scopes: tuple[str, ...] | None = None
    # W3C trace context of the caller's span (``traceparent``), across handles.
    trace: Mapping[str, str] = field(default_factory=dict)
    # The conversation the client continues (sessions are kept by the top-level agent).
    session: str | None = None
    # The request tree's own id, made here: the key of its shared memory. Not the request
    # id, which a client may choose (and so reuse to read another request's context).
    tree: str = field(default_factory=lambda: "tree_" + uuid.uuid4().hex, compare=False)
    # Audit records the caller made and hands over, to ship with this agent's own (the
    # ingress's admission: one audit round trip per request instead of two).
    audit: Carried | None = None

    @staticmethod
    def new(
        request_id: str | None = None,
        principal: Principal | None = None,
        trace: Mapping[str, str] | None = None,
        session: str | None = None,
    ) -> Context:
        return Context(
            request_id=request_id or "req_" + uuid.uuid4().hex,
            principal=principal,
            scopes=tuple(principal.scopes) if principal and principal.scopes is not None else None,
            trace=dict(trace or {}),
            session=session,
        )

    def enter(self, agent: str) -> Context:
        return replace(self, chain=(*self.chain, agent))

    def traced(self, span: otel.Span) -> Context:
        """This context, with ``span`` as the parent of what the next agent does."""
        return replace(self, trace=telemetry.carrier(span))
