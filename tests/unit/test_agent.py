"""serve.agent.AgentDeployment outside Ray: a fake model handle, a real audit link server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import ActorUnavailableError
from ray.serve.exceptions import BackPressureError

from serve.agent import AgentDeployment, delegate_target, model_caller
from serve.context import Context
from serve.errors import Overloaded
from serve.governance.config import GovernanceConfig
from serve.loop.results import AgentResult, ContentDelta, Finished
from serve.models.base import ModelChunk, ModelRequest
from serve.models.scripted import ScriptedConfig
from serve.protocol import ChatRequest
from tests.unit.audit.test_client import FlakyService
from tests.unit.conftest import ROOT, run, write_agent


class WaitingModel:
    """A model deployment's handle whose prefill lasts until the audit service has stored
    something (or 5 s): its reply says which."""

    def __init__(self, service: FlakyService) -> None:
        self.service = service
        self.stream = self  # handle.options(stream=True).stream.remote(request)

    def options(self, **_: Any) -> WaitingModel:
        return self

    async def remote(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        try:
            await asyncio.wait_for(self.service.entered.wait(), 5)  # a batch reached the service
            reply = "stored"
        except TimeoutError:
            reply = "not shipped"
        yield ModelChunk(content=reply)
        yield ModelChunk(finish_reason="stop")


def test_a_streamed_answer_ships_its_decisions_while_the_model_works(tmp_path: Path) -> None:
    """The first token waits for them: their round trip overlaps the prefill, not after it."""
    write_agent(tmp_path, "streamer", policies={"pii": "allow"})
    service = FlakyService()

    async def scenario() -> list[Any]:
        agent = AgentDeployment(
            str(tmp_path), "streamer", WaitingModel(service), {},  # type: ignore[arg-type]
            GovernanceConfig(), str(ROOT), service, None,  # type: ignore[arg-type]
        )  # fmt: skip
        agent._audit._linger = 3600  # only the model call may ship them, not the straggler timer
        request = ChatRequest.model_validate(
            {"model": "streamer", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        )
        return [event async for event in agent.stream(request, Context.new())]

    events = run(scenario())
    assert [e.text for e in events if isinstance(e, ContentDelta)] == ["stored"]
    assert isinstance(events[-1], Finished)
    assert [r["point"] for r in service.stored if "point" in r][:1] == ["model_input"]


class OptionsHandle:
    """A deployment handle that records the options it was given."""

    def __init__(self) -> None:
        self.options_seen: list[dict[str, Any]] = []

    def options(self, **kwargs: Any) -> OptionsHandle:
        self.options_seen.append(kwargs)
        return self


def test_the_agent_calls_its_model_and_delegates_over_the_configured_transport(tmp_path: Path) -> None:
    write_agent(tmp_path, "caller")
    for transport, by_reference in (("grpc", False), ("actor", True)):
        model, delegate = OptionsHandle(), OptionsHandle()
        AgentDeployment(
            str(tmp_path), "caller", model, {"helper": (delegate, "helps", [], [])},  # type: ignore[arg-type, dict-item]
            GovernanceConfig(), str(ROOT), FlakyService(), None,  # type: ignore[arg-type]
            transport=transport,  # type: ignore[arg-type]
        )  # fmt: skip
        assert model.options_seen[0] == {"_by_reference": by_reference}, transport
        assert delegate.options_seen == [{"_by_reference": by_reference}], transport


def test_an_inline_backend_is_handed_its_config_typed_and_runs_in_the_agent() -> None:
    config = ScriptedConfig.model_validate({"kind": "scripted", "script": [{"replies": [{"content": "hi"}]}]})
    call = model_caller(config)

    async def scenario() -> list[ModelChunk]:
        request = ModelRequest(agent="caller", messages=[{"role": "user", "content": "hello"}])
        return [chunk async for chunk in call(request)]

    chunks = run(scenario())
    assert "".join(c.content or "" for c in chunks) == "hi"
    assert chunks[-1].finish_reason == "stop"


class Counted:
    """Stands in for an agent's request counter and latency histogram: the tags each got."""

    def __init__(self) -> None:
        self.counts: list[dict[str, str]] = []
        self.latencies: list[dict[str, str]] = []

    def inc(self, counter: Any, value: float, tags: dict[str, str]) -> None:
        self.counts.append(tags)

    def observe(self, seconds: float, tags: dict[str, str]) -> None:
        assert seconds >= 0
        self.latencies.append(tags)


def counting(agent: AgentDeployment) -> Counted:
    seen = Counted()
    agent._metrics._tally = seen  # type: ignore[assignment]
    agent._metrics._m = SimpleNamespace(requests="requests", latency=seen)  # type: ignore[assignment]
    return seen


