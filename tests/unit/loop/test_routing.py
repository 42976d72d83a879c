"""serve.loop.routing and the loop's routing: a delegate picked by words (``match``) or by
the model (``choose``), then the delegation as any call the model made (policy, audit,
steps, stats), and the delegate's reply as the answer (``answer: delegate``) or the
model's answer from it (``answer: model``)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve.context import Context
from serve.loop.results import AgentResult, ContentDelta, DelegateTarget, Finished, Stats
from serve.loop.routing import Matcher, chosen, delegation_call, last_question, routing_messages, words
from serve.manifest import Routing, load_agent
from serve.models.base import ModelChunk, ModelRequest
from serve.protocol import ChatRequest, FunctionCall, ToolCall, Usage
from serve.testing import GovernedAgent, ScriptedModel, scripted_backend
from tests.unit.conftest import AGENTS, LOCAL_CONFIG, write_agent

ROUTING: dict[str, Any] = {
    "mode": "choose",
    "answer": "model",
    "descriptions": {"hr": "Leave and HR policy (ids like E1001)."},
    "examples": [
        {"question": "Can I carry over leave?", "route": "hr"},
        {"question": "How many days of sick leave?", "route": "hr"},
        {"question": "Stock of SKU-1001?", "route": "stock"},
        {"question": "Hello!", "route": "none"},
    ],
}
# The script answers the calls that are no routing call; a choice comes from LABELS.
SCRIPT: list[dict[str, Any]] = [
    {
        "match": "",
        "replies": [{"content": "plain answer"}, {"content": "from the specialist: {tool_result}"}],
    },
]
LABELS = [(r"(?i)leave", "hr"), (r"(?i)sku", "stock"), (r"", "none")]


class RoutingModel:
    """A model that picks a label for a routing call (by regex) and plays SCRIPT otherwise."""

    def __init__(self, labels: list[tuple[str, str]] = LABELS) -> None:
        self.labels = labels
        self.backend = scripted_backend(SCRIPT)
        self.requests: list[ModelRequest] = []

    async def __call__(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        self.requests.append(request)
        if request.choice is None:
            async for chunk in self.backend.stream(request):
                yield chunk
            return
        question = request.messages[-1]["content"]
        label = next(label for pattern, label in self.labels if re.search(pattern, question))
        assert label in request.choice
        yield ModelChunk(content=label)
        yield ModelChunk(finish_reason="stop", usage=Usage(prompt_tokens=50, completion_tokens=2))


class Delegate:
    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.asked: list[ChatRequest] = []

    async def __call__(self, request: ChatRequest, ctx: Context) -> AgentResult:
        self.asked.append(request)
        return AgentResult(self.answer, [], "stop", Usage(prompt_tokens=7, completion_tokens=3), Stats())


def router(tmp_path: Path, model: Any = None, **changes: Any) -> tuple[GovernedAgent, dict[str, Delegate]]:
    folder = write_agent(
        tmp_path,
        "router",
        role="orchestration",
        delegates=["hr", "stock"],
        routing=changes.pop("routing", ROUTING),
        max_turns=3,
        **changes,
    )
    delegates = {"hr": Delegate("5 days"), "stock": Delegate("420 on hand")}
    targets = {
        "hr": DelegateTarget("Answers employee questions.", delegates["hr"]),
        "stock": DelegateTarget("Looks up inventory.", delegates["stock"]),
    }
    return GovernedAgent(load_agent(folder), model or RoutingModel(), delegates=targets), delegates


# --- the routing call's prompt and reply, as pure functions ----------------------------


def test_the_prompt_lists_each_delegate_then_the_examples_in_turn_then_the_question() -> None:
    routing = Routing.model_validate(ROUTING)
    delegates = {"hr": "Answers employee questions.", "stock": "Looks up inventory."}
    messages = routing_messages(routing, delegates, "How much leave do I have?")
    system = messages[0]["content"]
    assert "hr: Leave and HR policy (ids like E1001)." in system  # the manifest's words win
    assert "stock: Looks up inventory." in system  # else the delegate's own description
    assert "none: none of them" in system and "Reply with one name only: hr, stock or none." in system
    turns = [(m["role"], m["content"]) for m in messages[1:]]
    assert turns == [
        ("user", "Can I carry over leave?"),
        ("assistant", "hr"),
        ("user", "Stock of SKU-1001?"),
        ("assistant", "stock"),
        ("user", "Hello!"),
        ("assistant", "none"),
        ("user", "How many days of sick leave?"),
        ("assistant", "hr"),
        ("user", "How much leave do I have?"),
    ]
    without = routing_messages(Routing(direct=False), delegates, "q")[0]["content"]
    assert "none" not in without and "Reply with one name only: hr or stock." in without


def test_a_reply_names_a_delegate_or_calls_its_tool_else_it_chose_no_one() -> None:
    names = ["hr-policy-advisor", "fleet-monitor"]
    assert chosen("fleet-monitor", [], names) == "fleet-monitor"
    assert chosen(' "Fleet-Monitor".\n', [], names) == "fleet-monitor"  # an upstream's looser reply
    assert chosen("none", [], names) is None
    assert chosen("I can help with that!", [], names) is None
    call = ToolCall(id="c", function=FunctionCall(name="delegate_to_hr_policy_advisor", arguments="{}"))
    assert chosen("", [call], names) == "hr-policy-advisor"  # a script written without routing
    other = ToolCall(id="c", function=FunctionCall(name="search_handbook", arguments="{}"))
    assert chosen("", [other], names) is None


def test_the_delegation_call_carries_the_users_message_and_a_fresh_id() -> None:
    call = delegation_call("hr-policy-advisor", 'Leave for "E1001"?')
    assert call.function.name == "delegate_to_hr_policy_advisor"
    assert json.loads(call.function.arguments) == {"task": 'Leave for "E1001"?'}
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id) and delegation_call("x", "q").id != call.id


def test_the_question_is_the_last_user_messages_text() -> None:
    parts = [{"type": "text", "text": "Leave "}, {"type": "text", "text": "left?"}]
    history = [{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "ok"}]
    assert last_question([*history, {"role": "user", "content": parts}]) == "Leave left?"
    assert last_question([{"role": "system", "content": "s"}]) == ""


# --- the loop ------------------------------------------------------------------------


def test_the_first_call_is_a_greedy_choice_and_the_chosen_delegate_gets_the_question(tmp_path: Path) -> None:
    agent, delegates = router(tmp_path)
    result = agent.ask_sync("How much leave does E1001 have left?", temperature=0.9)
    assert result.content == "from the specialist: 5 days"
    assert result.stats.delegations == ["hr"] and result.stats.turns == 2 and result.stats.tool_calls == 1
    [asked] = delegates["hr"].asked
    assert asked.conversation() == [{"role": "user", "content": "How much leave does E1001 have left?"}]
    assert delegates["stock"].asked == []
    first, second = agent.model.requests  # type: ignore[attr-defined]
    assert (first.choice, first.tools, first.temperature, first.max_tokens, first.stream) == (
        ["hr", "stock", "none"],
        [],
        0.0,
        32,
        False,
    )
    assert first.messages[-1] == {"role": "user", "content": "How much leave does E1001 have left?"}
    # The answer is written as after any call: the delegate's tools offered, the client's sampling.
    assert second.choice is None and second.tool_choice == "auto" and second.temperature == 0.9
    assert "delegate_to_hr" in {t["function"]["name"] for t in second.tools}
    call, reply = second.messages[-2:]
    assert call["tool_calls"][0]["function"]["name"] == "delegate_to_hr" and reply["content"] == "5 days"
    # the routing call's tokens, the delegate's and the answer's
    assert result.usage.prompt_tokens > 57 and result.usage.completion_tokens > 5


def test_the_routed_delegation_is_decided_audited_and_stepped_as_any(tmp_path: Path) -> None:
    agent, _ = router(tmp_path)
    agent.ask_sync("Do we have SKU-1001?")
    [decision] = [r for r in agent.audit.records if r["action"] == "delegate:stock"]
    assert decision["outcome"] == "allow" and decision["policy"] == "delegation.rego"
    steps = [(e["kind"], e.get("target") or e.get("tool") or e.get("turn")) for e in agent.audit.events]
    assert steps == [
        ("model_call", 1),
        ("delegation", "stock"),
        ("tool_call", "delegate_to_stock"),
        ("model_call", 2),
    ]


def test_a_routed_delegation_the_policy_refuses_is_told_to_the_model(tmp_path: Path) -> None:
    agent, delegates = router(tmp_path)
    # hr is up the chain already: the delegation policy refuses to hand the task back
    result = agent.ask_sync("Leave rules?", Context("req_back", ("hr", "router")))
    assert delegates["hr"].asked == []
    assert "the delegation to 'hr' was denied by policy" in (result.content or "")
    assert result.stats.denials == 1 and result.stats.delegations == []


def test_none_goes_on_as_without_routing(tmp_path: Path) -> None:
    agent, delegates = router(tmp_path)
    result = agent.ask_sync("Good morning")
    assert result.content == "plain answer" and result.stats.delegations == []
    assert result.stats.turns == 2 and all(not d.asked for d in delegates.values())
    _, second = agent.model.requests  # type: ignore[attr-defined]
    assert second.choice is None and second.tool_choice == "auto"
    assert {"delegate_to_hr", "delegate_to_stock"} <= {t["function"]["name"] for t in second.tools}


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    "extra",
    [
        {"tool_choice": "none"},
        {"tool_choice": "required"},
        {"tool_choice": {"type": "function", "function": {"name": "delegate_to_hr"}}},
        {"tools": [WEATHER]},  # the model may need to call the client's own tools
    ],
    ids=["none", "required", "named", "client-tools"],
)
def test_no_routing_call_when_the_client_decided_or_brought_tools(
    tmp_path: Path, extra: dict[str, Any]
) -> None:
    agent, _ = router(tmp_path)
    agent.ask_sync("How much leave?", **extra)
    assert agent.model.requests[0].choice is None  # type: ignore[attr-defined]


def test_no_routing_without_the_section(tmp_path: Path) -> None:
    agent, delegates = router(tmp_path, routing=None)
    assert agent.ask_sync("How much leave?").content == "plain answer"
    [only] = agent.model.requests  # type: ignore[attr-defined]
    assert only.choice is None and all(not d.asked for d in delegates.values())


def test_no_routing_when_the_client_asks_for_a_format(tmp_path: Path) -> None:
    agent, delegates = router(tmp_path, routing={**ROUTING, "mode": "match", "answer": "delegate"})
    agent.ask_sync("How much leave?", response_format={"type": "json_object"})
    assert delegates["hr"].asked == [] and agent.model.requests[0].choice is None  # type: ignore[attr-defined]


def test_the_question_is_routed_as_the_guard_redacted_it(tmp_path: Path) -> None:
    agent, delegates = router(tmp_path)
    agent.ask_sync("Leave for dana.canary@example.org?")
    routed = agent.model.requests[0].messages[-1]["content"]  # type: ignore[attr-defined]
    assert "dana.canary@example.org" not in routed
    assert "dana.canary@example.org" not in delegates["hr"].asked[0].conversation()[0]["content"]


def test_the_example_fleets_script_routes_as_it_delegated_before(tmp_path: Path) -> None:
    """configs/scripted.yaml's orchestrator script relays a delegate's answer: routed by
    words, the answer is the same, and a greeting still reaches the script."""
    script = yaml.safe_load(LOCAL_CONFIG.read_text())["applications"][0]["args"]["models"]["default"][
        "script"
    ]
    model = ScriptedModel(script)
    spec = load_agent(AGENTS / "orchestrator")
    delegates = {name: Delegate(f"{name} answered") for name in spec.manifest.delegates}
    targets = {name: DelegateTarget(name, d) for name, d in delegates.items()}
    agent = GovernedAgent(spec, model, delegates=targets)
    result = agent.ask_sync("How many leave days does E1001 have left?")
    assert result.content == "hr-policy-advisor answered"
    # routed by words and handed off: the orchestrator's model was not called
    assert result.stats.delegations == ["hr-policy-advisor"] and result.stats.turns == 0
    assert model.requests == []
    greeting = agent.ask_sync("hello")
    assert greeting.content and greeting.content.startswith("I route HR policy")
    assert greeting.stats.delegations == []


# --- routing by words (mode: match) ---------------------------------------------------

MATCH: dict[str, Any] = {**ROUTING, "mode": "match", "answer": "delegate"}
DESCRIBED = {"hr": "Answers employee questions.", "stock": "Looks up inventory."}


def test_words_are_lower_case_stems() -> None:
    assert words("Are the replicas RUNNING? SKU-1001's") == ["replica", "run", "sku", "1001"]


def test_the_matcher_picks_the_route_whose_words_the_question_shares() -> None:
    matcher = Matcher(Routing.model_validate(MATCH), DESCRIBED)
    assert matcher.choose("How much sick leave may I take?") == "hr"  # examples and description
    assert matcher.choose("What is the inventory of SKU-1002?") == "stock"  # a stem: inventory
    scores = matcher.scores("How much sick leave may I take?")
    assert set(scores) == {"hr", "stock", "none"} and scores["hr"] > scores["stock"] >= 0


@pytest.mark.parametrize("question", ["Hello!", "What is the capital of France?", "Tell me a joke"])
def test_no_clear_winner_or_none_winning_routes_nowhere(question: str) -> None:
    matcher = Matcher(Routing.model_validate(MATCH), DESCRIBED)
    assert matcher.choose(question) is None


def test_routed_by_words_the_delegates_reply_is_the_answer_and_no_model_is_called(tmp_path: Path) -> None:
    agent, delegates = router(tmp_path, routing=MATCH)
    result = agent.ask_sync("Can I carry over my leave?")
    assert result.content == "5 days" and result.finish_reason == "stop"
    assert agent.model.requests == []  # type: ignore[attr-defined]
    assert result.stats.delegations == ["hr"] and result.stats.turns == 0 and result.stats.tool_calls == 1
    [asked] = delegates["hr"].asked
    assert asked.conversation() == [{"role": "user", "content": "Can I carry over my leave?"}]
    assert result.usage.prompt_tokens == 7 and result.usage.completion_tokens == 3  # the delegate's
    assert result.transcript[-1] == {"role": "assistant", "content": "5 days"}
    decided = [r["action"] for r in agent.audit.records]
    assert decided == ["model_input", "delegate:hr", "data:delegate_to_hr", "model_output"]


def test_a_handed_off_reply_streams_and_passes_the_output_policy(tmp_path: Path) -> None:
    agent, delegates = router(tmp_path, routing=MATCH, policies={"pii": "redact"})
    delegates["hr"].answer = "Ask dana.canary@example.org"

    async def stream() -> tuple[list[str], AgentResult]:
        deltas, request = [], agent.request("Can I carry over my leave?", stream=True)
        async for event in agent.loop.events(request, Context(request_id="req_stream")):
            if isinstance(event, ContentDelta):
                deltas.append(event.text)
            elif isinstance(event, Finished):
                return deltas, event.result
        raise AssertionError("no result")

    deltas, result = asyncio.run(stream())
    assert "dana.canary@example.org" not in "".join(deltas)
    assert "".join(deltas) == result.content and (result.content or "").startswith("Ask ")


def test_a_refused_handoff_is_told_to_the_model(tmp_path: Path) -> None:
    agent, delegates = router(tmp_path, routing=MATCH)
    result = agent.ask_sync("Can I carry over my leave?", Context("req_back", ("hr", "router")))
    assert delegates["hr"].asked == [] and result.stats.denials == 1
    [model_call] = agent.model.requests  # type: ignore[attr-defined]
    assert "was denied by policy" in model_call.messages[-1]["content"]
    assert result.content == "from the specialist: " + model_call.messages[-1]["content"]


def test_routed_nowhere_by_words_the_model_answers_as_without_routing(tmp_path: Path) -> None:
    agent, delegates = router(tmp_path, routing=MATCH)
    result = agent.ask_sync("Good morning")
    assert result.content == "plain answer" and result.stats.turns == 1
    assert all(not d.asked for d in delegates.values())
    [only] = agent.model.requests  # type: ignore[attr-defined]
    assert only.choice is None and "delegate_to_hr" in {t["function"]["name"] for t in only.tools}


def test_the_example_orchestrator_routes_the_held_out_questions_by_words() -> None:
    """The manifest's own routing over loadtests/routing.py's questions, without a model:
    the engine run (README) can only be as good as this."""
    from loadtests.routing import QUESTIONS

    spec = load_agent(AGENTS / "orchestrator")
    assert spec.manifest.routing is not None and spec.manifest.routing.mode == "match"
    described = {n: load_agent(AGENTS / n).manifest.description for n in spec.manifest.delegates}
    matcher = Matcher(spec.manifest.routing, described)
    right = sum(matcher.choose(q.text) == q.expected for q in QUESTIONS)
    assert right / len(QUESTIONS) >= 0.8, right
