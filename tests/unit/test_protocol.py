"""serve.protocol: request validation with OpenAI-style params, conversations, response shapes,
SSE frames and error responses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest

from serve.errors import (
    BudgetExceeded,
    InvalidRequest,
    Overloaded,
    PolicyDenied,
    RequestError,
    Timeout,
    Unauthorized,
)
from serve.protocol import (
    DONE,
    ChatRequest,
    ChunkStream,
    FunctionCall,
    JsonObjectFormat,
    JsonSchemaFormat,
    NamedToolChoice,
    TextFormat,
    ToolCall,
    Usage,
    chunk,
    completion,
    completion_id,
    error_response,
    extension,
    parse_chat_request,
    sse,
)

USER = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {"name": "get_weather"}}


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "orchestrator", "messages": USER, **fields}).encode()


def error_for(raw: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(raw)
    return info.value


def test_minimal_request() -> None:
    request = parse_chat_request(body())
    assert request.model == "orchestrator"
    assert request.stream is False
    assert request.tools is None and request.tool_choice is None
    assert request.conversation() == [{"role": "user", "content": "hi"}]


def test_full_request() -> None:
    request = parse_chat_request(
        body(
            stream=True,
            stream_options={"include_usage": True},
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=10,
            temperature=0.5,
            top_p=0.9,
            n=1,
            stop="END",
            seed=1,
            metadata={"company": "Globex"},
            user="u1",
        )
    )
    assert request.stream and request.stream_options and request.stream_options.include_usage
    assert request.tools and request.tools[0].function.name == "get_weather"
    assert request.tools[0].function.parameters == {"type": "object", "properties": {}}
    assert request.metadata == {"company": "Globex"}


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"messages": []}, "messages", "Invalid value for messages: List should have at least 1 item"),
        (
            {"messages": [{"role": "user", "content": 123}]},
            "messages[0].content",
            "Invalid value for messages[0].content: Input should be a valid string",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "text": "x"}]}]},
            "messages[0].content",
            "Invalid value for messages[0].content: ",
        ),
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            "messages[0]",
            "Invalid value for messages[0]: Input tag 'robot' found using 'role'",
        ),
        (
            {"messages": [*USER, {"role": "tool", "content": "x"}]},
            "messages[1].tool_call_id",
            "Missing required parameter: messages[1].tool_call_id",
        ),
        (
            {"temperature": 3},
            "temperature",
            "Invalid value for temperature: Input should be less than or equal to 2",
        ),
        ({"top_p": 0}, "top_p", "Invalid value for top_p: Input should be greater than 0"),
        ({"max_tokens": 0}, "max_tokens", "Invalid value for max_tokens: Input should be greater than 0"),
        ({"frobnicate": True}, "frobnicate", "Unrecognized request argument supplied: frobnicate"),
        ({"n": 2}, "n", "Invalid value for n: Input should be 1"),
        (
            {"tool_choice": "sometimes"},
            "tool_choice",
            "Invalid value for tool_choice: Input should be 'none', 'auto' or 'required'",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "tools[0].function.name",
            "Invalid value for tools[0].function.name: String should match pattern",
        ),
        ({"metadata": {"company": 5}}, "metadata.company", "Invalid value for metadata.company: "),
    ],
    ids=lambda v: v if isinstance(v, str) and "." not in v and " " not in v else None,
)
def test_invalid_requests_name_the_param(fields: dict[str, Any], param: str, message: str) -> None:
    err = error_for(body(**fields))
    assert err.param == param
    assert err.message.startswith(message)
    assert err.code == "invalid_value"
    assert err.status == 400
    assert err.type == "invalid_request_error"


def test_missing_messages() -> None:
    err = error_for(json.dumps({"model": "orchestrator"}).encode())
    assert (err.param, err.message) == ("messages", "Missing required parameter: messages")


def test_missing_model() -> None:
    err = error_for(json.dumps({"messages": USER}).encode())
    assert (err.param, err.message) == ("model", "Missing required parameter: model")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{", "request body is not valid JSON: "),
        (b"\xff", "request body is not valid JSON: "),
        (b"[1, 2]", "request body must be a JSON object"),
    ],
)
def test_body_that_is_not_a_json_object(raw: bytes, message: str) -> None:
    err = error_for(raw)
    assert err.param is None
    assert err.code == "invalid_json"
    assert err.message.startswith(message)


def test_tool_choice_may_name_a_function_the_client_did_not_send() -> None:
    """It may be one of the agent's own tools: the agent checks it (tests/unit/loop/test_runner.py)."""
    raw = body(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "leave_balance"}})
    request = parse_chat_request(raw)
    assert (
        isinstance(request.tool_choice, NamedToolChoice)
        and request.tool_choice.function.name == "leave_balance"
    )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stream": "maybe"}, "stream"),
        ({"stream_options": {"include_usage": "maybe"}}, "stream_options.include_usage"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "strict": "maybe"}}]},
            "tools[0].function.strict",
        ),
    ],
)
def test_params_starting_with_str_are_named(fields: dict[str, Any], param: str) -> None:
    assert error_for(body(**fields)).param == param


