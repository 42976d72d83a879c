"""serve.agent.AgentDeployment outside Ray: a fake model handle, a real audit link server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from serve.agent import AgentDeployment, model_caller
from serve.context import Context
from serve.governance.config import GovernanceConfig
from serve.loop.results import ContentDelta, Finished
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
