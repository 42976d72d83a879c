"""What the loop yields and returns: content deltas, the result, its stats; a delegate as the loop sees it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from serve.context import Carried, Context
from serve.models.base import ModelChunk, ModelRequest
from serve.protocol import ChatRequest, ToolCall, Usage

__all__ = [
    "AgentResult",
    "ContentDelta",
    "DelegateTarget",
    "Event",
    "Finished",
    "Gate",
    "ModelCaller",
    "Runs",
    "Stats",
]


@dataclass
class Stats:
    turns: int = 0
    tool_calls: int = 0
    tool_failures: int = 0
    invalid_tool_calls: int = 0
    denials: int = 0
    escalations: int = 0
    delegations: list[str] = field(default_factory=list)


@dataclass
class AgentResult:
    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str
    usage: Usage
    stats: Stats
    # This exchange as a session keeps it: the request's messages (as the model saw
    # them, after redaction) and the answer.
    transcript: list[dict[str, Any]] = field(default_factory=list)
    # A delegate's audit records and steps, for its caller to ship with its own.
    audit: Carried | None = None
    # The turn stopped to wait for people: its id in the approvals store, and the approvals
    # (public fields) it and its delegates wait for.
    parked: str | None = None
    approvals: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Gate:
    """A call of a turn that waits: for a person's approval (``decision_id``: the policy's
    escalation, or the manifest's ``approval: true``), or for a delegate's parked turn
    (``child``), whose own approvals are ``approvals``."""

    call_id: str
    tool: str
    arguments: dict[str, Any]
    ttl_s: float
    decision_id: str | None = None
    child: str | None = None
    approvals: tuple[dict[str, Any], ...] = ()


class Runs(Protocol):
    """The one run of each approved call (serve/approvals/): ``start`` claims it durably
    before the call starts, ``ran`` records its outcome."""

    async def start(self, approval_id: str) -> tuple[str, str | None]:
        """``("start", None)``: run it now; ``("done", outcome)``: it ran already;
        ``("unknown", None)``: a run started and was lost; ``("refused", None)``: not approved."""

    async def ran(self, approval_id: str, outcome: str, status: str) -> None: ...


@dataclass(frozen=True)
class DelegateTarget:
    """Another agent, as the loop sees it: a description for the model and a call."""

    description: str
    call: Callable[[ChatRequest, Context], Awaitable[AgentResult]]
    scopes: tuple[str, ...] = ()
    data: tuple[str, ...] = ()  # data classes its answers may hold (the caller must be granted them)


@dataclass
class ContentDelta:
    text: str


@dataclass
class Finished:
    result: AgentResult


Event = ContentDelta | Finished
ModelCaller = Callable[[ModelRequest], AsyncIterator[ModelChunk]]
