"""Every path of the agent loop and every error case, over HTTP on the test application."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import QA_KEY, Fleet


@pytest.fixture
def client(fleet: Fleet) -> openai.OpenAI:
    return openai.OpenAI(base_url=fleet.test_url + "/v1", api_key=QA_KEY, max_retries=0)


def ask(test_api: httpx.Client, text: str, **extra: Any) -> httpx.Response:
    body = {"model": "tester", "messages": [{"role": "user", "content": text}], **extra}
    return test_api.post("/v1/chat/completions", json=body)


def fleet_ext(response: httpx.Response) -> dict[str, Any]:
    ext: dict[str, Any] = response.json()["fleet"]
    return ext


def test_server_side_tool_round_trip(test_api: httpx.Client) -> None:
    r = ask(test_api, "#add")
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "sum: 5"
    assert fleet_ext(r)["turns"] == 2 and fleet_ext(r)["tool_calls"] == 1


def test_langchain_tool_runs_unchanged(test_api: httpx.Client) -> None:
    r = ask(test_api, "#multiply")
    assert r.json()["choices"][0]["message"]["content"] == "product: 42"


@pytest.mark.parametrize(
    ("trigger", "expected", "counter"),
    [
        ("#invalid", "after invalid: error: invalid arguments for add: a:", "invalid_tool_calls"),
        ("#badjson", "after bad json: error: invalid arguments for add", "invalid_tool_calls"),
        (
            "#unknown",
            "after unknown: error: the call to 'launch_missiles' was denied by policy",
            "invalid_tool_calls",
        ),
        ("#fail", "after failure: error: fail failed: RuntimeError: disk on fire", "tool_failures"),
        ("#slow", "after timeout: error: slow timed out after 0.5s", "tool_failures"),
    ],
)
def test_bad_tool_calls_are_told_to_the_model_and_counted(
    test_api: httpx.Client, trigger: str, expected: str, counter: str
) -> None:
    r = ask(test_api, trigger)
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"].startswith(expected)
    assert fleet_ext(r)[counter] == 1


def test_client_side_tool_call_round_trip(client: openai.OpenAI) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages: list[Any] = [{"role": "user", "content": "#client"}]
    first = client.chat.completions.create(model="tester", messages=messages, tools=tools)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"},
    ]
    second = client.chat.completions.create(model="tester", messages=messages, tools=tools)
    assert second.choices[0].message.content == "weather: sunny, 21C"
    assert second.choices[0].finish_reason == "stop"


def test_client_tool_call_streams_as_tool_call_delta(client: openai.OpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    chunks = list(
        client.chat.completions.create(
            model="tester", messages=[{"role": "user", "content": "#client"}], tools=tools, stream=True
        )
    )
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas and deltas[0][0].function.name == "get_weather"  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_delegation_through_handle(test_api: httpx.Client) -> None:
    r = ask(test_api, "#delegate please")
    assert r.json()["choices"][0]["message"]["content"] == "helper said: helper handled: #delegate please"
    assert fleet_ext(r)["delegations"] == ["helper"]


def test_a_message_larger_than_grpcs_default_limit_crosses_every_hop(test_api: httpx.Client) -> None:
    """Fleet's deployments call each other over gRPC, whose own cap is 4 MiB a message: a
    4.5 MiB message goes to the agent, its model and its delegate, and comes back, whole."""
    text = "#delegate " + "x" * (9 << 19)
    r = ask(test_api, text)
    assert r.status_code == 200, r.text[:500]
    assert r.json()["choices"][0]["message"]["content"] == "helper said: helper handled: " + text


def test_prompt_rendered_from_typed_variables(test_api: httpx.Client) -> None:
    default = ask(test_api, "#system").json()["choices"][0]["message"]["content"]
    assert default.strip() == "You serve Initech at priority 1."
    custom = ask(test_api, "#system", metadata={"customer": "Globex", "priority": "3"})
    assert custom.json()["choices"][0]["message"]["content"].strip() == "You serve Globex at priority 3."
    bad = ask(test_api, "#system", metadata={"priority": "urgent"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "metadata.priority"


def test_max_turns_exceeded_is_a_clear_error(test_api: httpx.Client) -> None:
    r = ask(test_api, "#loop")
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "max_turns_exceeded" and "max_turns=3" in err["message"]


def test_model_failure_is_an_envelope_not_a_hang(test_api: httpx.Client) -> None:
    r = ask(test_api, "#model-error")
    assert r.status_code == 502
    assert r.json()["error"] == {
        "message": "simulated engine failure",
        "type": "server_error",
        "param": None,
        "code": "model_error",
    }
    streamed = ask(test_api, "#model-error", stream=True)
    assert streamed.status_code == 502 and streamed.json()["error"]["code"] == "model_error"


def test_slow_agent_times_out_with_504(test_api: httpx.Client) -> None:
    r = ask(test_api, "#hang")
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"


def test_streaming_of_the_test_agent(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="tester", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    words = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(words) == "one two three four five six" and len(words) == 6


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"model": "tester"}).encode(), 400, "messages"),
        (json.dumps({"model": "tester", "messages": []}).encode(), 400, "messages"),
        (json.dumps({"model": "tester", "messages": "hi"}).encode(), 400, "messages"),
        (
            json.dumps({"model": "tester", "messages": [{"role": "wizard", "content": "x"}]}).encode(),
            400,
            "messages[0]",
        ),
        (
            json.dumps({"model": "tester", "messages": [{"role": "user"}]}).encode(),
            400,
            "messages[0].content",
        ),
        (
            json.dumps(
                {"model": "tester", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}
            ).encode(),
            400,
            "temperature",
        ),
        (
            json.dumps(
                {"model": "tester", "messages": [{"role": "user", "content": "x"}], "bogus": 1}
            ).encode(),
            400,
            "bogus",
        ),
        (
            json.dumps({"model": "nobody", "messages": [{"role": "user", "content": "x"}]}).encode(),
            404,
            "model",
        ),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), 400, "model"),
    ],
)
def test_bad_requests_get_the_openai_envelope(
    test_api: httpx.Client, body: bytes, status: int, param: str | None
) -> None:
    r = test_api.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert "Traceback" not in r.text
    assert test_api.get("/v1/health").json()["status"] == "ok"


def test_oversized_body_is_413(test_api: httpx.Client) -> None:
    big = {
        "model": "tester",
        "messages": [{"role": "user", "content": "x" * (6 << 20)}],
    }  # the test app's limit
    r = test_api.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"

    def chunked() -> Any:  # no content-length: the limit still holds
        yield json.dumps(big).encode()

    r = test_api.post("/v1/chat/completions", content=chunked())
    assert r.status_code == 413
    assert test_api.get("/v1/health").status_code == 200


def test_unknown_route_is_an_envelope(test_api: httpx.Client) -> None:
    r = test_api.get("/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_openai_client_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tester", messages=[])
    assert info.value.param == "messages"  # type: ignore[attr-defined]


def test_openai_backend_talks_to_a_real_openai_compatible_upstream(client: openai.OpenAI) -> None:
    # relay's model is the `openai` backend; its upstream is this Fleet's helper agent.
    reply = client.chat.completions.create(model="relay", messages=[{"role": "user", "content": "ping"}])
    assert reply.choices[0].message.content == "helper handled: ping"
    assert reply.usage is not None and reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    chunks = list(
        client.chat.completions.create(
            model="relay", messages=[{"role": "user", "content": "ping pong"}], stream=True
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "helper handled: ping pong"
    )
