"""``openai``: any OpenAI-compatible upstream (an external vLLM server, a hosted API).

The request's sampling arguments, ``response_format`` (as the client wrote it: the
upstream applies it to the answer, not to tool calls) and ``parallel_tool_calls`` are
passed on; the upstream enforces them.

A ``choice`` request is asked as a named call of one tool, ``choose``, whose one argument
is an enum of the choices (named tool choices are what OpenAI-compatible upstreams,
vLLM's server among them, all constrain); the reply's content is the argument.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from serve.errors import InvalidRequest, ModelError
from serve.models.base import BackendSettings, ModelChunk, ModelRequest
from serve.protocol import FunctionCall, ToolCall, Usage

if TYPE_CHECKING:
    import openai

__all__ = ["OpenAIBackend", "OpenAIConfig"]

# Sampling arguments the upstream is given as the agent's request has them. The client's
# hints that do not change the answer (service_tier, caching keys, user ids, reasoning
# effort) stay at Fleet: tiers would change the upstream's price under Fleet's cost
# accounting, and end-user ids are the tenant's, not the upstream provider's.
_PASSED = ("max_tokens", "temperature", "top_p", "stop", "seed", "presence_penalty", "frequency_penalty")
CHOOSE = "choose"  # the tool a choice request is asked as


class OpenAIConfig(BackendSettings):
    kind: Literal["openai"] = Field(description="Backend kind.")
    base_url: str = Field(description="Upstream base URL, e.g. http://vllm:8000/v1.")
    model: str = Field(description="Model name the upstream serves.")
    api_key_env: str | None = Field(
        default=None, description="Environment variable holding the upstream API key."
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Per-call timeout.")
    max_retries: int = Field(default=2, ge=0, description="Client retries on connection errors.")


class _Accumulator:
    """Joins streamed tool-call fragments (by index) into whole calls."""

    def __init__(self) -> None:
        self.calls: dict[int, dict[str, str]] = {}

    def add(self, deltas: list[Any]) -> None:
        for d in deltas:
            slot = self.calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] = d.id or slot["id"]
            if d.function is not None:
                slot["name"] += d.function.name or ""
                slot["arguments"] += d.function.arguments or ""

    def result(self) -> list[ToolCall]:
        return [
            ToolCall(
                id=c["id"] or f"call_{i}", function=FunctionCall(name=c["name"], arguments=c["arguments"])
            )
            for i, c in sorted(self.calls.items())
        ]


class OpenAIBackend:
    def __init__(self, config: OpenAIConfig) -> None:
        # Imported here: the openai package costs an agent replica 0.8 s to import, and only
        # a replica that calls an upstream model needs it (replica start is on the
        # autoscaler's path).
        import openai

        self.config = config
        key = os.environ.get(config.api_key_env, "") if config.api_key_env else ""
        self._client: openai.AsyncOpenAI = openai.AsyncOpenAI(
            base_url=config.base_url,
            api_key=key or "unused",
            timeout=config.timeout_s,
            max_retries=config.max_retries,
        )

    async def check_health(self) -> None:
        return None

    def _params(self, request: ModelRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.config.model,
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.choice is not None:
            params["tools"] = [_choice_tool(request.choice)]
            params["tool_choice"] = {"type": "function", "function": {"name": CHOOSE}}
        elif request.tools:
            params["tools"] = request.tools
            params["tool_choice"] = request.tool_choice
            if request.parallel_tool_calls is not None:  # upstreams refuse it without tools
                params["parallel_tool_calls"] = request.parallel_tool_calls
        for key in _PASSED:
            value = getattr(request, key)
            if value is not None:
                params[key] = value
        if request.logit_bias is not None:
            params["logit_bias"] = {str(token): bias for token, bias in request.logit_bias.items()}
        if request.response_format is not None:
            params["response_format"] = request.response_format.model_dump(by_alias=True, exclude_none=True)
        return params

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        import openai

        calls = _Accumulator()
        finish: Any = None
        usage: Usage | None = None
        try:
            response = await self._client.chat.completions.create(**self._params(request))
            async for event in response:
                if event.usage is not None:
                    usage = Usage(
                        prompt_tokens=event.usage.prompt_tokens,
                        completion_tokens=event.usage.completion_tokens,
                    )
                for choice in event.choices:
                    finish = choice.finish_reason or finish
                    if choice.delta.tool_calls:
                        calls.add(choice.delta.tool_calls)
                    if choice.delta.content and request.choice is None:  # a choice is its call's
                        yield ModelChunk(content=choice.delta.content)
        except openai.BadRequestError as exc:
            raise InvalidRequest(f"the model rejected the request: {exc.message}", param="messages") from None
        except openai.APIError as exc:
            raise ModelError(f"upstream model failed: {type(exc).__name__}: {exc.message}") from None
        tool_calls = calls.result()
        if request.choice is not None:
            yield ModelChunk(content=_chosen(tool_calls), finish_reason="stop", usage=usage or Usage())
            return
        if finish not in ("stop", "length", "tool_calls"):
            finish = "tool_calls" if tool_calls else "stop"
        yield ModelChunk(tool_calls=tool_calls, finish_reason=finish, usage=usage or Usage())


def _choice_tool(choice: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": CHOOSE,
            "description": "Give your choice.",
            "parameters": {
                "type": "object",
                "properties": {"choice": {"type": "string", "enum": list(choice)}},
                "required": ["choice"],
                "additionalProperties": False,
            },
        },
    }


def _chosen(calls: list[ToolCall]) -> str:
    """The choice a ``choose`` call made ("" if the upstream made none: no choice)."""
    for call in calls:
        if call.function.name != CHOOSE:
            continue
        try:
            value = json.loads(call.function.arguments).get("choice")
        except (ValueError, AttributeError):
            return ""
        return value if isinstance(value, str) else ""
    return ""
