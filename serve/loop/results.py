"""What the loop yields and returns: content deltas, the result, its stats; a delegate as the loop sees it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from serve.context import Carried, Context
from serve.models.base import ModelChunk, ModelRequest
from serve.protocol import ChatRequest, ToolCall, Usage

__all__ = ["AgentResult", "ContentDelta", "DelegateTarget", "Event", "Finished", "ModelCaller", "Stats"]


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
