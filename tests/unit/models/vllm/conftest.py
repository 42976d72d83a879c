"""Tools, a conversation and a config for the vllm backend's tests; no engine is started.

The tests that need vLLM's classes take the ``vllm`` fixture, which imports it (~14 s,
once) or skips where it is not installed.
"""

from __future__ import annotations

from typing import Any

import pytest

from serve.models.vllm import VLLMConfig

WEATHER_PARAMS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": WEATHER_PARAMS},
}
CLOCK: dict[str, Any] = {"type": "function", "function": {"name": "now"}}  # no parameters, no description
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
}
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}],
    },
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
]


def config(**changes: Any) -> VLLMConfig:
    return VLLMConfig.model_validate({"kind": "vllm", **changes})


def call_schema(name: str, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


@pytest.fixture(scope="session")
def vllm() -> Any:
    return pytest.importorskip("vllm")
