"""The loop parks a turn at a gated call (its state a value) and goes on with it once the
call is resolved: an approved call runs once, a rejected one is told to the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from serve.context import Context
from serve.errors import TurnParked
from serve.loop.results import AgentResult, DelegateTarget, Stats
from serve.loop.runner import Resumed
from serve.loop.state import LoopState
from serve.manifest import load_agent
from serve.protocol import ChatRequest, Usage
from serve.testing import GovernedAgent, ScriptedModel
from serve.tools import tool
from tests.unit.conftest import run, write_agent

WIRED: list[int] = []


@tool
def wire(amount: int) -> str:
    """Move money."""
    WIRED.append(amount)
    return f"wired {amount}"


@tool
def lookup(employee_id: str) -> str:
    """Look up an employee."""
    return f"{employee_id} is here"


SCRIPT: list[dict[str, Any]] = [
    {
        "match": "#wire",
        "replies": [
            {"content": "On it.", "tool_calls": [{"name": "wire", "arguments": {"amount": 5}}]},
            {"content": "after: {tool_result}"},
        ],
    },
    {
        "match": "#both",
        "replies": [
            {
                "tool_calls": [
                    {"name": "wire", "arguments": {"amount": 1}},
                    {"name": "lookup", "arguments": {"employee_id": "E1"}},
                    {"name": "wire", "arguments": {"amount": 2}},
                ]
            },
            {"content": "after: {tool_result}"},
        ],
    },
    {
        "match": "#delegate",
        "replies": [
            {"tool_calls": [{"name": "delegate_to_helper", "arguments": {"task": "file it"}}]},
            {"content": "helper said: {tool_result}"},
        ],
    },
]


class Runs:
    """The approvals service's side of a run, in memory: ``start`` answers as told."""

    def __init__(self, answer: tuple[str, str | None] = ("start", None)) -> None:
        self.answer = answer
        self.started: list[str] = []
        self.finished: list[tuple[str, str, str]] = []

    async def start(self, approval_id: str) -> tuple[str, str | None]:
        self.started.append(approval_id)
        return self.answer

    async def ran(self, approval_id: str, outcome: str, status: str) -> None:
        self.finished.append((approval_id, outcome, status))


def agent(tmp_path: Path, delegate: Any = None) -> GovernedAgent:
    folder = write_agent(
        tmp_path,
        "clerk",
        tools=[
            {"name": "lookup", "scope": "hr.read"},
            {"name": "wire", "scope": "bank.write", "approval": True, "approval_ttl_s": 120},
        ],
        delegates=["helper"],
        scopes=["hr.read", "bank.write"],
        max_turns=3,
    )
    targets = {}
    if delegate is not None:
        targets["helper"] = DelegateTarget("Helps.", delegate, scopes=("hr.read",))
    return GovernedAgent(load_agent(folder), ScriptedModel(SCRIPT), [wire, lookup], targets, parking=True)


def park(clerk: GovernedAgent, text: str) -> tuple[TurnParked, LoopState]:
    with pytest.raises(TurnParked) as caught:
        run(clerk.ask(text, Context("req_p", ("clerk",))))
    state: LoopState = caught.value.state  # type: ignore[attr-defined]
    return caught.value, LoopState.from_json(state.to_json())  # stored and read back, as a replica does


def resume(
    clerk: GovernedAgent, text: str, state: LoopState, resolutions: dict[str, Any], runs: Runs
) -> AgentResult:
    request = clerk.request(text)
    return run(clerk.loop.run(request, Context("req_p", ("clerk",)), None, Resumed(state, resolutions, runs)))


def approved(approval_id: str = "apr_1") -> dict[str, Any]:
    return {"kind": "approval", "id": approval_id, "decision": "approved", "by": "ops:9a", "reason": None}


def test_a_gated_call_parks_the_turn_with_its_validated_arguments(tmp_path: Path) -> None:
    WIRED.clear()
    clerk = agent(tmp_path)
    parked, state = park(clerk, "#wire")
    [gate] = parked.gates
    assert (gate.tool, gate.arguments, gate.ttl_s, gate.child) == ("wire", {"amount": 5}, 120, None)
    assert gate.decision_id and gate.decision_id.startswith("dec_")
    assert [c.function.name for c in state.pending] == ["wire"] and state.answered == {}
    assert state.said == ["On it."] and state.turn == 1 and state.stats.escalations == 1
    assert not WIRED
    [record] = [r for r in clerk.audit.records if r["action"] == "tool:wire"]
    assert record["outcome"] == "escalate" and record["decision_id"] == gate.decision_id


