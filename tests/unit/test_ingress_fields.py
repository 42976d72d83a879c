"""Every Chat Completions argument the official ``openai`` client can send, through that
client, against the real ingress app (ASGI, no Ray) in front of a real agent loop.

The agent's handle runs :class:`~serve.loop.runner.AgentLoop` in process on a scripted
model, so each test sees both what the agent was handed (the parsed ``ChatRequest``) and
what its model was asked (each ``ModelRequest``). The sweep is checked against the
client's own ``CompletionCreateParams``: an argument a newer client adds fails the test
until Fleet decides what to do with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat.completion_create_params import CompletionCreateParamsStreaming
from ray import serve as rayserve

from serve.app import agent_card
from serve.auth import TenantKey, hash_key
from serve.context import Context
from serve.errors import RequestError
from serve.governance.config import GovernanceConfig
from serve.ingress import IngressOptions, app
from serve.loop.results import AgentResult, Event
from serve.manifest import load_agent
from serve.models.base import ModelRequest
from serve.protocol import ChatRequest, JsonSchemaFormat
from serve.testing import GovernedAgent, ScriptedModel, rule
from tests.unit.conftest import AGENTS, run
from tests.unit.test_ingress import Fleet

AGENT = "hr-policy-advisor"
SPEC = load_agent(AGENTS / AGENT)
ANSWER = '{"days": 12}'
LEAVE = {
    "type": "object",
    "properties": {"days": {"type": "integer"}},
    "required": ["days"],
    "additionalProperties": False,
}
CLIENT_TOOL = {
    "type": "function",
    "function": {
        "name": "open_ticket",
        "description": "Open a ticket in the client's tracker.",
        "parameters": {"type": "object", "properties": {"title": {"type": "string"}}},
        "strict": True,
    },
}
USER = [
    {"role": "developer", "content": "Answer in JSON."},
    {"role": "user", "content": [{"type": "text", "text": "How many days of leave do I have?"}]},
]

# Honoured: each reaches the model call (see MODEL_SAW).
HONOURED: dict[str, Any] = {
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "leave", "description": "Days left.", "schema": LEAVE, "strict": True},
    },
    "temperature": 0.3,
    "top_p": 0.9,
    "seed": 7,
    "stop": ["\n\n"],
    "presence_penalty": 0.5,
    "frequency_penalty": 0.25,
    "logit_bias": {"50256": -100},
    "max_completion_tokens": 64,
    "max_tokens": 80,
    "tools": [CLIENT_TOOL],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "metadata": {"company": "Globex"},  # the agent's prompt variable
}
# Accepted: they cannot change the answer (docs/DECISIONS.md, issue 17).
HARMLESS: dict[str, Any] = {
    "n": 1,
    "logprobs": False,
    "top_logprobs": 0,
    "modalities": ["text"],
    "store": False,
    "user": "employee-17",
    "service_tier": "auto",
    "prompt_cache_key": "hr-leave",
    "prompt_cache_options": {"mode": "implicit", "ttl": "30m"},
    "prompt_cache_retention": "24h",
    "safety_identifier": "5f0c3e",
    "reasoning_effort": "low",
    "verbosity": "low",
    "prediction": {"type": "content", "content": ANSWER},
}
# Refused: a 400 naming the argument, since its value cannot be honoured.
REFUSED: list[tuple[str, Any]] = [
    ("n", 2),
    ("logprobs", True),
    ("top_logprobs", 3),
    ("modalities", ["text", "audio"]),
    ("audio", {"format": "wav", "voice": "alloy"}),
    ("web_search_options", {"search_context_size": "low"}),
    ("moderation", {"model": "omni-moderation-latest"}),
    ("functions", [{"name": "open_ticket"}]),
    ("function_call", "auto"),
    ("store", True),
    ("tool_choice", {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}),
]
STREAMING_ONLY: dict[str, Any] = {"stream_options": {"include_usage": True, "include_obfuscation": False}}


class LoopHandle:
    """An agent deployment's handle that runs the agent's loop in process."""

    def __init__(self, agent: GovernedAgent) -> None:
        self.agent = agent
        self.asked: list[ChatRequest] = []
        self.chat = SimpleNamespace(remote=self._chat)
        self.stream = SimpleNamespace(remote=self._stream)

    def options(self, **_: Any) -> LoopHandle:
        return self

    def _chat(self, request: ChatRequest, ctx: Context) -> asyncio.Task[AgentResult | RequestError]:
        self.asked.append(request)
        return asyncio.ensure_future(self._answer(request, ctx))

    async def _answer(self, request: ChatRequest, ctx: Context) -> AgentResult | RequestError:
        try:
            return await self.agent.loop.run(request, ctx)
        except RequestError as exc:  # as the agent deployment returns it
            return exc

    def _stream(self, request: ChatRequest, ctx: Context) -> Events:
        self.asked.append(request)
        return Events(self.agent.loop.events(request, ctx))


class Events:
    """A handle's stream: the loop's events, cancellable."""

    def __init__(self, events: AsyncIterator[Event]) -> None:
        self._events = events

    async def __anext__(self) -> Event:
        return await anext(self._events)

    def cancel(self) -> None:
        pass


@pytest.fixture
def fleet(monkeypatch: pytest.MonkeyPatch) -> tuple[Fleet, LoopHandle, ScriptedModel]:
    model = ScriptedModel([rule("", {"content": ANSWER}, agent=AGENT)])
    handle = LoopHandle(GovernedAgent(SPEC, model))
    made = Fleet(handle, IngressOptions(), GovernanceConfig(), {AGENT: agent_card(SPEC)})  # type: ignore[arg-type]
    monkeypatch.setattr(
        rayserve, "get_replica_context", lambda: SimpleNamespace(servable_object=made.ingress)
    )
    return made, handle, model


@contextlib.asynccontextmanager
async def client(fleet: Fleet) -> AsyncIterator[openai.AsyncOpenAI]:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app))
    try:
        yield openai.AsyncOpenAI(
            base_url="http://fleet/v1", api_key="unused", http_client=http, max_retries=0
        )
    finally:
        await http.aclose()
        await fleet.settle()


def test_the_sweep_covers_every_argument_of_the_official_client() -> None:
    sent = {"model", "messages", "stream", *HONOURED, *HARMLESS, *STREAMING_ONLY, *(f for f, _ in REFUSED)}
    assert sent == set(CompletionCreateParamsStreaming.__annotations__)
    assert set(ChatRequest.model_fields) >= sent


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_every_argument_the_client_sends_is_honoured_or_accepted(fleet: Any, stream: bool) -> None:
    made, handle, model = fleet
    extra = STREAMING_ONLY if stream else {}

    async def scenario() -> str:
        async with client(made) as openai_client:
            reply: Any = await openai_client.chat.completions.create(
                model=AGENT, messages=USER, stream=stream, **HONOURED, **HARMLESS, **extra
            )
            if not stream:
                return str(reply.choices[0].message.content)
            return "".join([c.choices[0].delta.content or "" async for c in reply if c.choices])

    assert json.loads(run(scenario())) == {"days": 12}
    (asked,) = handle.asked
    for name, value in {**HONOURED, **HARMLESS, **extra}.items():
        got = getattr(asked, name)
        dumped = got.model_dump(by_alias=True, exclude_none=True) if hasattr(got, "model_dump") else got
        if name == "tools":
            dumped = [t.model_dump(exclude_none=True) for t in got]
        if name == "logit_bias":
            dumped = {str(k): v for k, v in got.items()}
        if name == "stream_options":
            dumped = got.model_dump()
        assert dumped == value, name
    (seen,) = model.requests
    assert_model_saw(seen)


def assert_model_saw(seen: ModelRequest) -> None:
    """What the model call was asked: the honoured arguments, as backends read them."""
    assert (seen.temperature, seen.top_p, seen.seed, seen.stop) == (0.3, 0.9, 7, ["\n\n"])
    assert (seen.presence_penalty, seen.frequency_penalty, seen.logit_bias) == (0.5, 0.25, {50256: -100})
    assert seen.max_tokens == 64  # max_completion_tokens wins over max_tokens
    assert isinstance(seen.response_format, JsonSchemaFormat)
    assert seen.response_format.json_schema.schema_ == LEAVE and seen.response_format.json_schema.strict
    assert seen.parallel_tool_calls is False and seen.tool_choice == "auto"
    assert [t["function"]["name"] for t in seen.tools] == ["open_ticket"]
    assert "Globex" in seen.messages[0]["content"]  # metadata: the prompt's variable


@pytest.mark.parametrize(("field", "value"), REFUSED, ids=[f for f, _ in REFUSED])
def test_a_value_fleet_cannot_honour_is_a_400_naming_it(fleet: Any, field: str, value: Any) -> None:
    made, handle, _ = fleet

    async def scenario() -> openai.BadRequestError:
        async with client(made) as openai_client:
            with pytest.raises(openai.BadRequestError) as caught:
                await openai_client.chat.completions.create(model=AGENT, messages=USER, **{field: value})
            return caught.value

    error = run(scenario())
    assert error.status_code == 400 and error.param == field
    assert error.code in ("unsupported_value", "invalid_value") and error.type == "invalid_request_error"
    assert handle.asked == []


def test_a_model_is_retrieved_by_id_as_listed_and_an_unknown_one_is_a_404(fleet: Any) -> None:
    made, _, _ = fleet

    async def scenario() -> tuple[Any, Any, list[openai.NotFoundError]]:
        async with client(made) as openai_client:
            retrieved = await openai_client.models.retrieve(AGENT)
            listed = [m async for m in openai_client.models.list()]
            missing = []
            for ghost in ("ghost", f"{AGENT}@9.9.9"):  # a pinned id reaches the route whole
                with pytest.raises(openai.NotFoundError) as caught:
                    await openai_client.models.retrieve(ghost)
                missing.append(caught.value)
            return retrieved, listed, missing

    retrieved, listed, missing = run(scenario())
    assert retrieved.id == AGENT and retrieved.owned_by == "People Operations"
    assert [m.model_dump() for m in listed] == [retrieved.model_dump()]
    for error in missing:
        assert (error.code, error.param, error.type) == ("model_not_found", "model", "invalid_request_error")
    assert "ghost" in missing[0].message and f"{AGENT}@9.9.9" in missing[1].message


def test_with_keys_required_retrieving_a_model_needs_one(monkeypatch: pytest.MonkeyPatch) -> None:
    tenants = [TenantKey(tenant="acme", key_sha256=hash_key("fk-acme"), roles=["employee"])]
    made = Fleet(
        LoopHandle(GovernedAgent(SPEC, ScriptedModel([rule("", "unused")]))),
        IngressOptions(),
        GovernanceConfig(tenants=tenants),
        {AGENT: agent_card(SPEC)},
    )  # type: ignore[arg-type]
    monkeypatch.setattr(
        rayserve, "get_replica_context", lambda: SimpleNamespace(servable_object=made.ingress)
    )

    async def scenario() -> tuple[int, int]:
        anonymous = await made.http.get(f"/v1/models/{AGENT}")
        keyed = await made.http.get(f"/v1/models/{AGENT}", headers={"authorization": "Bearer fk-acme"})
        await made.settle()
        return anonymous.status_code, keyed.status_code

    assert run(scenario()) == (401, 200)
