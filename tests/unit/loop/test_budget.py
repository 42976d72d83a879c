"""The loop's spending: each model call priced at the backend's price and summed over the
request tree, the manifest's ``policies.cost.per_request_usd`` held before every model call,
and delegates handed an even share of what is left."""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from serve.budget import Price, prompt_bound
from serve.budget.client import LedgerClient
from serve.budget.config import BudgetsConfig
from serve.budget.slices import AgentLedger, Slices
from serve.budget.store import Line
from serve.context import Context
from serve.errors import BudgetExceeded, BudgetUnavailable, InvalidRequest, ModelError, RequestError
from serve.loop.results import AgentResult, DelegateTarget, Stats
from serve.loop.runner import UNBOUNDED_CALL_TOKENS, AgentLoop
from serve.manifest import load_agent
from serve.models.base import ModelChunk, ModelRequest
from serve.policy.schema import Principal
from serve.protocol import ChatRequest, Usage
from serve.testing import GovernedAgent, ScriptedModel, echo, rule, tool_call
from tests.unit.budget.fakes import Clock, FakeHandle, service
from tests.unit.conftest import run, write_agent

PRICE = Price(prompt_usd_per_million=Decimal("0.15"), completion_usd_per_million=Decimal("0.60"))
# Prompts free: what a call may cost is its max_tokens alone, whatever its prompt.
COMPLETIONS_ONLY = Price(prompt_usd_per_million=Decimal(0), completion_usd_per_million=Decimal("0.60"))


def _delegations(*agents: str) -> dict[str, Any]:
    return {"tool_calls": [{"name": f"delegate_to_{a}", "arguments": {"task": f"ask {a}"}} for a in agents]}


SCRIPT = [
    rule("#echo", tool_call("echo", text="hi"), "echo said: {tool_result}"),
    rule("#delegate", tool_call("delegate_to_helper", task="{input}"), "helper said: {tool_result}"),
    rule("#two", _delegations("helper", "auditor"), "both answered"),
    rule("#three", _delegations("helper", "auditor", "scribe"), "all answered"),
    rule("", "a plain answer"),
]


class Delegate:
    """A delegate agent that reports what its subtree cost (or fails), keeping its calls."""

    def __init__(self, cost: str = "0", error: RequestError | None = None) -> None:
        self.cost, self.error = Decimal(cost), error
        self.asked: list[Context] = []

    async def __call__(self, request: ChatRequest, ctx: Context) -> AgentResult:
        self.asked.append(ctx)
        if self.error is not None:
            raise self.error
        usage = Usage(prompt_tokens=7, completion_tokens=3, cost_usd=self.cost)
        return AgentResult("on it", [], "stop", usage, Stats())


class Clerk:
    """The agent ``clerk`` (one tool, three delegates) under real policies, on the script."""

    def __init__(self, tmp_path: Path, cap: str | None, price: Price | None = PRICE, **delegates: Delegate):
        cost = {} if cap is None else {"per_request_usd": cap}
        folder = write_agent(
            tmp_path,
            "clerk",
            tools=[{"name": "echo", "scope": "test.run"}],
            delegates=["helper", "auditor", "scribe"],
            scopes=["test.run"],
            policies={"cost": cost},
            max_turns=3,
        )
        self.delegates = {name: delegates.get(name) or Delegate() for name in ("helper", "auditor", "scribe")}
        targets = {name: DelegateTarget(f"The {name}.", d) for name, d in self.delegates.items()}
        self.model = ScriptedModel(SCRIPT)
        self.agent = GovernedAgent(load_agent(folder), self.model, [echo], targets, price=price)

    @property
    def asked(self) -> list[ModelRequest]:
        """Every request the model was given."""
        return self.model.requests

    def ask(self, text: str, ctx: Context | None = None, **extra: Any) -> AgentResult:
        return run(self.agent.ask(text, ctx, **extra))

    def refused(self, text: str, error: type[RequestError] = BudgetExceeded, **extra: Any) -> RequestError:
        with pytest.raises(error) as raised:
            self.ask(text, **extra)
        return raised.value

    def steps(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.agent.audit.events if e.get("kind") == kind]

    def costs(self) -> list[Decimal]:
        """What each model call cost, at the price, from the tokens its step reports."""
        return [PRICE.cost(s["prompt_tokens"], s["completion_tokens"]) for s in self.steps("model_call")]


