"""The OpenAI chat-completions request, as Fleet reads it: strict, every argument known.

Unknown arguments are rejected with the argument named, as the OpenAI API does. Every
argument the official ``openai`` client can send is known: honoured (sampling,
``response_format``), accepted where it cannot change the answer (``service_tier``,
caching hints, ``user``), or refused with a 400 naming it when its value cannot be
honoured (``n`` above 1, audio, ``logprobs``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.errors import InvalidRequest, field_path

__all__ = [
    "ChatRequest",
    "FunctionCall",
    "JsonObjectFormat",
    "JsonSchemaFormat",
    "JsonSchemaSpec",
    "NamedToolChoice",
    "ResponseFormat",
    "TextFormat",
    "ToolCall",
    "UserMessage",
    "parse_chat_request",
]


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Wire):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = Field(
        default=None, description="A prompt-caching hint; accepted, no effect (vLLM caches prefixes itself)."
    )


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
    include_obfuscation: bool | None = Field(
        default=None, description="Accepted; Fleet's chunks carry no obfuscation padding."
    )


class JsonSchemaSpec(Wire):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(
        default=None, alias="schema", description="The answer's JSON schema (absent: any JSON object)."
    )
    strict: bool | None = Field(
        default=None, description="Accepted either way: the vllm backend always constrains to the schema."
    )


class TextFormat(Wire):
    type: Literal["text"]


class JsonObjectFormat(Wire):
    type: Literal["json_object"]


class JsonSchemaFormat(Wire):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]
_FORMAT_TAGS = frozenset({"text", "json_object", "json_schema"})


class Prediction(Wire):
    type: Literal["content"]
    content: str | list[TextPart]


class PromptCacheOptions(Wire):
    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m"] | None = None


TokenId = Annotated[int, Field(ge=0)]
Bias = Annotated[int, Field(ge=-100, le=100)]


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
    store: bool | None = Field(
        default=None, description="false (or unset) only: Fleet keeps no completions to retrieve later."
    )
    response_format: ResponseFormat | None = Field(
        default=None,
        description="json_object / json_schema constrain the agent's answer (not its tool calls).",
    )
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[TokenId, Bias] | None = Field(
        default=None, description="Token id (of the agent's model's tokenizer) -> bias, every model call."
    )
    # Accepted; no effect on the answer (docs/DECISIONS.md, issue 17).
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    prompt_cache_options: PromptCacheOptions | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    safety_identifier: str | None = Field(default=None, max_length=128)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    prediction: Prediction | None = Field(
        default=None, description="A latency hint; accepted, the answer is generated in full."
    )
    modalities: list[Literal["text", "audio"]] | None = Field(default=None, description='["text"] only.')
    # Refused unless unset (their values cannot be honoured): see _REFUSED.
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

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


def _is_tag(loc: tuple[int | str, ...], i: int) -> bool:
    # A message's role is the discriminator tag pydantic puts after its index
    # (messages[0].user.content), a format's type after response_format; the top-level
    # field `user` must stay. "[key]" marks a bad mapping key (logit_bias.x).
    part, before = loc[i], loc[i - 1] if i else None
    return (
        (part in _ROLES and isinstance(before, int))
        or (part in _FORMAT_TAGS and before == "response_format")
        or part == "[key]"
    )


def _param(loc: tuple[int | str, ...]) -> str:
    return field_path(tuple(p for i, p in enumerate(loc) if not _is_tag(loc, i)))


# What each refused value would need, as the 400 says it. A field is refused only when
# set to something Fleet cannot do; its harmless values (null, false, 0, []) pass.
_REFUSED: dict[str, str] = {
    "logprobs": "Fleet does not return log probabilities: an agent's answer spans several model "
    "calls and passes its output guards, so no token sequence of one call is the answer",
    "top_logprobs": "Fleet does not return log probabilities (see logprobs)",
    "audio": "audio output is not supported: agents answer in text",
    "modalities": 'only ["text"] is supported: agents answer in text',
    "web_search_options": "agents search with their own tools; web_search_options is not supported",
    "moderation": "moderation is the agent's policies' to decide, not the request's",
    "functions": "functions is deprecated and not supported: use tools",
    "function_call": "function_call is deprecated and not supported: use tool_choice",
    "store": "store: true is not supported: Fleet keeps no completions to retrieve (its audit "
    "log records every request)",
}


def _refused(request: ChatRequest) -> str | None:
    """The first argument set to a value Fleet cannot honour."""
    for name in _REFUSED:
        value = getattr(request, name)
        if name == "modalities":
            value = [m for m in value or [] if m != "text"]
        if value not in (None, False, 0, []):
            return name
    return None


def parse_chat_request(body: bytes) -> ChatRequest:
    """Parse and validate a request body; errors are 400s naming the parameter."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object", code="invalid_json")
    choice = data.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("allowed_tools", "custom"):
        raise InvalidRequest(
            f"tool_choice of type {choice['type']!r} is not supported: name a function, or use "
            "'none', 'auto' or 'required'",
            param="tool_choice",
            code="unsupported_value",
        )
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
    if (refused := _refused(request)) is not None:
        raise InvalidRequest(_REFUSED[refused], param=refused, code="unsupported_value")
    # A tool_choice naming a function is checked by the agent: it may name one of the
    # agent's own tools (forcing the call), which the client's `tools` do not list.
    return request
