"""serve.models.vllm.prompting: the tool-call schemas, the tool instructions, flattening a
conversation for a plain chat template, and counting tool rounds."""

from __future__ import annotations

import json

import pytest

from serve.errors import InvalidRequest
from serve.models.vllm.prompting import (
    CONTENT_SCHEMA,
    answer_schema,
    flatten_messages,
    format_instructions,
    tool_call_schema,
    tool_instructions,
    tool_rounds,
)
from serve.protocol import JsonObjectFormat, JsonSchemaFormat, JsonSchemaSpec, TextFormat
from tests.unit.models.vllm.conftest import (
    CALL,
    CLOCK,
    CONVERSATION,
    NAMED,
    WEATHER,
    WEATHER_PARAMS,
    call_schema,
)


def test_a_named_choice_constrains_the_reply_to_that_tools_call() -> None:
    assert tool_call_schema([CLOCK, WEATHER], NAMED) == call_schema("get_weather", WEATHER_PARAMS)


def test_required_is_any_of_the_tools_and_auto_adds_a_plain_answer() -> None:
    empty = {"type": "object", "properties": {}}
    calls = [call_schema("get_weather", WEATHER_PARAMS), call_schema("now", empty)]
    assert tool_call_schema([WEATHER, CLOCK], "required") == {"anyOf": calls}
    assert tool_call_schema([WEATHER, CLOCK], "auto") == {"anyOf": [*calls, CONTENT_SCHEMA]}
    assert tool_call_schema([WEATHER], "required") == calls[0]


def test_no_schema_without_tools_or_with_none() -> None:
    assert tool_call_schema([], "auto") is None
    assert tool_call_schema([WEATHER], "none") is None


def test_a_named_choice_of_an_unknown_tool_is_the_clients_error() -> None:
    with pytest.raises(InvalidRequest) as caught:
        tool_call_schema([WEATHER], {"type": "function", "function": {"name": "nope"}})
    assert caught.value.param == "tool_choice"


def test_tool_instructions_describe_tools_and_the_json_to_write() -> None:
    text = tool_instructions([WEATHER, CLOCK], "auto")
    assert (
        "- get_weather: Weather in a city. Parameters: " + json.dumps(WEATHER_PARAMS, separators=(",", ":"))
        in text
    )
    assert "- now: (no description)" in text
    assert '{"content": <answer>}' in text
    assert "Call the tool get_weather" in tool_instructions([WEATHER], NAMED)
    assert "Call one of the tools" in tool_instructions([WEATHER], "required", list_tools=False)
    assert "get_weather:" not in tool_instructions([WEATHER], "required", list_tools=False)
    assert tool_instructions([WEATHER], "none") == ""


def test_flattening_puts_this_turns_tool_results_before_the_question() -> None:
    assert flatten_messages(CONVERSATION, "TOOLS") == [
        {"role": "system", "content": "Be brief.\n\nTOOLS"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {
            "role": "user",
            "content": 'get_weather({"city": "Paris"}) returned: Sunny\n\nUsing this, answer: Weather in Paris?',
        },
    ]


def test_flattening_leaves_out_earlier_tool_traffic_and_keeps_the_conversation() -> None:
    later = [*CONVERSATION, {"role": "assistant", "content": "Sunny."}, {"role": "developer", "content": "D"}]
    flat = flatten_messages([*later, {"role": "user", "content": "Thanks"}])
    assert [m["role"] for m in flat] == ["system", "user", "assistant", "user", "assistant", "system", "user"]
    assert flat[3]["content"] == "Weather in Paris?" and flat[-1]["content"] == "Thanks"
    assert flatten_messages([{"role": "user", "content": "Hi"}], "TOOLS")[0] == {
        "role": "system",
        "content": "TOOLS",
    }
    assert CONVERSATION[4]["content"] is None  # the caller's messages are not touched


def test_tool_rounds_count_calls_since_the_last_user_message() -> None:
    assert tool_rounds(CONVERSATION) == 1
    assert tool_rounds(CONVERSATION[:4]) == 0
    assert tool_rounds([*CONVERSATION, {"role": "assistant", "tool_calls": [CALL]}]) == 2


LEAVE = {"type": "object", "properties": {"days": {"type": "integer"}}, "required": ["days"]}


def test_a_response_format_is_the_schema_of_the_answer() -> None:
    named = JsonSchemaFormat(type="json_schema", json_schema=JsonSchemaSpec(name="leave", schema=LEAVE))
    assert answer_schema(named) == LEAVE
    assert answer_schema(JsonSchemaFormat(type="json_schema", json_schema=JsonSchemaSpec(name="any"))) == {
        "type": "object"
    }
    assert answer_schema(JsonObjectFormat(type="json_object")) == {"type": "object"}
    assert answer_schema(TextFormat(type="text")) is None and answer_schema(None) is None


def test_with_a_response_format_the_answer_is_bound_and_calls_are_not() -> None:
    assert tool_call_schema([], "auto", LEAVE) == LEAVE  # no tools: the reply is the answer
    assert tool_call_schema([WEATHER], "none", LEAVE) == LEAVE
    answer = {**CONTENT_SCHEMA, "properties": {"content": LEAVE}}
    assert tool_call_schema([WEATHER], "auto", LEAVE) == {
        "anyOf": [call_schema("get_weather", WEATHER_PARAMS), answer]
    }
    assert tool_call_schema([WEATHER], "required", LEAVE) == call_schema("get_weather", WEATHER_PARAMS)


def test_the_model_is_told_the_answers_json() -> None:
    schema_text = json.dumps(LEAVE, separators=(",", ":"))
    assert format_instructions(LEAVE) == f"Reply with only JSON following this JSON schema: {schema_text}."
    assert format_instructions({"type": "object"}) == "Reply with only a JSON object."
    assert format_instructions(None) == ""
    auto = tool_instructions([WEATHER], "auto", answer={"type": "object"})
    assert '{"content": <answer>}, where <answer> is a JSON object.' in auto
    assert tool_instructions([WEATHER], "none", answer=LEAVE) == format_instructions(LEAVE)
