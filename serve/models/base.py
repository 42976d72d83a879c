"""The one interface every model backend implements: chat with tools, streamed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.budget.price import Price
from serve.protocol import ResponseFormat, ToolCall, Usage

__all__ = ["BackendSettings", "ModelBackend", "ModelChunk", "ModelReply", "ModelRequest", "collect"]


class BackendSettings(BaseModel):
    """Settings every backend kind shares (the kind's own config adds to them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inline: bool = Field(
        default=False,
        description="Run the backend inside each agent replica instead of as its own shared "
        "deployment (saves one handle hop; for backends that hold no engine).",
    )
    price: Price | None = Field(
        default=None,
        description="What its tokens cost (USD per million; strings, read as Decimal). Unset: "
        "its calls cost nothing, and no budget refuses them.",
    )
    max_queued_requests: int | None = Field(
        default=None,
        ge=1,
        description="Model calls each agent replica queues for the backend's deployment while its "
        "replicas are full; one more is refused at once (503, Retry-After). Unset: the deployment's "
        "max_ongoing_requests (2 x max_num_seqs for vllm, 512 otherwise). Not for inline backends.",
    )

    @model_validator(mode="after")
    def _queue_needs_a_deployment(self) -> BackendSettings:
        if self.inline and self.max_queued_requests is not None:
            raise ValueError("max_queued_requests bounds a deployment's queue; an inline backend has none")
        return self


class ModelRequest(BaseModel):
    """One model call made by an agent turn."""

    model_config = ConfigDict(frozen=True)

    agent: str = Field(description="Calling agent, for scripted backends and metrics.")
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] = "auto"
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[int, int] | None = Field(default=None, description="Token id -> bias (-100..100).")
    response_format: ResponseFormat | None = Field(
        default=None,
        description="The answer's format. A reply that calls a tool is not bound by it: only an answer is.",
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="false: at most one tool call per reply."
    )
    stream: bool = Field(
        default=True,
        description="Whether the caller streams; a deployment answers unary calls in one piece.",
    )
    halt_on_pii: bool = Field(
        default=False,
        description="Stop generating at the answer's first PII (finish_reason `content_filter`): set by "
        "an agent whose manifest blocks PII, whose policy would withhold the whole answer anyway. "
        "The agent's policy still decides on the text said until then.",
    )
    choice: list[str] | None = Field(
        default=None,
        min_length=1,
        description="A constrained choice: the reply's content is exactly one of these strings "
        "(vLLM structured outputs' `choice`; a named tool call upstream). An agent's routing call "
        "(serve/loop/routing.py) picks a delegate so; it offers no tools.",
    )

    @model_validator(mode="after")
    def _a_choice_offers_no_tools(self) -> ModelRequest:
        if self.choice is not None and self.tools:
            raise ValueError("a choice call offers no tools")
        return self


# OpenAI's finish reasons; ``content_filter``: stopped at PII (``ModelRequest.halt_on_pii``).
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


class ModelChunk(BaseModel):
    """A piece of a streamed reply. Tool calls arrive whole, in the last chunks."""

    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


class ModelReply(BaseModel):
    content: str = ""
    tool_calls: list[ToolCall] = Field(default_factory=list)
    finish_reason: FinishReason = "stop"
    usage: Usage = Field(default_factory=Usage)


class ModelBackend(Protocol):
    """What an agent needs from a model. Implementations raise ``ModelError``."""

    def stream(self, request: ModelRequest) -> AsyncIterator[ModelChunk]: ...

    async def check_health(self) -> None: ...


async def collect(chunks: AsyncIterator[ModelChunk]) -> ModelReply:
    """Fold a stream into one reply."""
    reply = ModelReply()
    parts: list[str] = []
    async for piece in chunks:
        parts.append(piece.content)
        reply.tool_calls.extend(piece.tool_calls)
        if piece.finish_reason:
            reply.finish_reason = piece.finish_reason
        if piece.usage:
            reply.usage.add(piece.usage)
    reply.content = "".join(parts)
    return reply