def worst_case(price: Price, request: ModelRequest, max_tokens: int) -> Decimal:
    """What the loop holds for a call: its prompt's bound and ``max_tokens`` of completion."""
    return price.cost(prompt_bound(request.messages, request.tools), max_tokens)


# --- cost -------------------------------------------------------------------------------


def test_a_request_costs_the_sum_of_its_model_calls_at_the_backends_price(tmp_path: Path) -> None:
    clerk = Clerk(tmp_path, cap=None)
    result = clerk.ask("#echo")
    assert result.content == "echo said: hi"
    first, second = clerk.costs()
    assert first > 0 and second > 0
    assert result.usage.cost_usd == first + second
    # each model_call step carries its own cost, as an exact decimal string
    assert [s["cost_usd"] for s in clerk.steps("model_call")] == [f"{first:f}", f"{second:f}"]


def test_without_a_price_no_budget_is_enforced_and_nothing_costs(tmp_path: Path) -> None:
    clerk = Clerk(tmp_path, cap="0", price=None)
    result = clerk.ask("#echo", Context("req_free", ("clerk",), allowance=Decimal(0)))
    assert result.content == "echo said: hi"
    assert result.usage.cost_usd == 0 and result.usage.total_tokens > 0
    assert [s["cost_usd"] for s in clerk.steps("model_call")] == ["0", "0"]
    assert [r.max_tokens for r in clerk.asked] == [None, None]  # nothing to cap them at


# --- the per-request budget -------------------------------------------------------------


def test_a_call_that_does_not_fit_the_budget_is_refused_before_the_model_is_called(tmp_path: Path) -> None:
    clerk = Clerk(tmp_path, cap="0.00001")  # less than the first prompt's bound costs
    error = clerk.refused("#echo")
    assert error.param == "request:clerk" and error.status == 402
    assert "the request:clerk budget of 0.00001 USD cannot cover this call" in error.message
    assert clerk.asked == [] and clerk.steps("model_call") == []


def test_a_turn_that_no_longer_fits_ends_the_request_after_the_tool_ran(tmp_path: Path) -> None:
    clerk = Clerk(tmp_path, cap="0.000006", price=COMPLETIONS_ONLY)  # ten completion tokens
    error = clerk.refused("#echo", max_tokens=10)  # the first call holds all ten, and spends some
    assert error.param == "request:clerk"
    (first,) = clerk.asked  # the second call was never made
    assert first.max_tokens == 10
    (model_call,) = clerk.steps("model_call")
    assert model_call["completion_tokens"] > 0
    assert [(s["tool"], s["status"]) for s in clerk.steps("tool_call")] == [("echo", "ok")]


def test_a_max_tokens_the_budget_could_never_pay_for_is_the_clients_error(tmp_path: Path) -> None:
    clerk = Clerk(tmp_path, cap="0.00006")  # a hundred completion tokens, and no prompt
    for field in ("max_tokens", "max_completion_tokens"):
        error = clerk.refused("#echo", InvalidRequest, **{field: 101})
        assert error.param == field and error.status == 400
        assert error.message == (
            f"{field}=101 could never fit the budget of agent 'clerk', 0.00006 USD per request "
            "(0.0000606 USD at its completion price)"
        )
    assert clerk.asked == []
    # a hundred fit the cap alone: with the prompt on top, that call is over budget, not invalid
    assert clerk.refused("#echo", max_tokens=100).param == "request:clerk"


def test_without_max_tokens_a_call_may_write_what_the_budget_still_pays_for(tmp_path: Path) -> None:
    cap = Decimal("0.001")
    clerk = Clerk(tmp_path, cap=str(cap))
    assert clerk.ask("#echo").content == "echo said: hi"
    first, second = clerk.asked
    spent_first, _ = clerk.costs()
    for spent, request in ((Decimal(0), first), (spent_first, second)):
        assert request.max_tokens is not None
        # the most completion tokens that fit beside its prompt's bound and what was spent
        assert spent + worst_case(PRICE, request, request.max_tokens) <= cap
        assert spent + worst_case(PRICE, request, request.max_tokens + 1) > cap
    assert second.max_tokens < first.max_tokens  # type: ignore[operator]