def test_conversation_joins_text_parts() -> None:
    request = ChatRequest.model_validate(
        {
            "model": "a",
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "It is 42."}]},
            ],
        }
    )
    assert request.conversation() == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Hello, world"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
        {"role": "assistant", "content": "It is 42."},
    ]


def test_completion_limit_prefers_max_completion_tokens() -> None:
    assert parse_chat_request(body(max_tokens=5)).completion_limit == 5
    assert parse_chat_request(body(max_tokens=5, max_completion_tokens=9)).completion_limit == 9
    assert parse_chat_request(body()).completion_limit is None


def test_usage() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4)
    usage.add(Usage(prompt_tokens=1, completion_tokens=2))
    assert usage.total_tokens == 10
    assert usage.wire() == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}


def test_a_usages_cost_adds_up_exactly_and_is_not_in_openais_usage() -> None:
    usage = Usage(prompt_tokens=3, completion_tokens=4, cost_usd=Decimal("0.1"))
    for _ in range(2):
        usage.add(Usage(prompt_tokens=1, completion_tokens=1, cost_usd=Decimal("0.1")))  # a delegate's
    assert usage.cost_usd == Decimal("0.3")  # 0.1 + 0.1 + 0.1 in floats is not
    assert usage.wire() == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}


def test_completion_shape() -> None:
    call = ToolCall(id="c1", function=FunctionCall(name="f", arguments='{"x": 1}'))
    out = completion(
        completion_id="chatcmpl-1",
        model="orchestrator",
        content=None,
        tool_calls=[call],
        finish_reason="tool_calls",
        usage=Usage(prompt_tokens=2, completion_tokens=1),
        extension={"request_id": "req_1"},
    )
    assert isinstance(out.pop("created"), int)
    assert out == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "orchestrator",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        "fleet": {"request_id": "req_1"},
    }


def test_completion_without_tool_calls_has_no_tool_calls_key() -> None:
    out = completion(
        completion_id="x",
        model="m",
        content="hi",
        tool_calls=[],
        finish_reason="stop",
        usage=Usage(),
        extension={},
    )
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "hi"}


def test_chunk_shapes() -> None:
    piece = chunk(completion_id="x", model="m", created=5, delta={"content": "hi"})
    assert piece == {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 5,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}],
    }
    final = chunk(completion_id="x", model="m", created=5, usage=Usage(prompt_tokens=1), extension={"a": 1})
    assert final["choices"] == []
    assert final["usage"] == {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}
    assert final["fleet"] == {"a": 1}


def test_deeply_nested_json_is_a_400_not_a_crash() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(b"[" * 100_000)
    assert info.value.code == "invalid_json"


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"seed": 2**64}, "seed"), ({"presence_penalty": 2.5}, "presence_penalty")],
)
def test_values_the_engine_cannot_honour_are_refused(fields: dict[str, Any], param: str) -> None:
    assert error_for(body(**fields)).param == param


