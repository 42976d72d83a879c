"""serve.cards: an agent's card, and the one derivation of the facts policies see."""

from __future__ import annotations

import pickle

import pytest

from serve.cards import MAX_SCOPE_SETS, AgentCard
from serve.manifest import load_agent
from serve.policy.schema import AgentFacts
from serve.testing import governed
from serve.tools import load_tools
from tests.unit.conftest import AGENTS, EXAMPLE_AGENTS


def card_of(name: str) -> AgentCard:
    spec = load_agent(AGENTS / name)
    tools = load_tools(spec.folder, [t.name for t in spec.manifest.tools])
    return AgentCard.of(spec, {n: t.description for n, t in tools.items()})


def test_facts_unnarrowed_are_the_agents_declared_ones() -> None:
    facts = card_of("hr-policy-advisor").facts(None)
    assert facts == AgentFacts(
        name="hr-policy-advisor",
        version="1.0.0",
        role="domain",
        scopes=["hr.handbook.read", "hr.leave.read", "hr.leave.write"],
        declared_scopes=["hr.handbook.read", "hr.leave.read", "hr.leave.write"],
        data=["internal", "pii"],
        pii="redact",
        compliance=["gdpr"],
        delegates=[],
    )


def test_facts_narrow_to_the_scopes_held_in_the_agents_order() -> None:
    facts = card_of("orchestrator").facts(["platform.status.read", "hr.handbook.read", "bank.write"])
    assert facts.scopes == ["hr.handbook.read", "platform.status.read"]
    assert facts.declared_scopes == [
        "hr.handbook.read",
        "hr.leave.read",
        "hr.leave.write",
        "scm.inventory.read",
        "platform.status.read",
    ]
    assert card_of("orchestrator").facts([]).scopes == []


def test_the_same_scopes_give_the_same_facts_object() -> None:
    """The governor encodes a facts object once, by identity: a new one per call would
    encode every decision's input again."""
    card = card_of("orchestrator")
    assert card.facts(None) is card.facts(None)
    assert card.facts(["hr.leave.read"]) is card.facts(("hr.leave.read",))
    assert card.facts(["hr.leave.read"]) is not card.facts(None)


def test_many_scope_sets_keep_the_cache_bounded_and_the_facts_right() -> None:
    card = card_of("orchestrator")
    for i in range(MAX_SCOPE_SETS + 5):
        assert card.facts([f"s{i}", "hr.leave.read"]).scopes == ["hr.leave.read"]
    assert len(card._facts) <= MAX_SCOPE_SETS


@pytest.mark.parametrize("name", EXAMPLE_AGENTS)
def test_a_card_without_its_tool_module_has_the_same_facts(name: str) -> None:
    described, bare = card_of(name), AgentCard.of(load_agent(AGENTS / name))
    assert all(t.description for t in described.tools)
    assert all(t.description is None for t in bare.tools)
    assert described.facts(None) == bare.facts(None)


@pytest.mark.parametrize("name", EXAMPLE_AGENTS)
def test_the_guard_decides_on_the_cards_facts(name: str) -> None:
    from serve.context import Context

    spec = load_agent(AGENTS / name)
    guard, _ = governed(spec)
    ctx = guard.enter(Context.new())
    assert guard.facts(ctx) == card_of(name).facts(ctx.scopes)
    assert guard.facts(ctx) is guard.facts(ctx)


def test_a_card_travels_to_the_ingress_intact() -> None:
    card = card_of("hr-policy-advisor")
    card.facts(None)
    copy = pickle.loads(pickle.dumps(card))
    assert copy == card and copy.wire() == card.wire()
    assert copy.facts(None) == card.facts(None)


def test_a_card_is_frozen_and_strict() -> None:
    card = card_of("fleet-monitor")
    with pytest.raises(ValueError, match="frozen"):
        card.name = "other"  # type: ignore[misc]
    with pytest.raises(ValueError, match="Extra inputs"):
        AgentCard.model_validate({**card.wire(), "extra": 1})
    assert AgentCard.model_validate(card.wire()) == card
