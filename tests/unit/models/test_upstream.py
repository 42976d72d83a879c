"""serve.models.upstream: what an OpenAI-compatible upstream is sent for a model call."""

from __future__ import annotations

from typing import Any

from serve.models.base import ModelRequest
from serve.models.upstream import OpenAIBackend, OpenAIConfig
from serve.protocol import JsonSchemaFormat

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
