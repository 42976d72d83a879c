"""serve.models.vllm.backend: the stream against a fake engine, and vLLM's errors as Fleet's.

These tests import vLLM's classes (the ``vllm`` fixture); no engine is started.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from serve.errors import InvalidRequest, ModelError, Overloaded
from serve.models.base import ModelChunk, ModelRequest, collect
from serve.models.vllm.backend import VLLMBackend
from tests.unit.conftest import run
from tests.unit.models.vllm.conftest import CONVERSATION, NAMED, WEATHER, WEATHER_PARAMS, call_schema, config


class FakeEngine:
    """Renders to ``prompt_len`` tokens and replays ``pieces`` as DELTA outputs."""

    def __init__(self, pieces: Sequence[str], *, finish: str = "stop", prompt_len: int = 5) -> None:
        self.pieces, self.finish, self.prompt_len = list(pieces), finish, prompt_len
        self.renderer = SimpleNamespace(render_chat_async=self._render)
        self.conversations: list[Any] = []
        self.params: Any = None
        self.closed = False
        self.render_error: Exception | None = None

    async def _render(self, conversations: Any, chat_params: Any, tok_params: Any) -> Any:
        if self.render_error is not None:
            raise self.render_error
        self.conversations.append(conversations[0])
        return [], [{"prompt_token_ids": list(range(self.prompt_len))}]

    async def generate(self, engine_input: Any, params: Any, request_id: str) -> AsyncIterator[Any]:
        self.params = params
        try:
            for i, text in enumerate(self.pieces):
                last = i == len(self.pieces) - 1
                piece = SimpleNamespace(text=text, token_ids=[i], finish_reason=self.finish if last else None)
                yield SimpleNamespace(prompt_token_ids=list(range(self.prompt_len)), outputs=[piece])
        finally:
            self.closed = True


def backend(engine: FakeEngine, **changes: Any) -> VLLMBackend:
    made = VLLMBackend.__new__(VLLMBackend)
    made.config = config(**changes)
    made._engine = engine  # type: ignore[assignment]
    made._max_model_len = 64
    made._parser_cls = None
    return made


def ask(**fields: Any) -> ModelRequest:
    return ModelRequest(agent="a", messages=[{"role": "user", "content": "Hi"}], **fields)


async def chunks(made: VLLMBackend, request: ModelRequest) -> list[ModelChunk]:
    return [c async for c in made.stream(request)]


def test_text_streams_as_generated_with_the_engines_token_counts(vllm: Any) -> None:
    engine = FakeEngine(["Par", "is", "."])
    got = run(chunks(backend(engine), ask(max_tokens=500, temperature=0.0, seed=3, stop=["\n"])))
    assert [c.content for c in got[:3]] == ["Par", "is", "."]
    assert got[-1].finish_reason == "stop" and got[-1].usage is not None
    assert (got[-1].usage.prompt_tokens, got[-1].usage.completion_tokens) == (5, 3)
    params = engine.params
    assert params.max_tokens == 59  # clamped to the context left after the prompt
    assert (params.temperature, params.seed, params.stop, params.structured_outputs) == (0.0, 3, ["\n"], None)
    assert params.output_kind == vllm.sampling_params.RequestOutputKind.DELTA


def test_a_named_call_is_generated_under_its_schema(vllm: Any) -> None:
    engine = FakeEngine(['{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}'])
    reply = run(collect(backend(engine).stream(ask(tools=[WEATHER], tool_choice=NAMED, stop=["}"]))))
    assert reply.content == "" and reply.finish_reason == "tool_calls"
    [call] = reply.tool_calls
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo"}
    so = engine.params.structured_outputs
    assert so.json == call_schema("get_weather", WEATHER_PARAMS) and so.disable_any_whitespace
    assert not engine.params.stop  # a stop string would cut the JSON
    assert "Call the tool get_weather" in engine.conversations[0][0]["content"]


def test_auto_streams_a_plain_answer_out_of_its_json(vllm: Any) -> None:
    engine = FakeEngine(['{"content": "It', " is", ' sunny."}'])
    got = run(chunks(backend(engine), ask(tools=[WEATHER])))
    assert [c.content for c in got] == ["It", " is", " sunny.", ""]
    assert got[-1].finish_reason == "stop" and got[-1].tool_calls == []


def test_a_call_cut_off_by_max_tokens_is_reported_as_length(vllm: Any) -> None:
    engine = FakeEngine(['{"name": "get_weather", "argu'], finish="length")
    reply = run(collect(backend(engine).stream(ask(tools=[WEATHER], tool_choice="required"))))
    assert (reply.finish_reason, reply.tool_calls) == ("length", [])


def test_after_max_tool_rounds_auto_only_answers(vllm: Any) -> None:
    engine = FakeEngine(["Sunny."])
    request = ModelRequest(agent="a", messages=CONVERSATION, tools=[WEATHER], tool_choice="auto")
    reply = run(collect(backend(engine, max_tool_rounds=1).stream(request)))
    assert reply.content == "Sunny." and engine.params.structured_outputs is None
    assert "get_weather:" not in engine.conversations[0][0]["content"]  # no tools offered


def test_a_prompt_over_the_context_is_an_invalid_request(vllm: Any) -> None:
    from vllm.exceptions import VLLMValidationError

    engine = FakeEngine(["x"])
    engine.render_error = VLLMValidationError(
        "This model's maximum context length is 64 tokens.", parameter="input_tokens", value=99
    )
    with pytest.raises(InvalidRequest) as caught:
        run(chunks(backend(engine), ask()))
    assert caught.value.param == "messages" and "(parameter=" not in caught.value.message
    with pytest.raises(InvalidRequest) as caught:
        run(chunks(backend(FakeEngine(["x"], prompt_len=64)), ask()))
    assert caught.value.param == "messages"


def test_engine_failures_become_fleet_errors(vllm: Any) -> None:
    from vllm.exceptions import QueueOverflowError
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    for raised, expected in [
        (EngineDeadError(), ModelError),
        (EngineGenerateError(), ModelError),
        (QueueOverflowError(), Overloaded),  # type: ignore[no-untyped-call]
    ]:
        engine = FakeEngine(["x"])
        engine.render_error = raised
        with pytest.raises(expected):
            run(chunks(backend(engine), ask()))


def test_closing_the_stream_early_closes_the_engines_generator(vllm: Any) -> None:
    engine = FakeEngine(["a", "b", "c"])

    async def first_then_close() -> None:
        stream = backend(engine).stream(ask())
        assert (await anext(stream)).content == "a"
        await stream.aclose()  # type: ignore[attr-defined]

    run(first_then_close())
    assert engine.closed  # vLLM aborts the request when its generator closes
