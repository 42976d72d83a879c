"""serve.models.upstream: what an OpenAI-compatible upstream is sent for a model call."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from serve.models.base import ModelRequest, collect
from serve.models.upstream import OpenAIBackend, OpenAIConfig
from serve.protocol import JsonSchemaFormat
from tests.unit.conftest import run

UPSTREAM = OpenAIBackend(OpenAIConfig(kind="openai", base_url="http://upstream.invalid/v1", model="gpt-test"))
USER = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "leave", "schema": {"type": "object"}, "strict": True},
}


def params(**fields: Any) -> dict[str, Any]:
    return UPSTREAM._params(ModelRequest(agent="a", messages=USER, **fields))


def test_a_plain_call_streams_with_usage_and_sends_nothing_unset() -> None:
    assert params() == {
        "model": "gpt-test",
        "messages": USER,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_sampling_arguments_and_the_answers_format_are_passed_on_as_openai_writes_them() -> None:
    sent = params(
        temperature=0.1,
        top_p=0.5,
        seed=3,
        stop=["END"],
        max_tokens=9,
        presence_penalty=0.5,
        frequency_penalty=-1.0,
        logit_bias={50256: -100},
        response_format=JsonSchemaFormat.model_validate(FORMAT),
    )
    assert sent["response_format"] == FORMAT  # `schema`, not the field's Python name
    assert sent["logit_bias"] == {"50256": -100}  # token ids as JSON keys
    assert (sent["presence_penalty"], sent["frequency_penalty"]) == (0.5, -1.0)
    assert (sent["temperature"], sent["top_p"], sent["seed"], sent["stop"], sent["max_tokens"]) == (
        0.1,
        0.5,
        3,
        ["END"],
        9,
    )


def test_parallel_tool_calls_goes_with_tools_only() -> None:
    assert params(tools=[TOOL], parallel_tool_calls=False)["parallel_tool_calls"] is False
    assert "parallel_tool_calls" not in params(parallel_tool_calls=False)  # upstreams refuse it alone


CHOICES = ["hr-policy-advisor", "fleet-monitor", "none"]


def test_a_choice_is_asked_as_a_named_call_of_one_tool_whose_argument_is_an_enum() -> None:
    sent = params(choice=CHOICES, max_tokens=32, temperature=0.0)
    [choose] = sent["tools"]
    assert choose["function"]["name"] == "choose"
    assert choose["function"]["parameters"]["properties"]["choice"] == {"type": "string", "enum": CHOICES}
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "choose"}}
    assert "parallel_tool_calls" not in sent


class _Stream:
    """An upstream's stream of chat.completion.chunk events."""

    def __init__(self, events: list[Any]) -> None:
        self._events = iter(events)

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Any:
        try:
            return next(self._events)
        except StopIteration:
            raise StopAsyncIteration from None


def _event(
    content: str | None = None,
    arguments: str | None = None,
    finish: str | None = None,
    name: str | None = None,
) -> Any:
    calls = None
    if arguments is not None:  # the name comes in a call's first fragment only
        function = SimpleNamespace(name=name, arguments=arguments)
        calls = [SimpleNamespace(index=0, id="call_up", function=function)]
    delta = SimpleNamespace(content=content, tool_calls=calls)
    return SimpleNamespace(usage=None, choices=[SimpleNamespace(delta=delta, finish_reason=finish)])


def test_the_upstreams_choice_comes_back_as_the_replys_content() -> None:
    upstream = OpenAIBackend(OpenAIConfig(kind="openai", base_url="http://upstream.invalid/v1", model="m"))
    replies = [
        [
            _event(content="Let me think. "),
            _event(arguments='{"choice": "fle', name="choose"),
            _event(arguments='et-monitor"}'),
        ],
        [_event(content="no call at all", finish="stop")],
        [_event(arguments="not json", finish="tool_calls", name="choose")],
    ]

    async def create(**sent: Any) -> _Stream:
        return _Stream(replies.pop(0))

    upstream._client = SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create)))  # type: ignore[assignment]
    request = ModelRequest(agent="a", messages=USER, choice=CHOICES)
    first = run(collect(upstream.stream(request)))
    assert (first.content, first.tool_calls, first.finish_reason) == ("fleet-monitor", [], "stop")
    assert run(collect(upstream.stream(request))).content == ""  # no choice made: the loop reads it so
    assert run(collect(upstream.stream(request))).content == ""
