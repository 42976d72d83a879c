"""serve.ingress without Ray: the FastAPI app, driven over ASGI, in front of fake agents.

``@rayserve.ingress`` wraps ``Ingress`` in a class whose ``__init__`` is async and starts
the ASGI app the way a replica does; the class beneath it is Fleet's own, constructed
here with in-process fakes for the agents' handles and a real audit link server. The
routes get their ``self`` from Ray's replica context, stubbed to answer this instance.
(The ``x-request-id`` response header is added by Ray's proxy, not the ingress: here
the header the client sends is the request's correlation id.)
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from ray import serve as rayserve
from ray.serve.exceptions import BackPressureError

from serve.app import agent_card
from serve.approvals.inbox import render_inbox
from serve.auth import TenantKey, hash_key
from serve.budget.config import BudgetLimits, BudgetsConfig
from serve.cards import AgentCard
from serve.context import Context
from serve.errors import BudgetExceeded, Overloaded, RequestError
from serve.governance.config import GovernanceConfig
from serve.ingress import Ingress, IngressOptions, app
from serve.loop.results import AgentResult, ContentDelta, Finished, Stats
from serve.manifest import load_agent
from serve.protocol import ChatRequest, FunctionCall, ToolCall, Usage
from tests.unit.audit.test_client import FlakyService
from tests.unit.budget.fakes import Clock, FakeHandle, service
from tests.unit.conftest import AGENTS, ROOT, run

AGENT = "hr-policy-advisor"
CARD = agent_card(load_agent(AGENTS / AGENT))
USER = [{"role": "user", "content": "How many days of leave do I have?"}]
RESULT = AgentResult(
    "You have 12 days.",
    [],
    "stop",
    Usage(prompt_tokens=9, completion_tokens=4),
    Stats(turns=2, tool_calls=1, delegations=[]),
)


class Events:
    """A handle's stream in flight: the events it yields, then its end (or a failure)."""

    def __init__(self, items: list[Any], failure: BaseException | None) -> None:
        self._items, self._failure = iter(items), failure
        self.cancelled = False

    async def __anext__(self) -> Any:
        if self._failure is not None:
            raise self._failure
        try:
            return next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self) -> None:
        self.cancelled = True


class FakeAgent:
    """An agent deployment's handle, in process: ``.chat.remote`` answers ``outcome`` (or
    raises ``failure``); ``.options(stream=True).stream.remote`` yields ``events``."""

    def __init__(
        self,
        outcome: AgentResult | RequestError = RESULT,
        events: list[Any] | None = None,
        failure: BaseException | None = None,
        hang: bool = False,
    ) -> None:
        self.outcome, self.events, self.failure, self.hang = outcome, events or [], failure, hang
        self.asked: list[tuple[ChatRequest, Context]] = []
        self.replies: list[asyncio.Task[Any]] = []
        self.streams: list[Events] = []
        self.chat = SimpleNamespace(remote=self._chat)
        self.stream = SimpleNamespace(remote=self._stream)

    def options(self, **_: Any) -> FakeAgent:  # the transport, stream=True
        return self

    def _chat(self, request: ChatRequest, ctx: Context) -> asyncio.Task[Any]:
        self.asked.append((request, ctx))
        reply = asyncio.ensure_future(self._answer())  # awaitable and cancellable, as Ray's is
        self.replies.append(reply)
        return reply

    async def _answer(self) -> AgentResult | RequestError:
        if self.hang:
            await asyncio.Event().wait()
        if self.failure is not None:
            raise self.failure
        return self.outcome

    def _stream(self, request: ChatRequest, ctx: Context) -> Events:
        self.asked.append((request, ctx))
        self.streams.append(Events(self.events, self.failure))
        return self.streams[-1]


