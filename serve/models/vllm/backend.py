"""The ``vllm`` backend: vLLM's async engine inside the model deployment's replica, on CPU or GPU.

vLLM is imported only here, and only when a backend is made or used, never when the
module is imported: agent replicas and the ingress import ``serve.models``.

In ``structured`` mode the conversation is flattened and the reply constrained by the
tools' schema (:mod:`serve.models.vllm.prompting`). In ``parser`` mode (GPU models
trained for tools, e.g. Qwen2.5 with ``hermes``) the model's own template renders tools
and history, and vLLM's tool parser finds the calls in the text for ``"auto"``; named and
``"required"`` choices still use the schema, as vLLM's own server does, because a parser
cannot force a call.

A ``response_format`` binds the answer (:mod:`serve.models.vllm.prompting`): a reply
without tools is generated under its schema; one that may call tools under the tools'
schemas with the answer's inside, in ``parser`` mode too (a parser cannot constrain the
answer). The request's sampling arguments (penalties, ``logit_bias``, ``seed``) go to
vLLM's ``SamplingParams`` for every reply; ``stop`` only for free text.

A ``choice`` request (an agent's routing call) is generated under vLLM's ``choice``
constraint: its reply is one of the strings. Every other reply gets the config's
``repetition_penalty``, and its text is watched by a :class:`RepetitionGuard`: a reply
fallen into a loop ends there, as vLLM's own repetition stop would end it ("length").
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast

from serve.errors import ConfigError, InvalidRequest, ModelError, ModelUnavailable, Overloaded, RequestError
from serve.models.base import ModelChunk, ModelRequest
from serve.models.vllm.config import VLLMConfig, engine_args, engine_env, resolve_model
from serve.models.vllm.decoding import (
    AutoDecoder,
    CallDecoder,
    Decoder,
    ParserDecoder,
    RepetitionGuard,
    TextDecoder,
    repeating_unit,
)
from serve.models.vllm.prompting import (
    answer_schema,
    flatten_messages,
    format_instructions,
    tool_call_schema,
    tool_instructions,
    tool_rounds,
    with_system_addendum,
)
from serve.policy.pii import StreamRedactor
from serve.protocol import Usage

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

__all__ = ["DEFAULT_MAX_TOKENS", "VLLMBackend"]

# vLLM's own default is 16 tokens, far too few for an answer; the prompt's room bounds it too.
DEFAULT_MAX_TOKENS = 512
# vLLM's finish reasons that end a reply normally; "repetition" (a loop vLLM or the
# config's repetition_stop detected) cuts the reply short, as a length limit does.
_FINISH: dict[str, Literal["stop", "length", "content_filter"]] = {
    "stop": "stop",
    "length": "length",
    "repetition": "length",
    "content_filter": "content_filter",  # stopped at PII the agent's manifest blocks
}
# vLLM length errors name one of these parameters; they are about the conversation.
_LENGTH_PARAMS = frozenset({"input_tokens", "input_text", "max_model_len", "max_total_tokens"})
# vLLM errors that name one of these name the client's own argument.
_REQUEST_PARAMS = frozenset(
    {"logit_bias", "seed", "temperature", "top_p", "presence_penalty", "frequency_penalty"}
)
# Sampling arguments passed to vLLM as the request has them.
_SAMPLING = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty", "logit_bias")


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
        if exc.parameter in _REQUEST_PARAMS:
            return InvalidRequest(message, param=exc.parameter)
        is_length = exc.parameter in _LENGTH_PARAMS or "maximum" in message
        return InvalidRequest(message, param="messages" if is_length else None)
    if isinstance(exc, VLLMClientError):
        return InvalidRequest(f"the model rejected the request: {exc}")
    if isinstance(exc, GracefulHTTPError | RetryableRequestError):
        return Overloaded(f"the model is busy: {exc}")
    if isinstance(exc, EngineDeadError):  # its replica fails its health check and is replaced
        return ModelUnavailable("the vLLM engine has died; its replica restarts; retry later")
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

    def _parses(self, request: ModelRequest) -> bool:
        """Whether vLLM's tool parser reads the reply (unconstrained, so no answer format)."""
        return (
            self._parser_cls is not None
            and self._uses_tools(request)
            and request.tool_choice == "auto"
            and request.response_format is None
        )

    def _messages(self, request: ModelRequest) -> list[dict[str, Any]]:
        answer = answer_schema(request.response_format)
        if self.config.tool_call_mode == "structured":
            addendum = (
                tool_instructions(request.tools, request.tool_choice, answer=answer)
                if self._uses_tools(request)
                else format_instructions(answer)
            )
            return flatten_messages(request.messages, addendum)
        # vLLM's renderer edits the messages it is given (it parses tool-call arguments
        # in place): give it copies, not the caller's conversation.
        native = copy.deepcopy(request.messages)
        if not self._uses_tools(request):
            return with_system_addendum(native, format_instructions(answer))
        if self._parses(request):
            return native
        # The template lists the tools; a forced choice or a constrained answer still needs saying.
        return with_system_addendum(
            native, tool_instructions(request.tools, request.tool_choice, list_tools=False, answer=answer)
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

    def _decoder(self, request: ModelRequest) -> tuple[Decoder, dict[str, Any] | None, bool]:
        """How to read the reply, the schema constraining it, and skip_special_tokens."""
        answer = answer_schema(request.response_format)
        if request.choice is not None:
            return TextDecoder(), None, True  # constrained by the choice itself (see _sampling)
        if not self._uses_tools(request):
            return TextDecoder(), answer, True
        if self._parses(request) and self._parser_cls is not None:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

            api_request = ChatCompletionRequest(
                model="fleet", messages=request.messages, tools=request.tools, tool_choice="auto"
            )
            parser = self._parser_cls(self._engine.get_tokenizer(), api_request.tools)
            api_request = parser.adjust_request(api_request)
            return ParserDecoder(parser, api_request), None, bool(api_request.skip_special_tokens)
        schema = tool_call_schema(request.tools, request.tool_choice, answer)
        decoder: Decoder = AutoDecoder(answer is not None) if request.tool_choice == "auto" else CallDecoder()
        return decoder, schema, True

    def _sampling(
        self, request: ModelRequest, prompt_len: int, schema: dict[str, Any] | None, skip_special: bool
    ) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

        options: dict[str, Any] = {
            key: value for key in _SAMPLING if (value := getattr(request, key)) is not None
        }
        if request.choice is not None:
            options["structured_outputs"] = StructuredOutputsParams(choice=list(request.choice))
        elif schema is not None:
            # Compact JSON: a small model left free to add whitespace may never stop.
            options["structured_outputs"] = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        elif request.stop:  # free text only: a stop string inside the JSON would cut it
            options["stop"] = list(request.stop)
        # Not for a choice: its options are in the prompt by design (a penalty would only
        # skew the pick), and a constrained choice cannot loop.
        penalty = self.config.applied_repetition_penalty
        if request.choice is None and penalty != 1.0:
            options["repetition_penalty"] = penalty
        return SamplingParams(
            max_tokens=min(request.max_tokens or DEFAULT_MAX_TOKENS, self._max_model_len - prompt_len),
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=skip_special,
            **options,
        )

    def _repetition_guard(self) -> RepetitionGuard | None:
        stop = self.config.repetition_stop
        if stop is None:
            return None
        return RepetitionGuard(
            min_chars=stop.min_chars, max_period=stop.max_period, min_repeats=stop.min_repeats
        )

    def _unlooped(self, text: str) -> str:
        """``text`` without the rounds of the loop it ends in but the first."""
        stop = self.config.repetition_stop
        assert stop is not None  # only a guard ends a reply with "repetition"
        limits = {"min_chars": stop.min_chars, "max_period": stop.max_period, "min_repeats": stop.min_repeats}
        unit = repeating_unit(text, **limits)
        if unit is None:  # the loop was in the raw text only (a JSON answer's escapes)
            return text
        while text.endswith(unit * 2):
            text = text[: -len(unit)]
        return text

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
        looping = self._repetition_guard()
        watch = StreamRedactor() if request.halt_on_pii else None
        # Nobody reads a unary reply as it is generated: it is held, so that a loop the
        # guard ends can be cut back to its first round before anyone sees it.
        held: list[str] | None = None if request.stream else []
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
                        if held is None:
                            yield ModelChunk(content=content)
                        else:
                            held.append(content)
                        if watch is not None and _pii_in(watch, content):
                            finish = "content_filter"  # leaving the loop aborts the request
                            break
                    if looping is not None and looping.feed(piece.text):
                        finish = "repetition"  # leaving the loop aborts the request in the engine
                        break
        except Exception as exc:
            _reraise(exc)
        if finish not in _FINISH:  # "abort" or "error"
            raise ModelError(f"the vLLM engine ended the request: {finish}")
        if held:
            text = "".join(held)
            yield ModelChunk(content=self._unlooped(text) if finish == "repetition" else text)
        calls = decoder.finish(truncated=_FINISH[finish] != "stop")
        if request.parallel_tool_calls is False:  # a parser may find several
            calls = calls[:1]
        reason = "tool_calls" if calls else _FINISH[finish]
        yield ModelChunk(tool_calls=calls, finish_reason=reason, usage=usage)


def _pii_in(watch: StreamRedactor, content: str) -> bool:
    """Whether PII has appeared in the answer so far (in words already complete)."""
    watch.feed(content)
    return bool(watch.found)
