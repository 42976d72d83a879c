"""serve.models.vllm.backend: the stream against a fake engine, and vLLM's errors as Fleet's.

These tests import vLLM's classes (the ``vllm`` fixture); no engine is started.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from serve.errors import InvalidRequest, ModelError, ModelUnavailable, Overloaded
from serve.models.base import ModelChunk, ModelRequest, collect
from serve.models.vllm.backend import VLLMBackend
from serve.protocol import JsonObjectFormat, JsonSchemaFormat, JsonSchemaSpec
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
        (EngineDeadError(), ModelUnavailable),  # a 503: its replica restarts
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


LEAVE: dict[str, Any] = {"type": "object", "properties": {"days": {"type": "integer"}}, "required": ["days"]}
JSON_ANSWER = JsonSchemaFormat(type="json_schema", json_schema=JsonSchemaSpec(name="leave", schema=LEAVE))


def test_the_requests_sampling_arguments_reach_the_engine(vllm: Any) -> None:
    engine = FakeEngine(["ok"])
    sampling = {"presence_penalty": 0.5, "frequency_penalty": -0.25, "logit_bias": {7: -100, 9: 5}, "seed": 1}
    run(chunks(backend(engine), ask(**sampling)))
    params = engine.params
    assert (params.presence_penalty, params.frequency_penalty, params.seed) == (0.5, -0.25, 1)
    assert params.logit_bias == {7: -100.0, 9: 5.0}


def test_a_response_format_without_tools_binds_the_whole_reply(vllm: Any) -> None:
    engine = FakeEngine(['{"days"', ":12}"])
    got = run(chunks(backend(engine), ask(response_format=JSON_ANSWER, stop=["}"])))
    assert "".join(c.content for c in got) == '{"days":12}'  # streamed as generated
    so = engine.params.structured_outputs
    assert so.json == LEAVE and so.disable_any_whitespace
    assert not engine.params.stop  # a stop string would cut the JSON
    assert "Reply with only JSON following this JSON schema" in engine.conversations[0][0]["content"]


def test_json_object_is_any_json_object(vllm: Any) -> None:
    engine = FakeEngine(["{}"])
    run(chunks(backend(engine), ask(response_format=JsonObjectFormat(type="json_object"))))
    assert engine.params.structured_outputs.json == {"type": "object"}


def test_with_tools_the_format_binds_the_answer_and_its_json_streams(vllm: Any) -> None:
    engine = FakeEngine(['{"content":{"da', 'ys":12}}'])
    got = run(chunks(backend(engine), ask(tools=[WEATHER], response_format=JSON_ANSWER)))
    assert "".join(c.content for c in got) == '{"days":12}'
    assert got[-1].finish_reason == "stop" and got[-1].tool_calls == []
    answer = engine.params.structured_outputs.json["anyOf"][-1]
    assert answer["properties"]["content"] == LEAVE
    call = run(
        collect(
            backend(FakeEngine(['{"name":"get_weather","arguments":{"city":"Oslo"}}'])).stream(
                ask(tools=[WEATHER], response_format=JSON_ANSWER)
            )
        )
    )
    assert [c.function.name for c in call.tool_calls] == ["get_weather"]  # a call is not bound by it


class TwoCallParser:
    """A vLLM tool parser that finds two calls in any reply."""

    def __init__(self, tokenizer: Any, tools: Any) -> None:
        pass

    def adjust_request(self, request: Any) -> Any:
        return request

    def extract_tool_calls_streaming(self, *args: Any) -> None:
        return None

    def extract_tool_calls(self, text: str, request: Any) -> Any:
        calls = [SimpleNamespace(function=SimpleNamespace(name=n, arguments="{}")) for n in ("now", "now")]
        return SimpleNamespace(tools_called=True, tool_calls=calls)


def parser_backend(engine: FakeEngine) -> VLLMBackend:
    made = backend(engine, tool_call_mode="parser", tool_parser="hermes")
    made._parser_cls = TwoCallParser
    engine.get_tokenizer = lambda: None  # type: ignore[attr-defined]
    return made


def test_in_parser_mode_a_format_is_generated_under_the_schema_not_parsed(vllm: Any) -> None:
    engine = FakeEngine(['{"content":{"days":3}}'])
    got = run(chunks(parser_backend(engine), ask(tools=[WEATHER], response_format=JSON_ANSWER)))
    assert "".join(c.content for c in got) == '{"days":3}'
    assert engine.params.structured_outputs is not None
    system = engine.conversations[0][0]
    assert system["role"] == "system" and "where <answer> is JSON following" in system["content"]


def test_parallel_tool_calls_false_keeps_one_call(vllm: Any) -> None:
    reply = run(collect(parser_backend(FakeEngine(["calls"])).stream(ask(tools=[WEATHER]))))
    assert len(reply.tool_calls) == 2
    one = run(
        collect(parser_backend(FakeEngine(["calls"])).stream(ask(tools=[WEATHER], parallel_tool_calls=False)))
    )
    assert len(one.tool_calls) == 1 and one.finish_reason == "tool_calls"


def test_an_argument_the_engine_refuses_is_named(vllm: Any) -> None:
    from vllm.exceptions import VLLMValidationError

    engine = FakeEngine(["x"])
    engine.render_error = VLLMValidationError("token_id(s) [99999] in logit_bias ...", parameter="logit_bias")
    with pytest.raises(InvalidRequest) as caught:
        run(chunks(backend(engine), ask(logit_bias={99999: 1})))
    assert caught.value.param == "logit_bias"


def test_the_embedded_models_repetition_penalty_goes_beside_the_requests_penalties(vllm: Any) -> None:
    engine = FakeEngine(["ok"])
    run(chunks(backend(engine), ask(presence_penalty=0.5, frequency_penalty=0.25)))
    params = engine.params
    assert (params.repetition_penalty, params.presence_penalty, params.frequency_penalty) == (1.1, 0.5, 0.25)
    other = FakeEngine(["ok"])
    run(chunks(backend(other, repetition_penalty=1.0), ask()))
    assert other.params.repetition_penalty == 1.0  # vLLM's own default: none


def test_a_choice_is_generated_under_the_choice_constraint_without_a_penalty(vllm: Any) -> None:
    engine = FakeEngine(["fleet", "-monitor"])
    choices = ["hr-policy-advisor", "fleet-monitor", "none"]
    reply = run(collect(backend(engine).stream(ask(choice=choices, stop=["\n"], max_tokens=32))))
    assert (reply.content, reply.finish_reason, reply.tool_calls) == ("fleet-monitor", "stop", [])
    so = engine.params.structured_outputs
    assert so.choice == choices and so.json is None
    assert engine.params.repetition_penalty == 1.0  # the choices are in the prompt by design
    assert not engine.params.stop
    assert engine.conversations[0] == [{"role": "user", "content": "Hi"}]  # no tool instructions


def test_a_reply_fallen_into_a_loop_ends_at_once_and_the_engine_stops(vllm: Any) -> None:
    """Issue 17's answer looped until max_tokens; the guard ends it after 48 characters."""
    engine = FakeEngine(["2023-08-22 12:32:53.143", *[".14"] * 200])
    got = run(chunks(backend(engine), ask()))
    text = "".join(c.content for c in got)
    assert text == "2023-08-22 12:32:53.143" + ".14" * 16
    assert got[-1].finish_reason == "length" and engine.closed  # leaving the stream aborts the request
    assert got[-1].usage is not None and got[-1].usage.completion_tokens == 17