def test_a_budget_that_pays_for_more_than_a_long_answer_bounds_the_call_at_one(tmp_path: Path) -> None:
    # 1 USD pays for 125,000 completion tokens, more than an upstream's model may be asked for
    clerk = Clerk(tmp_path, cap="1")
    clerk.ask("#echo")
    assert [r.max_tokens for r in clerk.asked] == [UNBOUNDED_CALL_TOKENS] * 2


def test_a_max_tokens_within_the_budget_is_the_calls_own(tmp_path: Path) -> None:
    clerk = Clerk(tmp_path, cap="0.001")
    clerk.ask("#echo", max_tokens=5)
    assert [r.max_tokens for r in clerk.asked] == [5, 5]


# --- delegations ------------------------------------------------------------------------


def test_a_delegate_is_handed_what_is_left_and_what_it_spent_is_the_callers_too(tmp_path: Path) -> None:
    cap = Decimal("0.001")
    helper = Delegate(cost="0.0001")
    clerk = Clerk(tmp_path, cap=str(cap), helper=helper)
    result = clerk.ask("#delegate")
    assert result.content == "helper said: on it"
    first, second = clerk.costs()
    (ctx,) = helper.asked
    assert ctx.allowance == cap - first
    assert result.usage.cost_usd == first + Decimal("0.0001") + second
    # the next call may write only what is left after the delegate's spending
    after = clerk.asked[1]
    assert after.max_tokens is not None
    spent = first + Decimal("0.0001")
    assert spent + worst_case(PRICE, after, after.max_tokens) <= cap
    assert spent + worst_case(PRICE, after, after.max_tokens + 1) > cap


def test_delegations_made_at_once_get_an_even_share_each(tmp_path: Path) -> None:
    cap = Decimal("0.001")
    clerk = Clerk(tmp_path, cap=str(cap))
    assert clerk.ask("#two").content == "both answered"
    (first, _) = clerk.costs()
    shares = [d.asked[0].allowance for d in (clerk.delegates["helper"], clerk.delegates["auditor"])]
    assert shares == [(cap - first) / 2] * 2
    assert clerk.delegates["scribe"].asked == []


def test_shares_that_do_not_divide_evenly_still_fit_together(tmp_path: Path) -> None:
    # 0.05 / 3, rounded to nearest, is 0.01666...67: three of them are more than 0.05
    clerk = Clerk(tmp_path, cap=None, price=None)
    result = clerk.ask("#three", Context("req_split", ("boss", "clerk"), allowance=Decimal("0.05")))
    assert result.content == "all answered"
    (share,) = {d.asked[0].allowance for d in clerk.delegates.values()}
    assert share is not None and 3 * share <= Decimal("0.05")
    assert Decimal("0.05") - 3 * share < Decimal("1e-20")


def test_a_delegate_out_of_budget_ends_the_callers_request(tmp_path: Path) -> None:
    spent = BudgetExceeded(
        "the request:clerk budget of 0.001 USD cannot cover this call", param="request:clerk"
    )
    clerk = Clerk(tmp_path, cap="0.001", helper=Delegate(error=spent))
    assert clerk.refused("#delegate") is spent
    assert len(clerk.asked) == 1  # the model is not told, as it would be of another failure
    assert [s["target"] for s in clerk.steps("delegation")] == ["helper"]


def test_a_delegate_that_fails_otherwise_is_a_tool_error_the_model_is_told(tmp_path: Path) -> None:
    clerk = Clerk(tmp_path, cap="0.001", helper=Delegate(error=ModelError("engine down")))
    result = clerk.ask("#delegate")
    assert result.content == "helper said: error: agent 'helper' failed: engine down"
    assert result.stats.tool_failures == 1