def ask(stream: bool = False) -> ChatRequest:
    return ChatRequest.model_validate(
        {"model": "worker", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    )


def worker(tmp_path: Path, model: Any) -> AgentDeployment:
    write_agent(tmp_path, "worker", policies={"pii": "allow"})
    return AgentDeployment(
        str(tmp_path), "worker", model, {}, GovernanceConfig(), str(ROOT), FlakyService(), None,  # type: ignore[arg-type]
    )  # fmt: skip


def test_each_agent_counts_its_own_requests_and_latency_delegated_ones_too(tmp_path: Path) -> None:
    """A domain agent reached only through another agent still has its own SLA's numbers."""
    config = ScriptedConfig.model_validate(
        {"kind": "scripted", "script": [{"replies": [{"content": "done"}]}]}
    )

    async def scenario() -> Counted:
        agent = worker(tmp_path, config)
        seen = counting(agent)
        assert isinstance(await agent.chat(ask(), Context.new()), AgentResult)
        delegated = replace(Context.new(), chain=("orchestrator",))  # as a caller's handle sends it
        assert isinstance(await agent.chat(ask(), delegated), AgentResult)
        events = [e async for e in agent.stream(ask(stream=True), Context.new())]
        assert isinstance(events[-1], Finished)
        return seen

    seen = run(scenario())
    own = {"agent": "worker", "version": "1.0.0", "hop": "agent"}
    assert seen.counts == [{**own, "outcome": "success", "status": "200"}] * 3
    assert seen.latencies == [own] * 3


class FailingModel:
    """A model deployment's handle whose every call fails as Serve fails it: its replica gone
    (``ActorUnavailableError``), or its queue at this caller full (``BackPressureError``)."""

    deployment_name = "model-default"

    def __init__(self, failure: Callable[[], Exception]) -> None:
        self.failure = failure
        self.complete = SimpleNamespace(remote=self._fail)
        self.stream = SimpleNamespace(remote=self._fail_stream)

    def options(self, **_: Any) -> FailingModel:
        return self

    async def _fail(self, request: ModelRequest) -> Any:
        raise self.failure()

    async def _fail_stream(self, request: ModelRequest) -> AsyncIterator[Any]:
        raise self.failure()
        yield  # pragma: no cover


@pytest.mark.parametrize(
    ("failure", "code", "message"),
    [
        (
            lambda: ActorUnavailableError("Actor is unavailable.", None),
            "model_unavailable",
            "model deployment 'model-default' is unavailable: a replica is gone or restarting; retry later",
        ),
        (
            lambda: BackPressureError(num_queued_requests=16, max_queued_requests=16),
            "overloaded",
            "model deployment 'model-default' is at capacity; retry later",
        ),
    ],
    ids=["lost", "full"],
)
def test_a_model_deployment_that_cannot_take_the_call_is_a_503_naming_it_and_is_counted(
    tmp_path: Path, failure: Callable[[], Exception], code: str, message: str
) -> None:
    async def scenario() -> tuple[Any, list[Any], Counted]:
        agent = worker(tmp_path, FailingModel(failure))
        seen = counting(agent)
        outcome = await agent.chat(ask(), Context.new())
        events = [e async for e in agent.stream(ask(stream=True), Context.new())]
        return outcome, events, seen

    outcome, events, seen = run(scenario())
    (first,) = events  # before any token: the ingress answers it as a status
    for error in (outcome, first):
        assert isinstance(error, Overloaded)
        assert (error.status, error.code, error.message) == (503, code, message)
    assert [(c["status"], c["outcome"]) for c in seen.counts] == [("503", "error")] * 2


class FullDelegate:
    """A delegate's handle whose queue at this caller is full."""

    def __init__(self) -> None:
        self.chat = SimpleNamespace(remote=self._full)

    async def _full(self, request: ChatRequest, ctx: Context) -> Any:
        raise BackPressureError(num_queued_requests=8, max_queued_requests=8)


def test_a_delegate_at_capacity_is_an_overloaded_503_for_the_loop() -> None:
    """What the loop gets from the call (it tells the calling model, as of any failing delegate)."""
    target = delegate_target(FullDelegate(), "helps", [], [], None)  # type: ignore[arg-type]
    request = ChatRequest.model_validate({"model": "helper", "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(Overloaded) as info:
        run(target.call(request, Context.new()))
    assert (info.value.status, info.value.code) == (503, "overloaded")
    assert info.value.message == "agent 'helper' is at capacity; retry later"
