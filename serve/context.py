"""The request context: what travels with a request across replicas and delegations."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from opentelemetry import trace as otel

from serve import telemetry
from serve.policy.schema import Principal

__all__ = ["ANONYMOUS_ID", "Carried", "Context", "new_id"]

# Who wrote a session, when no key says so (auth off): every caller is this one.
ANONYMOUS_ID = "anonymous"


def new_id(prefix: str) -> str:
    """An id the server makes: 128 random bits from the OS, so nobody can guess another's."""
    return prefix + secrets.token_hex(16)


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

    # Fleet's own id of the request, always made by the server (``new_id``): what the
    # audit log, explanations, budgets and outcomes key on.
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
    # id, which the client is told (and so could name to read another request's context).
    tree: str = field(default_factory=lambda: new_id("tree_"), compare=False)
    # Audit records the caller made and hands over, to ship with this agent's own (the
    # ingress's admission: one audit round trip per request instead of two).
    audit: Carried | None = None
    # Who the principal is, to the key: ``<tenant>:<first 16 hex of its key's SHA-256>``,
    # or ``anonymous``. A session belongs to it (not to the whole tenant).
    principal_id: str = ANONYMOUS_ID
    # The client's ``X-Request-ID`` (else the one Ray's proxy made), kept beside the
    # request id to correlate with the client's and Ray's own logs; never a key.
    correlation_id: str | None = None
    # The most this call's subtree may spend, in USD (None: no limit from its caller): what
    # the caller's purse had left when it delegated (serve/budget/purse.py).
    allowance: Decimal | None = None

    @staticmethod
    def new(
        request_id: str | None = None,
        principal: Principal | None = None,
        trace: Mapping[str, str] | None = None,
        session: str | None = None,
        *,
        principal_id: str | None = None,
        correlation_id: str | None = None,
    ) -> Context:
        if principal_id is None:  # no key known (a test, a harness): the tenant, else anonymous
            principal_id = principal.tenant if principal and principal.authenticated else ANONYMOUS_ID
        return Context(
            request_id=request_id or new_id("req_"),
            principal=principal,
            scopes=tuple(principal.scopes) if principal and principal.scopes is not None else None,
            trace=dict(trace or {}),
            session=session,
            principal_id=principal_id,
            correlation_id=correlation_id,
        )

    def to_dict(self) -> dict[str, Any]:
        """This context as JSON, for a parked turn (its carried records are not kept: they ship first)."""
        return {
            "request_id": self.request_id,
            "chain": list(self.chain),
            "principal": None if self.principal is None else self.principal.model_dump(mode="json"),
            "scopes": None if self.scopes is None else list(self.scopes),
            "trace": dict(self.trace),
            "session": self.session,
            "tree": self.tree,
            "principal_id": self.principal_id,
            "correlation_id": self.correlation_id,
            "allowance": None if self.allowance is None else f"{self.allowance:f}",
        }

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> Context:
        principal = data.get("principal")
        allowance = data.get("allowance")
        scopes = data.get("scopes")
        return Context(
            request_id=data["request_id"],
            chain=tuple(data["chain"]),
            principal=None if principal is None else Principal.model_validate(principal),
            scopes=None if scopes is None else tuple(scopes),
            trace=dict(data.get("trace") or {}),
            session=data.get("session"),
            tree=data["tree"],
            principal_id=data["principal_id"],
            correlation_id=data.get("correlation_id"),
            allowance=None if allowance is None else Decimal(allowance),
        )

    def enter(self, agent: str) -> Context:
        return replace(self, chain=(*self.chain, agent))

    def traced(self, span: otel.Span) -> Context:
        """This context, with ``span`` as the parent of what the next agent does."""
        return replace(self, trace=telemetry.carrier(span))
