"""The OpenAI chat-completions response, as Fleet writes it.

Responses are plain dicts in the shape the ``openai`` client parses, with Fleet's own
fields under the ``fleet`` key; streams are server-sent events ending in ``[DONE]``; every
error leaves as the OpenAI envelope with its status and headers (:func:`error_response`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from pydantic import BaseModel
from starlette.responses import JSONResponse

from serve.errors import PolicyDenied, RequestError, envelope
from serve.protocol.request import ToolCall

__all__ = [
    "DONE",
    "EXTENSION_KEY",
    "ChunkStream",
    "RunStats",
    "Usage",
    "chunk",
    "completion",
    "completion_id",
    "error_response",
    "extension",
    "sse",
]

EXTENSION_KEY = "fleet"


class Usage(BaseModel):
    """Tokens a call (or a request tree) used, and what they cost: the engines' own counts,
    priced by each agent at its backend's price. ``cost_usd`` is not part of OpenAI's
    ``usage``: it is reported as ``fleet.cost_usd``."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: Decimal = Decimal(0)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd

    def wire(self) -> dict[str, int]:  # OpenAI's fields only
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


def completion(
    *,
    completion_id: str,
    model: str,
    content: str | None,
    tool_calls: list[ToolCall],
    finish_reason: str,
    usage: Usage,
    extension: dict[str, Any],
) -> dict[str, Any]:
    """A ``chat.completion`` object."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = [c.model_dump() for c in tool_calls]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": usage.wire(),
        EXTENSION_KEY: extension,
    }


def chunk(
    *,
    completion_id: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None = None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    extension: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A ``chat.completion.chunk``; ``delta=None`` makes the usage-only final chunk."""
    out: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage is not None:
        out["usage"] = usage.wire()
    if extension is not None:
        out[EXTENSION_KEY] = extension
    return out


def completion_id(request_id: str) -> str:
    """A completion's id: its request's."""
    return "chatcmpl-" + request_id.removeprefix("req_")


class RunStats(Protocol):
    """What an agent's run did, as the ``fleet`` extension reports it."""

    @property
    def turns(self) -> int: ...
    @property
    def tool_calls(self) -> int: ...
    @property
    def tool_failures(self) -> int: ...
    @property
    def invalid_tool_calls(self) -> int: ...
    @property
    def denials(self) -> int: ...
    @property
    def escalations(self) -> int: ...
    @property
    def delegations(self) -> Sequence[str]: ...


def extension(
    *,
    request_id: str,
    trace_id: str | None,
    session_id: str | None,
    agent: str,
    agent_version: str,
    stats: RunStats,
    correlation_id: str | None = None,
    cost_usd: Decimal = Decimal(0),
) -> dict[str, Any]:
    """Fleet's own fields of a completion (the ``fleet`` key): its ids and what the run did."""
    return {
        "request_id": request_id,
        "correlation_id": correlation_id,
        "trace_id": trace_id,
        "session_id": session_id,
        "agent": agent,
        "agent_version": agent_version,
        "turns": stats.turns,
        "tool_calls": stats.tool_calls,
        "tool_failures": stats.tool_failures,
        "invalid_tool_calls": stats.invalid_tool_calls,
        "policy_denials": stats.denials,
        "escalations": stats.escalations,
        "delegations": stats.delegations,
        "cost_usd": f"{cost_usd:f}",
    }


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: the frame of every chunk, error and the closing ``[DONE]``."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


DONE = sse("[DONE]")


@dataclass(frozen=True)
class ChunkStream:
    """The events of one streamed completion, each a ``chat.completion.chunk`` (or an
    error envelope) framed as SSE."""

    completion_id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def piece(self, **fields: Any) -> str:
        return sse(chunk(completion_id=self.completion_id, model=self.model, created=self.created, **fields))

    def opening(self) -> str:
        return self.piece(delta={"role": "assistant", "content": ""})

    def content(self, text: str) -> str:
        return self.piece(delta={"content": text})

    @staticmethod
    def error(exc: RequestError) -> str:
        """A failure after the 200 went out: the envelope, as one event."""
        return sse(envelope(exc))

    def final(
        self,
        *,
        tool_calls: list[ToolCall],
        finish_reason: str,
        usage: Usage,
        extension: dict[str, Any],
        include_usage: bool,
    ) -> list[str]:
        """The last chunks: the tool calls, the finish reason with the ``fleet`` extension,
        and the usage-only chunk when the client asked for it."""
        out = []
        if tool_calls:
            calls = [{"index": i, **c.model_dump()} for i, c in enumerate(tool_calls)]
            out.append(self.piece(delta={"tool_calls": calls}))
        out.append(self.piece(delta={}, finish_reason=finish_reason, extension=extension))
        if include_usage:
            out.append(self.piece(usage=usage))
        return out


def error_response(
    exc: RequestError, retry_after: int = 1, extra: dict[str, str] | None = None
) -> JSONResponse:
    """The OpenAI error envelope of ``exc``, with its status and the headers it calls for."""
    headers = dict(extra or {})
    if exc.status in (429, 503):
        wait = getattr(exc, "retry_after_s", None)  # a rate limit's: when one more fits
        headers["retry-after"] = str(retry_after if wait is None else max(math.ceil(wait), 1))
    if exc.status == 402:  # the official client would retry some statuses by itself
        headers["x-should-retry"] = "false"
        reset = getattr(exc, "retry_after_s", None)
        if reset is not None:  # when the budget's period begins again
            headers["retry-after"] = str(reset)
    if isinstance(exc, PolicyDenied):
        headers["x-fleet-decision-id"] = exc.decision_id
    if exc.status == 401:
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(envelope(exc), status_code=exc.status, headers=headers)