def test_a_delegates_refusal_names_the_budget_that_binds(tmp_path: Path) -> None:
    clerk = Clerk(tmp_path, cap="0.001")
    delegated = Context("req_tree", ("boss", "clerk"), allowance=Decimal("0.00001"))
    with pytest.raises(BudgetExceeded) as boss:  # the caller's allowance is the lesser
        clerk.ask("#echo", delegated)
    assert boss.value.param == "request:boss"
    assert "the request:boss budget of 0.00001 USD" in boss.value.message
    generous = Context("req_tree", ("boss", "clerk"), allowance=Decimal("0.0001"))
    clerk = Clerk(tmp_path / "again", cap="0.00001")
    with pytest.raises(BudgetExceeded) as own:  # the agent's own cap is the lesser
        clerk.ask("#echo", generous)
    assert own.value.param == "request:clerk"


# --- the cluster's ledger: budgets per day and month ------------------------------------

NOON = dt.datetime(2026, 12, 2, 12, tzinfo=dt.UTC).timestamp()
TODAY = "2026-12-02"


class Keeper:
    """The agent ``keeper`` with a budget per day in a real ledger (a :class:`BudgetService`
    on SQLite behind a fake handle), priced at ``price``, on the script."""

    def __init__(
        self,
        tmp_path: Path,
        per_day: str,
        price: Price | None = PRICE,
        model: Any = None,
        cap: str | None = None,
        policies: list[str] | None = None,
    ) -> None:
        folder = write_agent(
            tmp_path,
            "keeper",
            tools=[{"name": "echo", "scope": "test.run"}],
            scopes=["test.run"],
            policies={"cost": {"per_day_usd": per_day} | ({} if cap is None else {"per_request_usd": cap})},
            max_turns=3,
        )
        self.handle = FakeHandle(service(tmp_path, Clock(NOON)))
        self.ledger = AgentLedger(
            Slices(LedgerClient(self.handle, 2.0), Decimal("0.02")),
            "keeper",
            Decimal(per_day),
            BudgetsConfig(),
            {},
        )
        self.model = ScriptedModel(SCRIPT)
        spec = load_agent(folder)
        agent = GovernedAgent(spec, model or self.model, [echo], price=price, policies=policies)
        self.audit = agent.audit
        self.loop = AgentLoop(
            spec, {"echo": echo}, model or self.model, {}, agent.guard, None, price, self.ledger
        )
        self.request = agent.request

    def ask(self, text: str, ctx: Context | None = None, **extra: Any) -> AgentResult:
        async def asked() -> AgentResult:
            try:
                return await self.loop.run(self.request(text, **extra), ctx or Context("req_day"), None)
            finally:
                await self.ledger.slices.drain()  # spend is reported in batches

        return run(asked())

    def calls(self, name: str) -> list[tuple[Any, ...]]:
        return [args for called, args in self.handle.calls if called == name]

    def held(self) -> Decimal:
        return self.handle.service._ledger.held("agent:keeper:day", TODAY)  # type: ignore[no-any-return]

    def spent(self) -> Decimal:
        return self.handle.service._ledger.spent("agent:keeper:day", TODAY)  # type: ignore[no-any-return]


def test_a_replicas_calls_reserve_in_its_slice_of_the_budget_one_lease_for_many(tmp_path: Path) -> None:
    keeper = Keeper(tmp_path, per_day="1")
    result = keeper.ask("#echo", max_tokens=20)
    assert result.content == "echo said: hi"
    [lease] = keeper.calls("lease")  # the first call leased a slice; the second held in it
    _, lines, needs, fraction, overdraw = lease
    assert lines == [Line("agent:keeper", "day", Decimal("1"))] and fraction == Decimal("0.02")
    assert needs == [worst_case(PRICE, keeper.model.requests[0], 20)] and overdraw == []
    [flush] = keeper.calls("flush")  # drained: what was spent, and the rest given back
    [(budget, period_, spent, holding)] = flush[2]
    assert (budget, period_) == ("agent:keeper:day", TODAY)
    assert spent == result.usage.cost_usd > 0 and holding == 0  # all of the slice given back