def test_a_unary_reply_that_loops_keeps_one_round_of_the_loop(vllm: Any) -> None:
    """Nobody reads a unary reply as it is generated (a delegate's, say): the backend holds
    it, and the loop the guard ended is cut back to its first round."""
    engine = FakeEngine(["The balance is 25 days", *["-debt"] * 200])
    got = run(chunks(backend(engine), ask(stream=False)))
    assert [c.content for c in got if c.content] == ["The balance is 25 days-debt"]
    assert got[-1].finish_reason == "length" and engine.closed
    # A reply that does not loop is the engine's text, whole.
    plain = run(chunks(backend(FakeEngine(["Paris", " is", " the capital."])), ask(stream=False)))
    assert "".join(c.content for c in plain) == "Paris is the capital." and plain[-1].finish_reason == "stop"


def test_a_call_whose_arguments_loop_is_no_call(vllm: Any) -> None:
    engine = FakeEngine(['{"name": "get_weather", "arguments": {"city": "', *["Oslo "] * 40, '"}}'])
    reply = run(collect(backend(engine).stream(ask(tools=[WEATHER], tool_choice="required"))))
    assert (reply.finish_reason, reply.tool_calls) == ("length", [])


def test_the_repetition_stop_can_be_turned_off(vllm: Any) -> None:
    engine = FakeEngine(["a", *[".14"] * 30])
    got = run(chunks(backend(engine, repetition_stop=None), ask()))
    assert "".join(c.content for c in got) == "a" + ".14" * 30 and got[-1].finish_reason == "stop"


def test_an_answer_with_pii_the_agent_blocks_stops_at_the_first_and_the_engine_stops(vllm: Any) -> None:
    """``halt_on_pii`` (an agent whose manifest blocks PII): its policy would withhold the
    whole answer, so nobody waits for, or pays, the rest."""
    rest = [f" and then {n}" for n in range(200)]  # no loop: the repetition stop stays out of it
    pieces = ["Call", " (415)", " 555-0134", " now", ",", *rest]
    for stream in (True, False):
        engine = FakeEngine(pieces)
        got = run(chunks(backend(engine), ask(halt_on_pii=True, stream=stream)))
        assert "".join(c.content for c in got) == "Call (415) 555-0134 now"  # a word past the number
        assert got[-1].finish_reason == "content_filter" and engine.closed
        assert got[-1].usage is not None and got[-1].usage.completion_tokens == 4
    # Without it (a redacting agent, a client's own call), the engine's whole reply.
    whole = run(chunks(backend(FakeEngine(pieces)), ask(stream=False)))
    assert "".join(c.content for c in whole).endswith("".join(rest)) and whole[-1].finish_reason == "stop"
