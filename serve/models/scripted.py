"""``scripted``: a deterministic model for flow tests and reproducible demos.

A script is a list of rules. The first rule whose ``agent`` matches the caller and whose
``match`` regex is found in the last user message answers; its ``replies`` are played in
order, one per model call since that user message (the last one repeats). Strings in a
reply may use ``{input}`` (the last user message), ``{previous}`` (the user message
before it, e.g. from a session's history), ``{tool_result}`` (the last tool
message), ``{system}`` (the system prompt), ``{agent}`` and the regex's named groups. Token counts are whitespace words:
deterministic, not a tokenizer's.

It is stateless (the position comes from the conversation), so any replica of any agent
plays the same script. The script is the whole truth: sampling arguments (``temperature``,
``top_p``, ``seed``, penalties, ``logit_bias``), ``stop``, ``response_format`` and
``parallel_tool_calls`` are ignored; only ``max_tokens`` and ``tool_choice: "none"`` apply.
A ``choice`` does not constrain it either: a script answers an agent's routing call with
the choice as its content (``content: hr-policy-advisor``) or, as a script written for an
agent without routing does, with a call to the delegate's tool; the loop reads either
(:mod:`serve.loop.routing`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.errors import ModelError
from serve.models.base import BackendSettings, ModelChunk, ModelRequest
from serve.policy.pii import StreamRedactor
from serve.protocol import FunctionCall, ToolCall, Usage

__all__ = ["ScriptRule", "ScriptedBackend", "ScriptedConfig"]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WORD = re.compile(r"\S+\s*")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScriptedCall(_Strict):
    name: str = Field(description="Tool to call.")
    arguments: dict[str, Any] | str = Field(
        default_factory=dict, description="Arguments (a mapping, or raw JSON text to test bad input)."
    )


class ScriptedReply(_Strict):
    content: str | None = Field(default=None, description="Text of the reply.")
    tool_calls: list[ScriptedCall] = Field(default_factory=list, description="Tool calls to make.")
    error: str | None = Field(default=None, description="Fail the model call with this message.")
    delay_s: float = Field(default=0.0, ge=0, description="Wait before answering.")


class ScriptRule(_Strict):
    agent: str | None = Field(default=None, description="Only for this agent (default: any).")
    match: str = Field(default="", description="Regex searched in the last user message.")
    replies: list[ScriptedReply] = Field(min_length=1, description="Replies, one per model call.")

    @field_validator("match")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"invalid regex: {exc}") from None
        return value


class ScriptedConfig(BackendSettings):
    kind: Literal["scripted"] = Field(description="Backend kind.")
    script: list[ScriptRule] = Field(min_length=1, description="Rules, first match wins.")
    words_per_chunk: int = Field(default=1, ge=1, description="Streaming granularity.")


def _fill(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        return _PLACEHOLDER.sub(lambda m: variables.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        return {k: _fill(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, variables) for v in value]
    return value


def _words(text: str | None) -> int:
    return len(text.split()) if text else 0


class ScriptedBackend:
    def __init__(self, config: ScriptedConfig) -> None:
        self.config = config
        self._rules = [(rule, re.compile(rule.match)) for rule in config.script]

    async def check_health(self) -> None:
        return None

    def _position(self, messages: list[dict[str, Any]]) -> tuple[str, str, str, int]:
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        last_user = users[-1] if users else -1
        user_text = messages[last_user]["content"] if users else ""
        previous = messages[users[-2]]["content"] if len(users) > 1 else ""
        after = messages[last_user + 1 :]
        turn = sum(1 for m in after if m["role"] == "assistant")
        tool_text = next((m["content"] for m in reversed(after) if m["role"] == "tool"), "")
        return user_text or "", previous or "", tool_text or "", turn

    def _reply(self, request: ModelRequest) -> tuple[ScriptedReply, dict[str, str], int]:
        user_text, previous, tool_text, turn = self._position(request.messages)
        for rule, pattern in self._rules:
            if rule.agent not in (None, request.agent):
                continue
            found = pattern.search(user_text)
            if found is None:
                continue
            system = next((m["content"] for m in request.messages if m["role"] == "system"), "")
            variables = {
                "input": user_text,
                "previous": previous,
                "tool_result": tool_text,
                "agent": request.agent,
                "system": system,
            }
            variables.update({k: v for k, v in found.groupdict().items() if v is not None})
            return rule.replies[min(turn, len(rule.replies) - 1)], variables, turn
        raise ModelError(f"the script has no rule for agent {request.agent!r} and this input")

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        reply, variables, turn = self._reply(request)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.error is not None:
            raise ModelError(_fill(reply.error, variables))
        prompt_tokens = sum(_words(m.get("content")) for m in request.messages)
        content = _fill(reply.content or "", variables)
        calls = [] if request.tool_choice == "none" else reply.tool_calls
        pieces = _WORD.findall(content)
        if request.max_tokens is not None and len(pieces) > request.max_tokens and not calls:
            pieces, finish = pieces[: request.max_tokens], "length"
        else:
            finish = "tool_calls" if calls else "stop"
        step, watch = self.config.words_per_chunk, StreamRedactor() if request.halt_on_pii else None
        for i in range(0, len(pieces), step):
            chunk = "".join(pieces[i : i + step])
            yield ModelChunk(content=chunk)
            if watch is not None and not calls:
                watch.feed(chunk)
                if watch.found:  # as an engine does: the rest is not generated
                    pieces, finish = pieces[: i + step], "content_filter"
                    break
        tool_calls = [self._call(c, variables, turn, i) for i, c in enumerate(calls)]
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=len(pieces) + sum(_words(c.function.arguments) for c in tool_calls),
        )
        yield ModelChunk(tool_calls=tool_calls, finish_reason=finish, usage=usage)

    @staticmethod
    def _call(call: ScriptedCall, variables: dict[str, str], turn: int, index: int) -> ToolCall:
        args = _fill(call.arguments, variables)
        text = args if isinstance(args, str) else json.dumps(args)
        return ToolCall(id=f"call_{turn}_{index}", function=FunctionCall(name=call.name, arguments=text))