def test_every_argument_a_client_may_leave_harmless_is_accepted() -> None:
    request = parse_chat_request(
        body(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "leave", "schema": {}, "strict": True},
            },
            presence_penalty=0,
            frequency_penalty=-2,
            logit_bias={"50256": -100, "13": 100},
            logprobs=False,
            top_logprobs=0,
            n=1,
            modalities=["text"],
            store=False,
            service_tier="flex",
            prompt_cache_key="k",
            prompt_cache_options={"mode": "explicit", "ttl": "30m"},
            prompt_cache_retention="in_memory",
            safety_identifier="s",
            reasoning_effort="minimal",
            verbosity="high",
            parallel_tool_calls=True,
            prediction={"type": "content", "content": [{"type": "text", "text": "draft"}]},
            stream_options={"include_usage": True, "include_obfuscation": True},
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "hi", "prompt_cache_breakpoint": {"mode": "explicit"}}
                    ],
                }
            ],
        )
    )
    assert request.logit_bias == {50256: -100, 13: 100}
    assert isinstance(request.response_format, JsonSchemaFormat)
    assert request.response_format.json_schema.strict and request.response_format.json_schema.schema_ == {}
    assert request.conversation() == [{"role": "user", "content": "hi"}]
    assert parse_chat_request(body(response_format={"type": "text"})).response_format == TextFormat(
        type="text"
    )
    assert parse_chat_request(
        body(response_format={"type": "json_object"})
    ).response_format == JsonObjectFormat(type="json_object")


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"logprobs": True}, "logprobs", "Fleet does not return log probabilities"),
        ({"top_logprobs": 2}, "top_logprobs", "Fleet does not return log probabilities"),
        ({"modalities": ["text", "audio"]}, "modalities", 'only ["text"] is supported'),
        ({"audio": {"format": "mp3", "voice": "alloy"}}, "audio", "audio output is not supported"),
        ({"web_search_options": {}}, "web_search_options", "agents search with their own tools"),
        ({"moderation": {"model": "omni-moderation-latest"}}, "moderation", "moderation is the agent's"),
        ({"functions": [{"name": "f"}]}, "functions", "functions is deprecated and not supported: use tools"),
        ({"function_call": "none"}, "function_call", "function_call is deprecated"),
        ({"store": True}, "store", "store: true is not supported"),
        (
            {"tool_choice": {"type": "custom", "custom": {"name": "grammar"}}},
            "tool_choice",
            "tool_choice of type 'custom' is not supported",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and " " not in v else None,
)
def test_a_value_fleet_cannot_honour_is_refused_naming_it(
    fields: dict[str, Any], param: str, message: str
) -> None:
    err = error_for(body(**fields))
    assert (err.param, err.code, err.status) == (param, "unsupported_value", 400)
    assert err.message.startswith(message)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": {"type": "json_object", "schema": {}}}, "response_format.schema"),
        ({"logit_bias": {"the": 1}}, "logit_bias.the"),
        ({"logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"service_tier": "cheapest"}, "service_tier"),
    ],
)
def test_a_malformed_argument_is_a_400_at_its_path(fields: dict[str, Any], param: str) -> None:
    err = error_for(body(**fields))
    assert (err.param, err.code) == (param, "invalid_value")


# --- the wire out: SSE frames, the fleet extension, errors --------------------------


def test_an_event_is_one_compact_json_data_line_and_done_closes_the_stream() -> None:
    assert sse({"a": [1, 2], "b": "é"}) == 'data: {"a":[1,2],"b":"\\u00e9"}\n\n'
    assert DONE == "data: [DONE]\n\n"


def events(frames: list[str]) -> list[dict[str, Any]]:
    assert all(f.startswith("data: ") and f.endswith("\n\n") for f in frames)
    parsed: list[dict[str, Any]] = [json.loads(f.removeprefix("data: ")) for f in frames]
    return parsed