def test_an_approved_call_runs_once_and_the_turn_goes_on(tmp_path: Path) -> None:
    WIRED.clear()
    clerk = agent(tmp_path)
    parked, state = park(clerk, "#wire")
    call = parked.gates[0].call_id
    runs = Runs()
    result = resume(clerk, "#wire", state, {call: approved()}, runs)
    assert result.content == "On it.after: wired 5" and result.finish_reason == "stop"
    assert WIRED == [5] and runs.started == ["apr_1"] and runs.finished == [("apr_1", "wired 5", "ok")]
    assert result.stats.turns == 2 and result.stats.tool_calls == 1


def test_a_call_that_ran_already_is_not_run_again(tmp_path: Path) -> None:
    WIRED.clear()
    clerk = agent(tmp_path)
    parked, state = park(clerk, "#wire")
    done = resume(clerk, "#wire", state, {parked.gates[0].call_id: approved()}, Runs(("done", "wired 5")))
    assert done.content == "On it.after: wired 5" and WIRED == []
    _, state = park(clerk, "#wire")
    lost = resume(clerk, "#wire", state, {parked.gates[0].call_id: approved()}, Runs(("unknown", None)))
    assert "outcome is unknown" in (lost.content or "") and WIRED == []
    forged = resume(
        clerk,
        "#wire",
        park(clerk, "#wire")[1],
        {parked.gates[0].call_id: approved()},
        Runs(("refused", None)),
    )
    assert "has no approval to run" in (forged.content or "") and WIRED == []


def test_a_rejected_call_is_told_to_the_model_with_its_reason(tmp_path: Path) -> None:
    WIRED.clear()
    clerk = agent(tmp_path)
    parked, state = park(clerk, "#wire")
    rejected = {
        "kind": "approval",
        "id": "apr_1",
        "decision": "rejected",
        "by": "ops:9a",
        "reason": "too much",
    }
    runs = Runs()
    result = resume(clerk, "#wire", state, {parked.gates[0].call_id: rejected}, runs)
    assert (
        result.content
        == "On it.after: error: the call to 'wire' was rejected by ops:9a: too much; it was not run"
    )
    assert WIRED == [] and runs.started == []


def test_a_turn_with_two_gated_calls_keeps_the_free_calls_result_and_waits_for_both(tmp_path: Path) -> None:
    WIRED.clear()
    clerk = agent(tmp_path)
    parked, state = park(clerk, "#both")
    assert [g.arguments for g in parked.gates] == [{"amount": 1}, {"amount": 2}]
    [(free_id, free)] = state.answered.items()
    assert free == "E1 is here" and free_id not in {g.call_id for g in parked.gates}
    first, second = (g.call_id for g in parked.gates)
    resolutions = {
        first: approved("apr_1"),
        second: {**approved("apr_2"), "decision": "expired", "by": "system"},
    }
    result = resume(clerk, "#both", state, resolutions, Runs())
    assert WIRED == [1]
    results = [m for m in clerk.model.requests[-1].messages if m["role"] == "tool"]
    assert [m["content"] for m in results] == [
        "wired 1",
        "E1 is here",
        "error: the call to 'wire' was expired; it was not run",
    ]  # in the order the model asked for them
    assert result.content == "after: error: the call to 'wire' was expired; it was not run"


def test_a_delegate_that_parks_parks_its_caller_and_its_answer_comes_back_on_resume(tmp_path: Path) -> None:
    async def helper(request: ChatRequest, ctx: Context) -> AgentResult:
        shown = {
            "id": "apr_h",
            "status": "pending",
            "agent": "helper",
            "tool": "file_ticket",
            "expires_at": 1.0,
        }
        return AgentResult("waits", [], "stop", Usage(), Stats(), parked="turn_h", approvals=[shown])

    clerk = agent(tmp_path, helper)
    parked, state = park(clerk, "#delegate")
    [gate] = parked.gates
    assert (gate.child, gate.tool, gate.arguments) == ("turn_h", "delegate_to_helper", {"task": "file it"})
    assert [a["id"] for a in gate.approvals] == ["apr_h"]
    child = {
        "kind": "child",
        "result": {
            "content": "ticket filed",
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        },
    }
    result = resume(clerk, "#delegate", state, {gate.call_id: child}, Runs())
    assert result.content == "helper said: ticket filed"
    assert result.usage.prompt_tokens >= 3  # the delegate's tokens count with the caller's
