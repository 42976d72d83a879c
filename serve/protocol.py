"""The OpenAI chat-completions wire format, in both directions, as far as Fleet speaks it.

Requests are validated strictly (unknown arguments are rejected with the argument
named, as the OpenAI API does); responses are built as plain dicts in the shape the
``openai`` client parses, with Fleet's own fields under the ``fleet`` key; streams are
server-sent events ending in ``[DONE]``; every error leaves as the OpenAI envelope with
its status and headers, built by :func:`error_response`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse

from serve.errors import InvalidRequest, PolicyDenied, RequestError, envelope, field_path

__all__ = [
    "DONE",
    "ChatRequest",
    "ChunkStream",
    "FunctionCall",
    "RunStats",
    "ToolCall",
    "Usage",
    "chunk",
    "completion",
    "completion_id",
    "error_response",
    "extension",
    "parse_chat_request",
    "sse",
]

EXTENSION_KEY = "fleet"


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Wire):
    type: Literal["text"]
    text: str


def _text(content: str | list[TextPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


class FunctionCall(Wire):
    name: str
    arguments: str = Field(description="JSON text, as in the OpenAI API.")


class ToolCall(Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(Wire):
    role: Literal["system", "developer"]
    content: str | list[TextPart]
    name: str | None = None


class UserMessage(Wire):
    role: Literal["user"]
    content: str | list[TextPart]
    name: str | None = None


class AssistantMessage(Wire):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    name: str | None = None
    refusal: str | None = None


class ToolMessage(Wire):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class FunctionDef(Wire):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


class ToolDef(Wire):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Wire):
    name: str


class NamedToolChoice(Wire):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Wire):
    include_usage: bool = False


class ChatRequest(Wire):
    """``POST /v1/chat/completions`` body."""

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: Literal[1] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None
    store: bool | None = None

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as plain OpenAI dicts with text content."""
        out: list[dict[str, Any]] = []
        for m in self.messages:
            item: dict[str, Any] = {"role": m.role}
            if isinstance(m, AssistantMessage):
                item["content"] = _text(m.content) if m.content is not None else None
                if m.tool_calls:
                    item["tool_calls"] = [c.model_dump() for c in m.tool_calls]
            else:
                item["content"] = _text(m.content)
            if isinstance(m, ToolMessage):
                item["tool_call_id"] = m.tool_call_id
            out.append(item)
        return out


_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _param(loc: tuple[int | str, ...]) -> str:
    # A message's role is the discriminator tag pydantic puts after its index
    # (messages[0].user.content); the top-level field `user` must stay.
    kept = [p for i, p in enumerate(loc) if not (p in _ROLES and i and isinstance(loc[i - 1], int))]
    return field_path(tuple(kept))


def parse_chat_request(body: bytes) -> ChatRequest:
    """Parse and validate a request body; errors are 400s naming the parameter."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _param(err["loc"]) or None
        if err["type"] == "extra_forbidden":
            msg = f"Unrecognized request argument supplied: {param}"
        elif err["type"] == "missing":
            msg = f"Missing required parameter: {param}"
        else:
            msg = f"Invalid value for {param}: {err['msg']}" if param else err["msg"]
        raise InvalidRequest(msg, param=param, code="invalid_value") from None
    if isinstance(request.tool_choice, NamedToolChoice):
        name = request.tool_choice.function.name
        if name not in {t.function.name for t in request.tools or []}:
            raise InvalidRequest(
                f"tool_choice names function {name!r}, which is not in tools", param="tool_choice"
            )
    return request


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens

    def wire(self) -> dict[str, int]:
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
) -> dict[str, Any]:
    """Fleet's own fields of a completion (the ``fleet`` key): its ids and what the run did."""
    return {
        "request_id": request_id,
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
        headers["retry-after"] = str(retry_after)
    if isinstance(exc, PolicyDenied):
        headers["x-fleet-decision-id"] = exc.decision_id
    if exc.status == 401:
        headers["www-authenticate"] = "Bearer"
    return JSONResponse(envelope(exc), status_code=exc.status, headers=headers)