class Fleet:
    """An ``Ingress`` over fake agents, and an HTTP client of its app."""

    def __init__(
        self,
        agent: FakeAgent,
        options: IngressOptions,
        config: GovernanceConfig,
        cards: dict[str, AgentCard],
        ledger: Any = None,
        budgets: BudgetsConfig | None = None,
    ) -> None:
        self.audit = FlakyService()
        fleets_own = Ingress.__bases__[0]  # beneath Ray's wrapper (its __init__ and __del__ are async)
        self.ingress: Any = fleets_own(
            cards, {AGENT: agent}, options, config, str(ROOT), self.audit, "actor", ledger, budgets
        )
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://fleet")

    async def chat(self, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
        body = {"model": AGENT, "messages": USER, **fields}
        return await self.http.post("/v1/chat/completions", json=body, headers=headers)

    async def settle(self) -> None:
        """Everything this ingress recorded is stored (its outcome steps included)."""
        await self.ingress._audit.commit()
        self.ingress._audit._drop_link()  # closed before the loop ends, not in its teardown
        if self.audit._server is not None:
            self.audit.restart()
        await self.http.aclose()


@pytest.fixture
def serve_with(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``serve_with(agent, ...)``: a Fleet whose routes resolve to its ingress."""

    def make(
        agent: FakeAgent,
        options: IngressOptions | None = None,
        config: GovernanceConfig | None = None,
        ledger: Any = None,
        budgets: BudgetsConfig | None = None,
    ) -> Fleet:
        fleet = Fleet(
            agent, options or IngressOptions(), config or GovernanceConfig(), {AGENT: CARD}, ledger, budgets
        )
        monkeypatch.setattr(
            rayserve, "get_replica_context", lambda: SimpleNamespace(servable_object=fleet.ingress)
        )
        return fleet

    yield make


def test_a_completion_is_the_openai_object_with_the_fleet_extension(serve_with: Any) -> None:
    agent = FakeAgent()

    async def scenario() -> None:
        fleet = serve_with(agent)
        response = await fleet.chat({"x-request-id": "req_unit1"})
        await fleet.settle()
        assert response.status_code == 200
        body = response.json()
        # The request id is the server's (128 random bits), the client's kept beside it.
        request_id = response.headers["x-fleet-request-id"]
        assert re.fullmatch(r"req_[0-9a-f]{32}", request_id)
        assert (
            body["id"] == "chatcmpl-" + request_id.removeprefix("req_")
            and body["object"] == "chat.completion"
        )
        assert body["model"] == AGENT
        assert body["choices"] == [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "You have 12 days."},
                "finish_reason": "stop",
            }
        ]
        assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
        assert body["fleet"] == {
            "request_id": request_id,
            "correlation_id": "req_unit1",
            "trace_id": None,
            "session_id": None,
            "agent": AGENT,
            "agent_version": "1.0.0",
            "turns": 2,
            "tool_calls": 1,
            "tool_failures": 0,
            "invalid_tool_calls": 0,
            "policy_denials": 0,
            "escalations": 0,
            "delegations": [],
            "cost_usd": "0",
        }
        ((request, ctx),) = agent.asked
        assert request.model == AGENT and ctx.request_id == request_id and ctx.correlation_id == "req_unit1"
        assert ctx.audit is not None and [r["point"] for r in ctx.audit.records] == ["ingress"]

    run(scenario())


def frames(response: httpx.Response) -> list[str]:
    text = response.text
    assert text.endswith("\n\n") and all(f.startswith("data: ") for f in text.split("\n\n")[:-1])
    return [f.removeprefix("data: ") for f in text.split("\n\n")[:-1]]


def test_a_stream_is_sse_chunks_then_usage_then_done(serve_with: Any) -> None:
    call = ToolCall(id="call_1", function=FunctionCall(name="leave_balance", arguments="{}"))
    result = AgentResult("Hello", [call], "tool_calls", Usage(prompt_tokens=3, completion_tokens=2), Stats())
    agent = FakeAgent(events=[ContentDelta("Hel"), ContentDelta("lo"), Finished(result)])

    async def scenario() -> None:
        fleet = serve_with(agent)
        response = await fleet.chat(
            {"x-request-id": "req_s1"}, stream=True, stream_options={"include_usage": True}
        )
        await fleet.settle()
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        *chunks, done = frames(response)
        assert done == "[DONE]"
        parsed = [json.loads(c) for c in chunks]
        request_id = response.headers["x-fleet-request-id"]
        assert {c["id"] for c in parsed} == {"chatcmpl-" + request_id.removeprefix("req_")}
        assert len({c["created"] for c in parsed}) == 1
        assert [c["choices"][0]["delta"] if c["choices"] else None for c in parsed] == [
            {"role": "assistant", "content": ""},
            {"content": "Hel"},
            {"content": "lo"},
            {"tool_calls": [{"index": 0, **call.model_dump()}]},
            {},
            None,
        ]
        assert parsed[4]["choices"][0]["finish_reason"] == "tool_calls"
        assert parsed[4]["fleet"]["request_id"] == request_id and parsed[4]["fleet"]["agent"] == AGENT
        assert parsed[4]["fleet"]["correlation_id"] == "req_s1"
        assert parsed[5]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        assert all("usage" not in c for c in parsed[:5])

    run(scenario())


@pytest.mark.parametrize(
    ("agent", "message"),
    [
        (  # the agent's queue at this ingress is full: Serve refuses the stream itself
            FakeAgent(failure=BackPressureError(num_queued_requests=9, max_queued_requests=8)),
            f"agent {AGENT!r} is at capacity; retry later",
        ),
        (  # the agent's call to its model found the model's queue full: its first event says so
            FakeAgent(events=[Overloaded("model deployment 'model-default' is at capacity; retry later")]),
            "model deployment 'model-default' is at capacity; retry later",
        ),
    ],
    ids=["agent-full", "model-full"],
)
def test_an_error_before_the_first_event_is_a_status_not_a_stream(
    serve_with: Any, agent: FakeAgent, message: str
) -> None:
    async def scenario() -> None:
        fleet = serve_with(agent, IngressOptions(retry_after_s=7))
        response = await fleet.chat(stream=True)
        await fleet.settle()
        assert response.status_code == 503
        assert response.headers["retry-after"] == "7"
        error = response.json()["error"]
        assert (error["code"], error["message"]) == ("overloaded", message)

    run(scenario())


def test_a_request_tree_over_its_budget_is_a_402_the_client_should_not_retry(serve_with: Any) -> None:
    spent = BudgetExceeded(
        "the request:hr-policy-advisor budget of 0.01 USD cannot cover this call",
        param="request:hr-policy-advisor",
    )

    async def scenario() -> None:
        for stream in (False, True):  # refused before any output: a status, streamed or not
            fleet = serve_with(FakeAgent(outcome=spent, events=[spent]))
            response = await fleet.chat(stream=stream)
            await fleet.settle()
            assert response.status_code == 402
            assert response.json() == {
                "error": {
                    "message": spent.message,
                    "type": "insufficient_quota",
                    "param": "request:hr-policy-advisor",
                    "code": "budget_exceeded",
                }
            }
            assert response.headers["x-should-retry"] == "false"  # the official clients retry some 4xx
            assert "retry-after" not in response.headers and "x-fleet-request-id" in response.headers

    run(scenario())


def test_what_the_request_tree_cost_is_fleets_cost_usd_not_openais_usage(serve_with: Any) -> None:
    usage = Usage(prompt_tokens=1, completion_tokens=0, cost_usd=Decimal("0.00000015"))
    result = AgentResult("Hi", [], "stop", usage, Stats())

    async def scenario() -> None:
        fleet = serve_with(FakeAgent(outcome=result, events=[Finished(result)]))
        body = (await fleet.chat()).json()
        streamed = await fleet.chat(stream=True, stream_options={"include_usage": True})
        await fleet.settle()
        assert body["fleet"]["cost_usd"] == "0.00000015"  # plain notation, exact: not 1.5e-07
        assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}
        *chunks, _ = frames(streamed)
        *_, final, usage_only = [json.loads(c) for c in chunks]
        assert final["fleet"]["cost_usd"] == "0.00000015"
        assert usage_only["usage"] == body["usage"]

    run(scenario())


def test_an_unknown_parameter_is_a_400_naming_it(serve_with: Any) -> None:
    async def scenario() -> None:
        fleet = serve_with(FakeAgent())
        response = await fleet.chat(best_of=2)  # the legacy completions API's, not chat's
        await fleet.settle()
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["param"] == "best_of"
        assert error["message"] == "Unrecognized request argument supplied: best_of"
        assert error["type"] == "invalid_request_error"

    run(scenario())


def test_an_unknown_model_is_a_404(serve_with: Any) -> None:
    agent = FakeAgent()

    async def scenario() -> None:
        fleet = serve_with(agent)
        response = await fleet.http.post("/v1/chat/completions", json={"model": "ghost", "messages": USER})
        await fleet.settle()
        assert response.status_code == 404
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("model_not_found", "model")
        assert agent.asked == []

    run(scenario())


def test_with_tenants_a_missing_key_is_a_401_asking_for_a_bearer_key(serve_with: Any) -> None:
    tenants = [
        TenantKey(tenant="acme", key_sha256=hash_key("fk-acme"), roles=["employee"]),
        TenantKey(tenant="ops", key_sha256=hash_key("fk-ops"), roles=["sre"]),  # not this agent's callers
    ]
    agent = FakeAgent()

    async def scenario() -> None:
        fleet = serve_with(agent, config=GovernanceConfig(tenants=tenants))
        missing = await fleet.chat()
        wrong = await fleet.chat({"authorization": "Bearer fk-other"})
        refused = await fleet.chat({"authorization": "Bearer fk-ops"})
        right = await fleet.chat({"authorization": "Bearer fk-acme"})
        await fleet.settle()
        for response in (missing, wrong):
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.json()["error"]["type"] == "authentication_error"
        assert refused.status_code == 403
        denied = refused.json()["error"]
        assert (denied["code"], denied["param"]) == ("policy_denied", "model")
        assert refused.headers["x-fleet-decision-id"] == denied["decision_id"]
        assert [r["decision_id"] for r in fleet.audit.stored if r.get("outcome") == "deny"] == [
            denied["decision_id"]
        ]
        assert right.status_code == 200
        ((_, ctx),) = agent.asked
        assert ctx.principal is not None and ctx.principal.tenant == "acme"

    run(scenario())


def test_a_body_over_the_limit_is_a_413(serve_with: Any) -> None:
    agent = FakeAgent()

    async def scenario() -> None:
        fleet = serve_with(agent, IngressOptions(max_body_bytes=64))
        response = await fleet.chat(user="x" * 100)
        await fleet.settle()
        assert response.status_code == 413
        assert response.json()["error"]["message"] == "request body exceeds 64 bytes"
        assert agent.asked == []

    run(scenario())


def test_an_agent_at_capacity_is_a_503_with_retry_after_and_its_admission_is_audited(serve_with: Any) -> None:
    agent = FakeAgent(failure=BackPressureError(num_queued_requests=9, max_queued_requests=8))

    async def scenario() -> None:
        fleet = serve_with(agent, IngressOptions(retry_after_s=3))
        response = await fleet.chat({"x-request-id": "req_full"})
        await fleet.settle()
        assert response.status_code == 503
        assert response.headers["retry-after"] == "3"
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "overloaded")
        assert error["message"] == f"agent {AGENT!r} is at capacity; retry later"
        # The agent never had the admission record: the ingress committed it.
        admitted = [r for r in fleet.audit.stored if r.get("point") == "ingress"]
        assert [r["request_id"] for r in admitted] == [response.headers["x-fleet-request-id"]]

    run(scenario())


def test_an_agent_that_does_not_answer_in_time_is_a_504_and_its_call_is_cancelled(serve_with: Any) -> None:
    agent = FakeAgent(hang=True)

    async def scenario() -> None:
        fleet = serve_with(agent, IngressOptions(request_timeout_s=0.05))
        response = await fleet.chat()
        await fleet.settle()
        assert response.status_code == 504
        assert response.json()["error"]["message"] == "the agent did not answer within 0.05s"
        (reply,) = agent.replies
        assert reply.cancelled()

    run(scenario())


def test_the_agents_are_listed_and_each_card_answers_as_built(serve_with: Any) -> None:
    async def scenario() -> None:
        fleet = serve_with(FakeAgent())
        models = (await fleet.http.get("/v1/models")).json()
        listed = (await fleet.http.get("/v1/agents")).json()
        card = await fleet.http.get(f"/v1/agents/{AGENT}")
        ghost = await fleet.http.get("/v1/agents/ghost")
        await fleet.settle()
        assert [(m["id"], m["owned_by"]) for m in models["data"]] == [(AGENT, "People Operations")]
        assert listed == {"object": "list", "data": [CARD.wire()]}
        assert card.json() == CARD.wire()
        assert card.content == json.dumps(CARD.wire(), separators=(",", ":")).encode()
        assert ghost.status_code == 404

    run(scenario())


KEYED = GovernanceConfig(
    tenants=[TenantKey(tenant="acme", key_sha256=hash_key("fk-acme"), roles=["employee"])]
)
READ_ROUTES = ["/v1/models", "/v1/agents", f"/v1/agents/{AGENT}", "/v1/docs", "/v1/openapi.json"]


def test_with_keys_every_endpoint_but_health_needs_one(serve_with: Any) -> None:
    async def scenario() -> None:
        fleet = serve_with(FakeAgent(), config=KEYED)
        routes = [*READ_ROUTES, "/v1/requests/req_1/explain"]
        if any(getattr(r, "path", "") == "/v1/models/{model}" for r in app.routes):
            routes.append(f"/v1/models/{AGENT}")  # the route another change adds
        missing = [await fleet.http.get(path) for path in routes]
        wrong = [await fleet.http.get(path, headers={"authorization": "Bearer fk-nope"}) for path in routes]
        keyed = [
            await fleet.http.get(path, headers={"authorization": "Bearer fk-acme"}) for path in READ_ROUTES
        ]
        health = await fleet.http.get("/v1/health")
        await fleet.settle()
        for path, response in zip([*routes, *routes], [*missing, *wrong], strict=True):
            assert response.status_code == 401, path
            assert response.headers["www-authenticate"] == "Bearer", path
            assert response.json()["error"]["type"] == "authentication_error", path
        assert [r.status_code for r in keyed] == [200] * len(READ_ROUTES)
        assert "/v1/chat/completions" in keyed[-1].json()["paths"]
        assert keyed[-2].headers["content-type"].startswith("text/html")
        # Health answers anyone, and says no more than that the ingress lives.
        assert health.status_code == 200 and health.json() == {"status": "ok"}

    run(scenario())


def test_the_approvals_inbox_page_answers_anyone_its_list_needs_a_key(serve_with: Any) -> None:
    async def scenario() -> None:
        fleet = serve_with(FakeAgent(), config=KEYED)
        page = await fleet.http.get("/v1/approvals", params={"format": "html"})
        listed = await fleet.http.get("/v1/approvals", params={"status": "pending"})
        await fleet.settle()
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.text == render_inbox()  # the page holds no data: it asks with the key typed in
        assert page.headers["x-frame-options"] == "DENY"  # never framed: a click on Approve is the approver's
        assert listed.status_code == 401

    run(scenario())


def test_without_keys_the_catalogue_docs_and_health_answer_anyone(serve_with: Any) -> None:
    async def scenario() -> None:
        fleet = serve_with(FakeAgent())
        answers = [await fleet.http.get(path) for path in READ_ROUTES]
        health = await fleet.http.get("/v1/health")
        await fleet.settle()
        assert [r.status_code for r in answers] == [200] * len(READ_ROUTES)
        schema = answers[-1].json()
        assert "/v1/chat/completions" in schema["paths"] and "/v1/docs" not in schema["paths"]
        assert "/v1/openapi.json" in answers[-2].text  # the page loads the schema from there
        assert health.json() == {"status": "ok", "agents": [AGENT]}

    run(scenario())


def test_a_session_belongs_to_the_key_that_wrote_it(serve_with: Any) -> None:
    """Two keys of one tenant naming the same session id reach two different sessions."""
    tenants = [
        TenantKey(tenant="acme", key_sha256=hash_key("fk-acme-1"), roles=["employee"]),
        TenantKey(tenant="acme", key_sha256=hash_key("fk-acme-2"), roles=["employee"]),
    ]
    agent = FakeAgent()

    async def scenario() -> None:
        fleet = serve_with(agent, config=GovernanceConfig(tenants=tenants))
        for key in ("fk-acme-1", "fk-acme-2"):
            response = await fleet.chat({"authorization": f"Bearer {key}", "x-fleet-session-id": "s1"})
            assert response.status_code == 200
        await fleet.settle()
        first, second = (ctx for _, ctx in agent.asked)
        assert first.session == second.session == "s1"
        assert first.principal_id == "acme:" + hash_key("fk-acme-1")[:16]
        assert second.principal_id == "acme:" + hash_key("fk-acme-2")[:16]

    run(scenario())


def test_over_a_tenants_requests_per_minute_is_a_429_that_says_when_to_come_back(
    serve_with: Any, tmp_path: Any
) -> None:
    """A tenant's 2 requests a minute and its key's 100 tokens, in a real ledger."""
    tenants = [
        TenantKey(
            tenant="acme",
            key_sha256=hash_key("fk-acme"),
            roles=["employee"],
            budget=BudgetLimits(tokens_per_minute=100),
        )
    ]
    clock = Clock(1_764_000_000.0)
    ledger = FakeHandle(service(tmp_path, clock))
    budgets = BudgetsConfig(tenants={"acme": BudgetLimits(requests_per_minute=2)})
    key = {"authorization": "Bearer fk-acme"}
    agent = FakeAgent(events=[ContentDelta("You have"), Finished(RESULT)])

    async def scenario() -> None:
        fleet = serve_with(agent, config=GovernanceConfig(tenants=tenants), ledger=ledger, budgets=budgets)
        first = await fleet.chat(key)
        clock.now += 15
        second = await fleet.chat(key, stream=True)
        clock.now += 5
        third = await fleet.chat(key)
        clock.now += 39  # 59 s after the first: still in the window
        fourth = await fleet.chat(key)
        clock.now += 1
        fifth = await fleet.chat(key)
        await fleet.settle()
        assert first.status_code == 200 and second.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert first.headers["x-ratelimit-reset-requests"] == "1m0s"
        assert first.headers["x-ratelimit-limit-tokens"] == "100"
        assert first.headers["x-ratelimit-remaining-tokens"] == "100"
        assert second.headers["x-ratelimit-remaining-requests"] == "0"
        assert second.headers["x-ratelimit-remaining-tokens"] == "87"  # the first used 9 + 4 (sent with it)
        for refused, wait in ((third, "40"), (fourth, "1")):
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert (error["type"], error["code"], error["param"]) == (
                "requests",
                "rate_limit_exceeded",
                "tenant:acme:rpm",
            )
            assert refused.headers["retry-after"] == wait
            assert refused.headers["x-ratelimit-remaining-requests"] == "0"
            assert (
                "x-should-retry" not in refused.headers
            )  # the official client waits Retry-After, then retries
        assert "limit 2" in third.json()["error"]["message"]
        assert fifth.status_code == 200  # the first left the window
        assert len(agent.asked) == 3  # a refused request never reached the agent
        outcomes = [r for r in fleet.audit.stored if r.get("kind") == "outcome"]
        assert sorted(r["status"] for r in outcomes).count(429) == 2

    run(scenario())
