"""serve.models.scripted.ScriptedBackend: rules, reply positions, placeholders, chunks, usage."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from serve.errors import ModelError, RequestError
from serve.models import make_backend
from serve.models.base import ModelChunk, ModelReply, ModelRequest, collect
from serve.models.deployment import parse_backend_config, stream_model
from serve.models.scripted import ScriptedBackend, ScriptedConfig
from serve.protocol import FunctionCall, JsonObjectFormat, ToolCall, Usage
from tests.unit.conftest import run

SCRIPT: list[dict[str, Any]] = [
    {"agent": "alpha", "match": "(?i)hello", "replies": [{"content": "alpha says hi to {agent}"}]},
    {"agent": "beta", "match": "(?i)hello", "replies": [{"content": "beta says hi"}]},
    {
        "match": r"order (?P<sku>SKU-\d{4})(?: x(?P<qty>\d+))?",
        "replies": [
            {
                "tool_calls": [
                    {"name": "reorder", "arguments": {"sku": "{sku}", "tags": ["{qty}", "{input}"]}}
                ]
            },
            {"content": "first result: {tool_result}"},
            {"content": "last reply repeats: {tool_result}"},
        ],
    },
    {"match": "#echo", "replies": [{"content": "in={input} sys={system} unknown={nope} {sku}"}]},
    {"match": "#raw", "replies": [{"tool_calls": [{"name": "add", "arguments": '{"a": 1,'}]}]},
    {"match": "#fail", "replies": [{"error": "engine {agent} failed on {input}"}]},
    {"match": "#long", "replies": [{"content": "one two three four five"}]},
    {"match": "#both", "replies": [{"content": "a b c d", "tool_calls": [{"name": "t"}]}]},
    {"match": "#slow", "replies": [{"content": "late", "delay_s": 0.01}]},
    {
        "match": "#multi",
        "replies": [{"content": "go"}, {"tool_calls": [{"name": "first"}, {"name": "second"}]}],
    },
    {"agent": "alpha", "replies": [{"content": "alpha fallback"}]},
]


def backend(words_per_chunk: int = 1, script: list[dict[str, Any]] | None = None) -> ScriptedBackend:
    return ScriptedBackend(
        ScriptedConfig.model_validate(
            {"kind": "scripted", "script": script or SCRIPT, "words_per_chunk": words_per_chunk}
        )
    )


def request(agent: str, *messages: dict[str, Any], **extra: Any) -> ModelRequest:
    return ModelRequest(agent=agent, messages=list(messages), **extra)


def system(text: str = "You are a test.") -> dict[str, Any]:
    return {"role": "system", "content": text}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def assistant(content: str | None = None) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def tool_msg(content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": "c", "content": content}


def chunks(b: ScriptedBackend, req: ModelRequest) -> list[ModelChunk]:
    async def go() -> list[ModelChunk]:
        return [c async for c in b.stream(req)]

    return run(go())


def reply(b: ScriptedBackend, req: ModelRequest) -> ModelReply:
    return run(collect(b.stream(req)))


# --- rule selection ------------------------------------------------------------------


def test_rules_are_chosen_by_agent() -> None:
    b = backend()
    assert reply(b, request("alpha", user("Hello there"))).content == "alpha says hi to alpha"
    assert reply(b, request("beta", user("HELLO"))).content == "beta says hi"


def test_first_matching_rule_wins_and_regex_is_searched() -> None:
    b = backend()
    # "#echo" is found anywhere in the message; alpha's catch-all comes later.
    assert reply(b, request("alpha", user("please #echo"))).content.startswith("in=please #echo")
    assert reply(b, request("alpha", user("something else"))).content == "alpha fallback"


def test_no_rule_is_a_model_error() -> None:
    with pytest.raises(ModelError) as info:
        reply(backend(), request("gamma", user("something else")))
    assert info.value.message == "the script has no rule for agent 'gamma' and this input"
    assert info.value.status == 502 and info.value.code == "model_error"


def test_regex_only_sees_the_last_user_message() -> None:
    b = backend()
    req = request("gamma", user("order SKU-1001"), assistant("ok"), user("#echo"))
    assert reply(b, req).content.startswith("in=#echo")


# --- reply position ------------------------------------------------------------------


def test_reply_index_counts_assistant_turns_since_last_user_message() -> None:
    b = backend()
    first = reply(b, request("gamma", system(), user("order SKU-1001")))
    assert first.content == ""
    assert first.finish_reason == "tool_calls"
    assert first.tool_calls[0].id == "call_0_0"

    second = reply(b, request("gamma", system(), user("order SKU-1001"), assistant(), tool_msg("42 units")))
    assert second.content == "first result: 42 units"

    history = [system(), user("order SKU-1001"), assistant(), tool_msg("a"), assistant(), tool_msg("b")]
    assert reply(b, request("gamma", *history)).content == "last reply repeats: b"
    history += [assistant("x"), tool_msg("c")]
    assert reply(b, request("gamma", *history)).content == "last reply repeats: c"


def test_a_new_user_message_restarts_the_replies() -> None:
    b = backend()
    history = [
        user("order SKU-1001"),
        assistant(),
        tool_msg("old"),
        assistant("done"),
        user("order SKU-1002"),
    ]
    out = reply(b, request("gamma", *history))
    assert out.finish_reason == "tool_calls"
    assert json.loads(out.tool_calls[0].function.arguments)["sku"] == "SKU-1002"


def test_tool_call_ids_carry_turn_and_index() -> None:
    out = reply(backend(), request("gamma", user("#multi"), assistant("go")))
    assert [c.id for c in out.tool_calls] == ["call_1_0", "call_1_1"]
    assert [c.function.name for c in out.tool_calls] == ["first", "second"]
    assert [c.function.arguments for c in out.tool_calls] == ["{}", "{}"]


def test_tool_result_is_the_last_tool_message_since_the_user_message() -> None:
    history = [user("order SKU-1001"), assistant(), tool_msg("x"), assistant()]
    assert reply(backend(), request("gamma", *history)).content == "last reply repeats: x"
    fresh = [tool_msg("stale"), user("order SKU-1001"), assistant()]
    assert reply(backend(), request("gamma", *fresh)).content == "first result: "


# --- placeholders --------------------------------------------------------------------


def test_placeholders_in_tool_arguments() -> None:
    out = reply(backend(), request("gamma", user("order SKU-1003 x12")))
    assert out.tool_calls == [
        ToolCall(
            id="call_0_0",
            function=FunctionCall(
                name="reorder",
                arguments=json.dumps({"sku": "SKU-1003", "tags": ["12", "order SKU-1003 x12"]}),
            ),
        )
    ]


def test_unmatched_optional_group_is_left_as_placeholder() -> None:
    out = reply(backend(), request("gamma", user("order SKU-1003")))
    assert json.loads(out.tool_calls[0].function.arguments)["tags"] == ["{qty}", "order SKU-1003"]


def test_input_system_and_unknown_placeholders() -> None:
    out = reply(backend(), request("gamma", system("Be kind."), user("#echo me")))
    assert out.content == "in=#echo me sys=Be kind. unknown={nope} {sku}"


def test_raw_json_arguments_are_passed_through() -> None:
    out = reply(backend(), request("gamma", user("#raw")))
    assert out.tool_calls[0].function.arguments == '{"a": 1,'


def test_error_reply_raises_model_error_with_placeholders() -> None:
    with pytest.raises(ModelError, match=r"^engine gamma failed on #fail now$"):
        reply(backend(), request("gamma", user("#fail now")))


# --- streaming, limits, usage --------------------------------------------------------


def test_one_word_per_chunk_then_a_final_chunk() -> None:
    pieces = chunks(backend(), request("gamma", user("#long")))
    assert [p.content for p in pieces] == ["one ", "two ", "three ", "four ", "five", ""]
    assert all(p.finish_reason is None and p.usage is None for p in pieces[:-1])
    assert pieces[-1].finish_reason == "stop"
    assert pieces[-1].tool_calls == []


def test_words_per_chunk() -> None:
    pieces = chunks(backend(words_per_chunk=2), request("gamma", user("#long")))
    assert [p.content for p in pieces] == ["one two ", "three four ", "five", ""]


def test_max_tokens_truncates_with_finish_reason_length() -> None:
    out = reply(backend(), request("gamma", user("#long"), max_tokens=2))
    assert out.content == "one two "
    assert out.finish_reason == "length"
    assert out.usage.completion_tokens == 2


def test_max_tokens_not_applied_when_the_reply_calls_tools() -> None:
    out = reply(backend(), request("gamma", user("#both"), max_tokens=2))
    assert out.content == "a b c d"
    assert out.finish_reason == "tool_calls"


def test_tool_choice_none_drops_tool_calls() -> None:
    out = reply(backend(), request("gamma", user("#both"), tool_choice="none"))
    assert out.content == "a b c d"
    assert out.tool_calls == []
    assert out.finish_reason == "stop"


def test_the_script_is_the_whole_truth_sampling_and_formats_are_ignored() -> None:
    plain = reply(backend(), request("gamma", user("#multi")))
    tuned = reply(
        backend(),
        request(
            "gamma",
            user("#multi"),
            temperature=2.0,
            seed=1,
            presence_penalty=2.0,
            frequency_penalty=-2.0,
            logit_bias={1: 100},
            stop=["go"],
            response_format=JsonObjectFormat(type="json_object"),
            parallel_tool_calls=False,
        ),
    )
    assert tuned == plain and tuned.content == "go"


def test_usage_counts_whitespace_words() -> None:
    req = request("gamma", system("one two three"), user("#long please"), assistant(None))
    out = reply(backend(), req)
    assert out.usage == Usage(prompt_tokens=5, completion_tokens=5)


def test_usage_counts_tool_call_argument_words() -> None:
    out = reply(backend(), request("gamma", user("order SKU-1003 x12")))
    arguments = json.dumps({"sku": "SKU-1003", "tags": ["12", "order SKU-1003 x12"]})
    assert out.usage == Usage(prompt_tokens=3, completion_tokens=len(arguments.split()))


def test_delay() -> None:
    assert reply(backend(), request("gamma", user("#slow"))).content == "late"


# --- config and plumbing -------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"kind": "scripted", "script": []}, "List should have at least 1 item"),
        ({"kind": "scripted", "script": [{"replies": []}]}, "List should have at least 1 item"),
        ({"kind": "scripted", "script": [{"match": "(", "replies": [{}]}]}, "invalid regex"),
        (
            {"kind": "scripted", "script": [{"replies": [{"colour": "red"}]}]},
            "Extra inputs are not permitted",
        ),
        (
            {"kind": "scripted", "words_per_chunk": 0, "script": [{"replies": [{}]}]},
            "greater than or equal to 1",
        ),
    ],
)
def test_invalid_scripts(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ScriptedConfig.model_validate(config)


def test_parse_backend_config_and_make_backend() -> None:
    config = parse_backend_config({"kind": "scripted", "script": [{"replies": [{"content": "x"}]}]})
    assert isinstance(config, ScriptedConfig)
    assert isinstance(make_backend(config), ScriptedBackend)
    assert run(make_backend(config).check_health()) is None


class _Broken:
    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        yield ModelChunk(content="partial ")
        raise RuntimeError("segfault")

    async def check_health(self) -> None:
        return None


def test_stream_model_turns_failures_into_values() -> None:
    async def go(b: Any, req: ModelRequest) -> list[ModelChunk | RequestError]:
        return [item async for item in stream_model(b, req)]

    items = run(go(_Broken(), request("gamma", user("x"))))
    assert items[0] == ModelChunk(content="partial ")
    assert isinstance(items[1], ModelError)
    assert items[1].message == "model backend failed: RuntimeError"

    items = run(go(backend(), request("gamma", user("#fail x"))))
    assert len(items) == 1 and isinstance(items[0], ModelError)
    assert items[0].message == "engine gamma failed on #fail x"
