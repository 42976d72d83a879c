"""serve.ingress when an agent's replica is lost under a call: a 503 with Retry-After, never a 500.

Ray Serve hands a caller the loss of a replica that had accepted its call as
``ActorDiedError`` (actor calls) or ``ActorUnavailableError`` (gRPC); the fakes raise them
as the handle would. Before a stream's first event the loss is an HTTP status; after it,
an error event.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from ray import serve as rayserve
from ray.exceptions import ActorDiedError, ActorUnavailableError

from serve.governance.config import GovernanceConfig
from serve.ingress import IngressOptions
from serve.loop.results import ContentDelta
from tests.unit.conftest import run
from tests.unit.test_ingress import AGENT, CARD, Events, FakeAgent, Fleet, frames

GONE = f"agent {AGENT!r} is unavailable: a replica is gone or restarting; retry later"


def lost() -> Exception:
    return ActorUnavailableError("Actor is unavailable.", None)


class DiesMidStream(FakeAgent):
    """An agent whose stream yields ``events``, then loses its replica."""

    def _stream(self, request: Any, ctx: Any) -> Events:
        self.asked.append((request, ctx))
        self.streams.append(Partial(self.events, lost()))
        return self.streams[-1]


class Partial(Events):
    def __init__(self, items: list[Any], failure: BaseException) -> None:
        super().__init__(items, None)
        self._then = failure

    async def __anext__(self) -> Any:
        try:
            return await super().__anext__()
        except StopAsyncIteration:
            raise self._then from None


@pytest.fixture
def serve_with(monkeypatch: pytest.MonkeyPatch) -> Callable[..., Fleet]:
    def make(agent: FakeAgent, options: IngressOptions | None = None) -> Fleet:
        fleet = Fleet(agent, options or IngressOptions(), GovernanceConfig(), {AGENT: CARD})
        monkeypatch.setattr(
            rayserve, "get_replica_context", lambda: SimpleNamespace(servable_object=fleet.ingress)
        )
        return fleet

    return make


@pytest.mark.parametrize("failure", [lost, ActorDiedError], ids=["grpc", "actor"])
@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream-before-first-event"])
def test_a_replica_lost_under_the_call_is_a_503_with_retry_after(
    serve_with: Callable[..., Fleet], failure: Callable[[], Exception], stream: bool
) -> None:
    async def scenario() -> None:
        fleet = serve_with(FakeAgent(failure=failure()), IngressOptions(retry_after_s=2))
        response = await fleet.chat(stream=stream)
        await fleet.settle()
        assert response.status_code == 503
        assert response.headers["retry-after"] == "2"
        error = response.json()["error"]
        assert (error["type"], error["code"], error["message"]) == ("server_error", "agent_unavailable", GONE)
        outcomes = [r for r in fleet.audit.stored if r.get("kind") == "outcome"]
        assert [(r["status"], r["code"]) for r in outcomes] == [(503, "agent_unavailable")]

    run(scenario())


def test_a_replica_lost_after_the_first_token_ends_the_stream_with_an_error_event(
    serve_with: Callable[..., Fleet],
) -> None:
    async def scenario() -> None:
        fleet = serve_with(DiesMidStream(events=[ContentDelta("Hel")]))
        response = await fleet.chat(stream=True)
        await fleet.settle()
        assert response.status_code == 200  # it went out with the first token
        *chunks, done = frames(response)
        assert done == "[DONE]"
        parsed = [json.loads(c) for c in chunks]
        assert parsed[1]["choices"][0]["delta"] == {"content": "Hel"}
        assert parsed[-1] == {
            "error": {"message": GONE, "type": "server_error", "param": None, "code": "agent_unavailable"}
        }

    run(scenario())