def test_a_stream_opens_with_the_role_and_carries_each_delta() -> None:
    out = ChunkStream(completion_id("req_abc"), "orchestrator", created=7)
    first, text = events([out.opening(), out.content("hi")])
    assert first == {
        "id": "chatcmpl-abc",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "orchestrator",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
    }
    assert text["choices"][0]["delta"] == {"content": "hi"}


def test_the_final_chunks_carry_tool_calls_the_finish_reason_the_extension_and_asked_for_usage() -> None:
    out = ChunkStream("chatcmpl-1", "m", created=7)
    call = ToolCall(id="c1", function=FunctionCall(name="f", arguments="{}"))
    usage = Usage(prompt_tokens=3, completion_tokens=2)
    calls, finish, tally = events(
        out.final(
            tool_calls=[call], finish_reason="tool_calls", usage=usage, extension={"x": 1}, include_usage=True
        )
    )
    assert calls["choices"][0]["delta"] == {"tool_calls": [{"index": 0, **call.model_dump()}]}
    assert finish["choices"] == [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]
    assert finish["fleet"] == {"x": 1} and "usage" not in finish
    assert tally["choices"] == [] and tally["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
    }
    (only,) = out.final(tool_calls=[], finish_reason="stop", usage=usage, extension={}, include_usage=False)
    assert events([only])[0]["choices"][0]["finish_reason"] == "stop"


def test_an_error_after_the_200_is_the_envelope_as_an_event() -> None:
    (frame,) = events([ChunkStream.error(Timeout("too slow"))])
    assert frame == {"error": Timeout("too slow").to_dict()}


@dataclass
class Ran:
    turns: int = 2
    tool_calls: int = 1
    tool_failures: int = 0
    invalid_tool_calls: int = 0
    denials: int = 1
    escalations: int = 0
    delegations: list[str] = field(default_factory=lambda: ["hr"])


def test_the_extension_names_the_request_the_agent_and_what_the_run_did() -> None:
    ext = extension(
        request_id="req_1",
        correlation_id="ticket-1",
        trace_id=None,
        session_id="s",
        agent="a",
        agent_version="1.0.0",
        stats=Ran(),
        cost_usd=Decimal("0.000123"),
    )
    assert ext == {
        "request_id": "req_1",
        "correlation_id": "ticket-1",
        "trace_id": None,
        "session_id": "s",
        "agent": "a",
        "agent_version": "1.0.0",
        "turns": 2,
        "tool_calls": 1,
        "tool_failures": 0,
        "invalid_tool_calls": 0,
        "policy_denials": 1,
        "escalations": 0,
        "delegations": ["hr"],
        "cost_usd": "0.000123",  # a string: JSON numbers are floats to most clients
    }


@pytest.mark.parametrize(
    ("error", "headers"),
    [
        (InvalidRequest("bad", param="seed"), {}),
        (Unauthorized("no key"), {"www-authenticate": "Bearer"}),
        # the official clients retry some statuses by themselves: a spent budget is not one to retry
        (BudgetExceeded("spent", param="request:clerk"), {"x-should-retry": "false"}),
        (PolicyDenied("no", decision_id="dec_1"), {"x-fleet-decision-id": "dec_1"}),
        (Overloaded("full"), {"retry-after": "4"}),
    ],
    ids=["400", "401", "402", "403", "503"],
)
def test_an_error_response_is_the_envelope_with_its_status_and_headers(
    error: RequestError, headers: dict[str, str]
) -> None:
    response = error_response(error, retry_after=4, extra={"x-fleet-trace-id": "t"})
    assert response.status_code == error.status
    assert json.loads(response.body) == {"error": error.to_dict()}
    assert response.body == json.dumps({"error": error.to_dict()}, separators=(",", ":")).encode()
    assert {k: v for k, v in response.headers.items() if k not in ("content-length", "content-type")} == {
        "x-fleet-trace-id": "t",
        **headers,
    }
