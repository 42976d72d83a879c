"""The real vLLM engine (CPU build, embedded SmolLM2) behind the Fleet agents, over HTTP."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from loadtests.routing import repeated_stretch
from tests.e2e.conftest import BASE_URL

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(fleet_up: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=BASE_URL + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_answer_and_usage_come_from_the_engine(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="orchestrator", messages=FRANCE, tool_choice="none", temperature=0, max_tokens=32
    )
    assert "Paris" in (reply.choices[0].message.content or "")
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 20 and 0 < usage.completion_tokens <= 32


def test_tokens_stream_as_they_are_generated(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="orchestrator",
            messages=FRANCE,
            tool_choice="none",
            temperature=0,
            max_tokens=32,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3, pieces  # several chunks before the last, not one buffered reply
    assert "Paris" in "".join(pieces)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= len(pieces) - 1


def test_forced_tool_call_is_valid_against_the_schema(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="orchestrator",
        messages=[{"role": "user", "content": "Is it raining in Lyon?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[union-attr]


def test_max_tokens_is_honoured(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="orchestrator",
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        tool_choice="none",
        max_tokens=5,
    )
    assert reply.usage is not None and reply.usage.completion_tokens <= 5
    assert reply.choices[0].finish_reason == "length"


def test_over_long_prompt_is_a_400_naming_messages(fleet_up: str) -> None:
    words = "lorem ipsum dolor sit amet " * 900  # ~4500 tokens, over max_model_len 2048
    r = httpx.post(
        BASE_URL + "/v1/chat/completions",
        json={
            "model": "orchestrator",
            "messages": [{"role": "user", "content": words}],
            "tool_choice": "none",
        },
        timeout=300,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"
    assert "context length" in r.json()["error"]["message"]
    assert httpx.get(BASE_URL + "/v1/health", timeout=30).status_code == 200


def test_a_looping_reply_is_cut_by_the_engine(client: openai.OpenAI) -> None:
    """A 135M model falls into loops ("14.14.14..."); the engine's repetition stop ends a
    reply at the loop's first 48 characters instead of at max_tokens. Three routed
    questions (the HR, supply chain and monitor agents answer from their tools)."""
    for question in (
        "How many days of leave can I carry over? My employee id is E1001.",
        "What safety stock do we need for SKU-1001 at a 99% service level?",
        "How many replicas is each deployment running right now?",
    ):
        reply = client.chat.completions.create(
            model="orchestrator", messages=[{"role": "user", "content": question}]
        )
        text = reply.choices[0].message.content or ""
        assert text.strip(), question
        # a loop may show, up to the stop's 48 characters and the delta that crossed them
        assert repeated_stretch(text, min_repeats=4, min_chars=96, min_symbol_chars=96) is None, text