def test_a_refusal_of_the_ledger_is_a_402_before_the_model_is_called_and_frees_the_purse(
    tmp_path: Path,
) -> None:
    keeper = Keeper(tmp_path, per_day="0.00001", cap="0.5")  # less than the prompt's bound
    request = keeper.request("#echo", max_tokens=20)
    ctx = Context("req_day")
    state = keeper.loop._start(request, [], ctx)
    model_request = ModelRequest(agent="keeper", messages=state.messages, max_tokens=20)
    with pytest.raises(BudgetExceeded) as refused:
        run(keeper.loop._reserve(ctx, state, model_request))
    assert refused.value.param == "agent:keeper:day" and refused.value.retry_after_s == 12 * 3600
    assert state.purse.held == 0 and state.purse.spent == 0
    # the same through the loop: the model is never called, and nothing is held or spent
    with pytest.raises(BudgetExceeded) as again:
        keeper.ask("#echo", max_tokens=20)
    assert again.value.param == "agent:keeper:day"
    assert keeper.model.requests == [] and keeper.held() == 0 and keeper.spent() == 0


class FailingModel:
    def __init__(self) -> None:
        self.requests: list[ModelRequest] = []

    async def __call__(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        self.requests.append(request)
        raise ModelError("engine down")
        yield  # an async generator, as the loop's model is


def test_a_model_call_that_fails_releases_its_hold_and_nothing_is_charged(tmp_path: Path) -> None:
    model = FailingModel()
    keeper = Keeper(tmp_path, per_day="1", model=model)
    with pytest.raises(ModelError):
        keeper.ask("#echo", max_tokens=20)
    assert len(model.requests) == 1 and len(keeper.calls("lease")) == 1
    [flush] = keeper.calls("flush")
    assert [(spent, holding) for _, _, spent, holding in flush[2]] == [(0, 0)]
    assert keeper.held() == 0 and keeper.spent() == 0


def test_a_call_without_max_tokens_is_bounded_so_that_the_ledger_can_hold_its_worst_case(
    tmp_path: Path,
) -> None:
    keeper = Keeper(tmp_path, per_day="1")  # no per-request cap: nothing else bounds it
    keeper.ask("#echo")
    assert [r.max_tokens for r in keeper.model.requests] == [UNBOUNDED_CALL_TOKENS] * 2
    [(_, _, needs, _, _)] = keeper.calls("lease")
    assert needs == [worst_case(PRICE, keeper.model.requests[0], UNBOUNDED_CALL_TOKENS)]


def test_the_ledger_holds_no_more_than_the_unbounded_call_even_when_the_purse_pays_for_more(
    tmp_path: Path,
) -> None:
    # 1 USD a request pays for 125,000 completion tokens: the purse alone would let the
    # call have them all, and the day budget would be asked to hold them.
    keeper = Keeper(tmp_path, per_day="10", cap="1")
    keeper.ask("#echo")
    assert [r.max_tokens for r in keeper.model.requests] == [UNBOUNDED_CALL_TOKENS] * 2
    # A client's own max_tokens is kept, above the bound too.
    asked = Keeper(tmp_path / "asked", per_day="10", cap="1")
    asked.ask("#echo", max_tokens=5000)
    assert [r.max_tokens for r in asked.model.requests] == [5000, 5000]


def test_without_a_price_the_ledger_is_not_asked(tmp_path: Path) -> None:
    keeper = Keeper(tmp_path, per_day="0", price=None)
    assert keeper.ask("#echo").content == "echo said: hi"
    assert keeper.handle.calls == []
    assert [r.max_tokens for r in keeper.model.requests] == [None, None]


def test_a_ledger_that_does_not_answer_is_a_503_before_the_model_is_called(tmp_path: Path) -> None:
    keeper = Keeper(tmp_path, per_day="1")
    keeper.handle.fail["lease"] = RuntimeError("replica restarting")
    with pytest.raises(BudgetUnavailable):
        keeper.ask("#echo", max_tokens=20)
    assert keeper.model.requests == []


class Talker:
    """A model that streams ``pieces`` words, then its usage, as an engine does."""

    def __init__(self, pieces: int) -> None:
        self.pieces = pieces
        self.requests: list[ModelRequest] = []

    async def __call__(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        self.requests.append(request)
        for _ in range(self.pieces):
            yield ModelChunk(content="word ")
        yield ModelChunk(finish_reason="stop", usage=Usage(prompt_tokens=9, completion_tokens=self.pieces))


def test_a_call_the_client_left_mid_stream_is_charged_its_prompts_bound_and_the_pieces_it_got(
    tmp_path: Path,
) -> None:
    model = Talker(pieces=10)
    keeper = Keeper(tmp_path, per_day="1", model=model)

    async def leave_after(pieces: int) -> None:
        events = keeper.loop.events(keeper.request("hello", max_tokens=50), Context("req_gone"))
        async with contextlib.aclosing(events) as stream:
            got = 0
            async for _ in stream:
                got += 1
                if got == pieces:
                    break  # the client went away: the stream is closed under the call
        await keeper.ledger.slices.drain()

    run(leave_after(3))
    [request] = model.requests
    [flush] = keeper.calls("flush")
    [(_, _, spent, _)] = flush[2]
    assert spent == PRICE.cost(prompt_bound(request.messages, request.tools), 3) > 0
    assert keeper.spent() == spent and keeper.held() == 0


def test_a_budget_that_cannot_cover_a_call_asks_the_budget_policy_which_may_let_a_role_overdraw(
    tmp_path: Path,
) -> None:
    data = tmp_path / "overdraw.yaml"
    data.write_text("budgets: {overdraw_roles: [admin]}\n")
    keeper = Keeper(tmp_path, per_day="0", policies=["configs/policies", str(data)])  # nothing fits

    def as_role(role: str) -> Context:
        return Context.new("req_" + role, Principal(tenant="acme", roles=[role], authenticated=True))

    with pytest.raises(BudgetExceeded) as refused:
        keeper.ask("#echo", as_role("employee"), max_tokens=20)
    assert refused.value.param == "agent:keeper:day" and keeper.model.requests == []
    overdrawn = keeper.ask("#echo", as_role("admin"), max_tokens=20)
    assert overdrawn.content == "echo said: hi"
    assert keeper.spent() == overdrawn.usage.cost_usd > 0  # over the day, as the policy allowed
    decisions = [r for r in keeper.audit.records if r["action"] == "budget:agent:keeper:day"]
    assert [(d["request_id"], d["point"], d["outcome"]) for d in decisions] == [
        ("req_employee", "budget", "deny"),
        ("req_admin", "budget", "allow"),
        ("req_admin", "budget", "allow"),  # each of its two model calls asked
    ]
    assert "less than this call's worst case" in decisions[0]["reasons"][0]
    assert decisions[1]["reasons"] == ["role admin may overdraw agent:keeper:day"]


def test_by_default_nobody_overdraws_and_the_refusal_is_an_audited_decision(tmp_path: Path) -> None:
    keeper = Keeper(tmp_path, per_day="1", cap="0.0001")
    admin = Context.new("req_admin", Principal(tenant="acme", roles=["admin"], authenticated=True))
    with pytest.raises(BudgetExceeded) as refused:  # its prompt's bound alone costs 0.0003 USD
        keeper.ask("#echo " + "x" * 2000, admin, max_tokens=20)
    assert refused.value.param == "request:keeper"
    [decision] = [r for r in keeper.audit.records if r["action"].startswith("budget:")]
    assert (decision["action"], decision["outcome"]) == ("budget:request:keeper", "deny")


class BreaksMidStream(Talker):
    async def __call__(self, request: ModelRequest) -> AsyncIterator[ModelChunk]:
        self.requests.append(request)
        for _ in range(self.pieces):
            yield ModelChunk(content="word ")
        raise ModelError("upstream reset")


def test_a_call_the_engine_broke_mid_stream_is_charged_what_came(tmp_path: Path) -> None:
    model = BreaksMidStream(pieces=4)
    keeper = Keeper(tmp_path, per_day="1", model=model)
    with pytest.raises(ModelError):
        keeper.ask("hello", max_tokens=50)
    [request] = model.requests
    assert keeper.spent() == PRICE.cost(prompt_bound(request.messages, request.tools), 4) > 0
    assert keeper.held() == 0
