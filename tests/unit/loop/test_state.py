"""The loop's state is a value: taken mid-turn, it survives JSON unchanged (what parking a turn needs)."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from serve.budget import Price, Purse
from serve.context import Context
from serve.errors import BudgetExceeded
from serve.governance.decisions import Refusal
from serve.loop.results import Stats
from serve.loop.runner import AgentLoop
from serve.loop.state import LoopState
from serve.manifest import load_agent
from serve.models.base import ModelChunk, ModelRequest
from serve.models.scripted import ScriptedBackend, ScriptedConfig
from serve.protocol import ChatRequest, Usage
from serve.steps import Step
from serve.tools import tool
from tests.unit.conftest import run, write_agent


class OpenGuard:
    """Every decision allows; steps are kept (the loop's Guard protocol, no policy engine)."""

    holds_output = False
    halts_on_pii = False

    def __init__(self) -> None:
        self.steps: list[Step] = []

    async def model_input(self, ctx: Context, messages: list[dict[str, Any]], turn: int) -> None:
        return None

    async def budget(self, ctx: Context, short: BudgetExceeded) -> bool:
        return False

    async def model_output(self, ctx: Context, text: str, turn: int) -> str:
        return text

    async def tool(self, ctx: Context, name: str, arguments: str) -> Refusal | None:
        return None

    async def delegation(self, ctx: Context, target: str, target_scopes: list[str]) -> Refusal | None:
        return None

    async def result(self, ctx: Context, name: str, text: str, classes: list[str]) -> str:
        return text

    def step(self, ctx: Context, step: Step) -> None:
        self.steps.append(step)


SCRIPT: dict[str, Any] = {
    "kind": "scripted",
    "script": [
        {
            "match": "#note",
            "replies": [
                {"content": "Noting.", "tool_calls": [{"name": "note", "arguments": {"text": "Zoë ✓"}}]},
                {"content": "noted: {tool_result}"},
            ],
        }
    ],
}


def test_a_state_taken_mid_loop_round_trips_through_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states: list[LoopState] = []
    taken: list[tuple[bytes, LoopState]] = []  # (its JSON, a copy of the state then)
    start = AgentLoop._start

    def starting(self: AgentLoop, *args: Any) -> LoopState:  # the driver's one state, watched
        states.append(start(self, *args))
        return states[-1]

    monkeypatch.setattr(AgentLoop, "_start", starting)

    def take() -> None:
        (state,) = states
        taken.append((state.to_json(), copy.deepcopy(state)))

    @tool
    def note(text: str) -> str:
        """Keep a note."""
        take()  # inside the turn: its calls are pending
        return f"kept {text}"

    backend = ScriptedBackend(ScriptedConfig.model_validate(SCRIPT))

    async def model(request: ModelRequest) -> AsyncIterator[ModelChunk]:
        if states:
            take()  # before each model call
        async for piece in backend.stream(request):
            yield piece

    folder = write_agent(
        tmp_path,
        "clerk",
        tools=[{"name": "note", "scope": "notes.write"}],
        scopes=["notes.write"],
        policies={"cost": {"per_request_usd": "0.001"}},
    )
    price = Price(prompt_usd_per_million=Decimal("0.15"), completion_usd_per_million=Decimal("0.60"))
    loop = AgentLoop(load_agent(folder), {"note": note}, model, {}, OpenGuard(), price=price)
    request = ChatRequest.model_validate(
        {"model": "clerk", "messages": [{"role": "user", "content": "#note"}], "tool_choice": "required"}
    )
    result = run(loop.run(request, Context("req_state", ("clerk",))))
    assert result.content == "Noting.noted: kept Zoë ✓"

    assert len(taken) == 3  # first model call, the tool call, second model call
    for dumped, then in taken:
        assert LoopState.from_json(dumped) == then
    (_, first), (_, in_call), (_, second) = taken
    assert (first.turn, first.tool_choice, first.seen) == (1, "required", 2)  # system, user: decided on
    assert in_call.turn == 1 and in_call.said == ["Noting."]
    assert in_call.stats == Stats(turns=1, tool_calls=1)
    (call,) = in_call.pending
    assert (call.function.name, json.loads(call.function.arguments)) == ("note", {"text": "Zoë ✓"})
    assert (second.turn, second.tool_choice, second.pending) == (2, "auto", [])
    assert second.seen == len(second.messages) == 4  # system, user, assistant's call, its result
    assert second.messages[-1]["content"] == "kept Zoë ✓" and second.asked == [
        {"role": "user", "content": "#note"}
    ]
    assert second.usage == in_call.usage != Usage()
    # the purse, mid-call: the call's worst case held; then what it cost spent
    assert (first.purse.spent, first.purse.limit) == (Decimal(0), Decimal("0.001")) and first.purse.held > 0
    assert in_call.purse.held == 0 and in_call.purse.spent == in_call.usage.cost_usd > 0
    assert second.purse.spent == in_call.purse.spent and second.purse.held > 0


def test_a_state_is_strict_about_what_it_reads() -> None:
    state = LoopState(messages=[{"role": "user", "content": "hi"}], asked=[{"role": "user", "content": "hi"}])
    state.stats.turns, state.usage.prompt_tokens = 1, 3
    data = json.loads(state.to_json())
    assert LoopState.from_json(json.dumps(data)) == state
    with pytest.raises(ValueError, match="unknown"):
        LoopState.from_json(json.dumps({**data, "unknown": 1}))
    with pytest.raises(ValueError, match="seen"):
        LoopState.from_json(json.dumps({**data, "seen": -1}))
    with pytest.raises(ValueError, match="turns"):
        LoopState.from_json(json.dumps({**data, "stats": {**data["stats"], "turns": "many"}}))


def test_a_states_purse_round_trips_with_its_money_exact() -> None:
    state = LoopState(
        messages=[{"role": "user", "content": "hi"}],
        asked=[{"role": "user", "content": "hi"}],
        usage=Usage(prompt_tokens=1234, completion_tokens=56, cost_usd=Decimal("0.0002187")),
        purse=Purse(Decimal("0.001"), "request:boss", spent=Decimal("0.0002187"), held=Decimal("1.5E-7")),
    )
    dumped = state.to_json()
    data = json.loads(dumped)
    assert data["purse"] == {"limit": "0.001", "name": "request:boss", "spent": "0.0002187", "held": "1.5E-7"}
    assert data["usage"]["cost_usd"] == "0.0002187"  # strings: a JSON number would be a float
    back = LoopState.from_json(dumped)
    assert back == state
    assert back.purse.available == Decimal("0.00078115")  # exactly what it was, not a float's
    assert LoopState.from_json(LoopState(messages=[], asked=[]).to_json()).purse == Purse()  # no limit
    with pytest.raises(ValueError, match="spent"):
        LoopState.from_json(json.dumps({**data, "purse": {**data["purse"], "spent": "lots"}}))
