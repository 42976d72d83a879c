"""The agent loop under real policies (configs/policies, regopy): what the model cannot do."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from serve.context import Context
from serve.errors import ApprovalRequired, PolicyDenied, RequestError, Signal
from serve.loop.results import AgentResult, ContentDelta, DelegateTarget, Stats
from serve.loop.runner import AgentLoop
from serve.manifest import load_agent
from serve.models.base import ModelRequest
from serve.policy.schema import Principal
from serve.protocol import ChatRequest, Usage
from serve.testing import (
    CANARY_CARD,
    CANARY_EMAIL,
    CANARY_PHONE,
    CANARY_SSN,
    GovernedAgent,
    MemorySink,
    ScriptedModel,
    governed,
)
from serve.tools import Tool, tool
from tests.unit.conftest import run, write_agent


@tool
def lookup(employee_id: str) -> str:
    """Look up an employee record."""
    return f"{employee_id}: contact {CANARY_EMAIL}, SSN {CANARY_SSN}"


@tool
def wire(amount: int) -> str:
    """Move money."""
    return f"wired {amount}"


TOOLS: dict[str, Tool] = {"lookup": lookup, "wire": wire}

SCRIPT: dict[str, Any] = {
    "kind": "scripted",
    "script": [
        {
            "match": "#lookup",
            "replies": [
                {"tool_calls": [{"name": "lookup", "arguments": {"employee_id": "E1001"}}]},
                {"content": "found: {tool_result}"},
            ],
        },
        {
            "match": "#wire",
            "replies": [
                {"tool_calls": [{"name": "wire", "arguments": {"amount": 5}}]},
                {"content": "after: {tool_result}"},
            ],
        },
        {
            "match": "#stranger",
            "replies": [
                {"tool_calls": [{"name": "delegate_to_treasury", "arguments": {"task": "pay"}}]},
                {"content": "after: {tool_result}"},
            ],
        },
        {
            "match": "#delegate",
            "replies": [
                {"tool_calls": [{"name": "delegate_to_helper", "arguments": {"task": "go"}}]},
                {"content": "after: {tool_result}"},
            ],
        },
        {"match": "#say", "replies": [{"content": f"Write to {CANARY_EMAIL} or pay with {CANARY_CARD}."}]},
        {"match": "#repeat", "replies": [{"content": "you said: {input}"}]},
        {
            "match": "#mail",
            "replies": [
                {"tool_calls": [{"name": "lookup", "arguments": {"employee_id": CANARY_EMAIL}}]},
                {"content": "done"},
            ],
        },
        {"match": "#ramble", "replies": [{"content": f"Call {CANARY_PHONE} now. " + "and so on " * 100}]},
    ],
}


def make_loop(
    tmp_path: Path, pii: str = "redact", compliance: list[str] | None = None, **kwargs: Any
) -> tuple[AgentLoop, MemorySink, list[ModelRequest], list[tuple[ChatRequest, Context]]]:
    folder = write_agent(
        tmp_path,
        "clerk",
        tools=[
            {"name": "lookup", "scope": "hr.read"},
            {"name": "wire", "scope": "bank.write", "approval": True},
        ],
        delegates=["helper"],
        scopes=["hr.read", "bank.write"],
        data=["internal", "pii"],
        policies={"pii": pii, "compliance": compliance or []},
        max_turns=3,
    )
    spec = load_agent(folder)
    model = ScriptedModel(SCRIPT["script"])
    delegated: list[tuple[ChatRequest, Context]] = []

    async def helper(request: ChatRequest, ctx: Context) -> AgentResult:
        delegated.append((request, ctx))
        return AgentResult("done", [], "stop", Usage(), Stats())

    targets = {"helper": DelegateTarget("Helps.", helper, scopes=("hr.read", "bank.write"))}
    agent = GovernedAgent(spec, model, TOOLS, targets, **kwargs)
    return agent.loop, agent.audit, model.requests, delegated


def ask(loop: AgentLoop, text: str, ctx: Context | None = None) -> AgentResult:
    request = ChatRequest.model_validate({"model": "clerk", "messages": [{"role": "user", "content": text}]})
    return run(loop.run(request, ctx or Context("req_g", ("clerk",))))


def test_tool_beyond_the_callers_scopes_is_denied_and_audited(tmp_path: Path) -> None:
    loop, sink, _, _ = make_loop(tmp_path)
    ctx = Context("req_g", ("boss", "clerk"), scopes=("bank.write",))  # the caller holds no hr.read
    result = ask(loop, "#lookup", ctx)
    assert "the call to 'lookup' was denied by policy" in (result.content or "")
    assert "scope hr.read is not granted to clerk" in (result.content or "")
    assert result.stats.denials == 1 and result.stats.tool_failures == 0
    [record] = [r for r in sink.records if r["action"] == "tool:lookup"]
    assert record["outcome"] == "deny" and record["enforced"] is True
    assert record["decision_id"] in (result.content or "")


def test_tool_that_needs_approval_is_escalated_not_run(tmp_path: Path) -> None:
    loop, sink, _, _ = make_loop(tmp_path)
    result = ask(loop, "#wire")
    assert "needs human approval" in (result.content or "") and "wired" not in (result.content or "")
    assert result.stats.escalations == 1
    assert [r["outcome"] for r in sink.records if r["action"] == "tool:wire"] == ["escalate"]


def test_the_guard_signals_an_escalated_call_instead_of_refusing_it(tmp_path: Path) -> None:
    folder = write_agent(
        tmp_path,
        "clerk",
        tools=[{"name": "wire", "scope": "bank.write", "approval": True}],
        scopes=["bank.write"],
    )
    guard, sink = governed(load_agent(folder))
    ctx = guard.enter(Context.new("req_signal"))
    with pytest.raises(ApprovalRequired) as signal:
        run(guard.tool(ctx, "wire", '{"amount": 5}'))
    [record] = sink.records
    assert record["outcome"] == "escalate"
    assert (signal.value.decision_id, signal.value.tool) == (record["decision_id"], "wire")
    assert isinstance(signal.value, Signal) and not isinstance(signal.value, RequestError)
    assert pickle.loads(pickle.dumps(signal.value)).decision_id == record["decision_id"]  # crosses handles


def test_forbidden_delegation_is_denied_by_the_delegation_policy(tmp_path: Path) -> None:
    loop, sink, _, delegated = make_loop(tmp_path)
    result = ask(loop, "#stranger")
    assert "the delegation to 'treasury' was denied by policy" in (result.content or "")
    assert delegated == []
    [record] = [r for r in sink.records if r["action"] == "delegate:treasury"]
    assert record["outcome"] == "deny" and record["policy"] == "delegation.rego"


def test_delegate_acts_with_at_most_the_callers_scopes(tmp_path: Path) -> None:
    loop, _, _, delegated = make_loop(tmp_path)
    ask(loop, "#delegate", Context("req_g", ("clerk",), scopes=("hr.read",)))
    [(_, ctx)] = delegated
    assert ctx.scopes == ("hr.read",)  # bank.write was not the caller's to grant


def test_principal_key_scopes_narrow_the_agent(tmp_path: Path) -> None:
    loop, _, _, _ = make_loop(tmp_path)
    principal = Principal(tenant="acme", roles=["hr"], authenticated=True, scopes=["bank.write"])
    result = ask(loop, "#lookup", Context.new("req_p", principal).enter("clerk"))
    assert "scope hr.read is not granted" in (result.content or "")


def test_pii_in_the_prompt_and_a_tool_result_is_redacted(tmp_path: Path) -> None:
    loop, sink, seen, _ = make_loop(tmp_path)
    result = ask(loop, f"#lookup for {CANARY_EMAIL}")
    assert CANARY_EMAIL not in str([r.messages for r in seen])
    assert CANARY_SSN not in str([r.messages for r in seen])
    assert "[REDACTED:email]" in (result.content or "") and "[REDACTED:ssn]" in (result.content or "")
    assert CANARY_EMAIL not in str(sink.records) and CANARY_SSN not in str(sink.records)
    outcomes = [(r["action"], r["outcome"]) for r in sink.records]
    assert outcomes[:3] == [("model_input", "redact"), ("tool:lookup", "allow"), ("data:lookup", "redact")]


def test_pii_in_the_answer_is_redacted_while_streaming(tmp_path: Path) -> None:
    loop, _, _, _ = make_loop(tmp_path)
    request = ChatRequest.model_validate(
        {"model": "clerk", "messages": [{"role": "user", "content": "#say"}], "stream": True}
    )

    async def collect() -> str:
        return "".join(
            [e.text async for e in loop.events(request, Context("req_s")) if isinstance(e, ContentDelta)]
        )

    streamed = run(collect())
    assert streamed == "Write to [REDACTED:email] or pay with [REDACTED:card]."


def test_pii_allowed_by_the_manifest_passes_but_pci_still_hides_cards(tmp_path: Path) -> None:
    loop, _, _, _ = make_loop(tmp_path, pii="allow")
    assert ask(loop, "#say").content == f"Write to {CANARY_EMAIL} or pay with {CANARY_CARD}."
    loop, _, _, _ = make_loop(tmp_path / "pci", pii="allow", compliance=["pci"])
    assert ask(loop, "#say").content == "Write to [REDACTED:email] or pay with [REDACTED:card]."


def test_pii_block_refuses_the_request_with_a_decision_id(tmp_path: Path) -> None:
    loop, sink, seen, _ = make_loop(tmp_path, pii="block")
    with pytest.raises(PolicyDenied) as err:
        ask(loop, f"#repeat my SSN is {CANARY_SSN}")
    assert seen == []  # the model never saw it
    assert err.value.status == 403 and err.value.decision_id.startswith("dec_")
    assert CANARY_SSN not in err.value.message
    assert [r["decision_id"] for r in sink.records if r["outcome"] == "deny"] == [err.value.decision_id]


def test_pii_block_stops_the_model_at_the_answers_first_pii(tmp_path: Path) -> None:
    """An answer its policy would withhold whole is not generated to its end: the model
    stops at the first PII (the overload test's 403s were 384-token rambles)."""
    loop, sink, seen, _ = make_loop(tmp_path, pii="block")
    with pytest.raises(PolicyDenied) as err:
        ask(loop, "#ramble")
    assert seen[0].halt_on_pii and CANARY_PHONE not in err.value.message
    (call,) = [e for e in sink.events if e["kind"] == "model_call"]
    assert call["finish_reason"] == "content_filter" and call["completion_tokens"] <= 4
    # An agent that redacts gets the whole answer, redacted: nothing stops its model.
    loop, sink, seen, _ = make_loop(tmp_path / "redacts", pii="redact")
    answer = ask(loop, "#ramble")
    assert not seen[0].halt_on_pii and answer.finish_reason == "stop"
    assert answer.content is not None and answer.content.startswith("Call [REDACTED:phone] now. and so on")
    assert answer.content.count("and so on") == 100


def test_a_tool_calls_step_keeps_its_arguments_with_pii_redacted(tmp_path: Path) -> None:
    loop, sink, _, _ = make_loop(tmp_path)
    ask(loop, "#mail")
    (step,) = [e for e in sink.events if e["kind"] == "tool_call"]
    assert step["tool"] == "lookup" and step["arguments"] == '{"employee_id": "[REDACTED:email]"}'
    assert CANARY_EMAIL not in str(sink.events)


def test_every_decision_writes_exactly_one_record(tmp_path: Path) -> None:
    loop, sink, _, _ = make_loop(tmp_path)
    ask(loop, "#lookup")
    assert [r["action"] for r in sink.records] == [
        "model_input",  # the first reply is a tool call only: no output to decide on
        "tool:lookup",
        "data:lookup",
        "model_input",
        "model_output",
    ]
    assert len({r["decision_id"] for r in sink.records}) == len(sink.records)
    kinds = [e["kind"] for e in sink.events]
    assert kinds == ["model_call", "tool_call", "model_call"]


def test_shadow_policy_is_audited_but_not_enforced(tmp_path: Path) -> None:
    strict = tmp_path / "tool_v2.rego"
    strict.write_text(
        'package fleet.tool\nimport rego.v1\ndecision := {"outcome": "deny", "reasons": ["v2 denies all tools"]}\n'
    )
    loop, sink, _, _ = make_loop(tmp_path / "a", shadow=[str(strict)])
    result = ask(loop, "#lookup")
    assert "found: E1001" in (result.content or "")  # enforced policy allowed it
    tool_records = [r for r in sink.records if r["action"] == "tool:lookup"]
    assert [(r["outcome"], r["enforced"]) for r in tool_records] == [("allow", True), ("deny", False)]
    assert tool_records[1]["policy"] == "tool_v2.rego"


def test_a_policy_that_fails_denies(tmp_path: Path) -> None:
    broken = tmp_path / "tool.rego"  # undefined for every input: no default, no rule that holds
    broken.write_text(
        'package fleet.tool\nimport rego.v1\ndecision := {"outcome": "allow", "reasons": []} if input.nothing\n'
    )
    policies = tmp_path / "policies"
    policies.mkdir()
    for f in (Path(__file__).resolve().parents[3] / "configs" / "policies").iterdir():
        if f.name != "tool.rego":
            (policies / f.name).write_text(f.read_text())
    loop, sink, _, _ = make_loop(tmp_path / "a", policies=[str(policies), str(broken)])
    result = ask(loop, "#lookup")
    assert "denied by policy" in (result.content or "") and "undefined" in (result.content or "")
    assert [r["outcome"] for r in sink.records if r["action"] == "tool:lookup"] == ["deny"]
