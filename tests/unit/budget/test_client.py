"""serve.budget.client: the budgets a model call counts toward, and the agent's side of the
ledger: a refusal is a 402 naming the budget, a ledger that does not answer a 503."""

from __future__ import annotations

import datetime as dt
import pickle
from decimal import Decimal
from pathlib import Path

import pytest

from serve.budget.client import LedgerClient, budget_lines
from serve.budget.config import BudgetLimits, BudgetsConfig
from serve.budget.store import Line, Refusal
from serve.context import Context
from serve.errors import BudgetExceeded, BudgetUnavailable
from serve.policy.schema import Principal
from tests.unit.budget.fakes import Clock, FakeHandle, service
from tests.unit.conftest import run

NOON = dt.datetime(2026, 12, 2, 12, tzinfo=dt.UTC).timestamp()
CONFIG = BudgetsConfig(
    tenants={
        "acme": BudgetLimits(per_day_usd=Decimal("1"), per_month_usd=Decimal("20")),
        "globex": BudgetLimits(per_month_usd=Decimal("3")),
    }
)
KEYS = {"acme:00112233aabbccdd": BudgetLimits(per_day_usd=Decimal("0.25"))}


def ctx(tenant: str | None, authenticated: bool = True, key: str | None = None) -> Context:
    principal = None if tenant is None else Principal(tenant=tenant, authenticated=authenticated)
    return Context.new("req_1", principal, principal_id=key)


# --- the lines of a call ----------------------------------------------------------------


def test_a_call_counts_toward_its_agents_day_its_tenants_day_and_month_and_its_keys() -> None:
    lines = budget_lines("clerk", Decimal("2"), CONFIG, KEYS, ctx("acme", key="acme:00112233aabbccdd"))
    assert lines == [
        Line("agent:clerk", "day", Decimal("2")),
        Line("tenant:acme", "day", Decimal("1")),
        Line("tenant:acme", "month", Decimal("20")),
        Line("key:acme:00112233aabbccdd", "day", Decimal("0.25")),
    ]


def test_only_the_caps_that_are_set_are_lines() -> None:
    assert budget_lines("clerk", None, CONFIG, KEYS, ctx("globex", key="globex:ffff")) == [
        Line("tenant:globex", "month", Decimal("3"))
    ]
    # a key of acme without caps of its own: the tenant's alone
    other_key = budget_lines("clerk", None, CONFIG, KEYS, ctx("acme", key="acme:9999999999999999"))
    assert [line.budget for line in other_key] == ["tenant:acme", "tenant:acme"]
    assert budget_lines("clerk", None, CONFIG, KEYS, ctx("initech", key="initech:00")) == []


def test_tenant_and_key_lines_need_an_authenticated_principal() -> None:
    agent_only = [Line("agent:clerk", "day", Decimal("2"))]
    assert budget_lines("clerk", Decimal("2"), CONFIG, KEYS, ctx(None)) == agent_only
    unauthenticated = ctx("acme", authenticated=False, key="acme:00112233aabbccdd")
    assert budget_lines("clerk", Decimal("2"), CONFIG, KEYS, unauthenticated) == agent_only
    assert budget_lines("clerk", None, CONFIG, KEYS, ctx(None)) == []


# --- the client -------------------------------------------------------------------------

DAY = Line("tenant:acme", "day", Decimal("1"))


def client(tmp_path: Path, timeout_s: float = 2.0) -> tuple[LedgerClient, FakeHandle]:
    handle = FakeHandle(service(tmp_path, Clock(NOON)))
    return LedgerClient(handle, timeout_s), handle


NONE = Decimal(0)  # a lease of just what the call needs


async def _refused(ledger: LedgerClient, amount: str) -> BudgetExceeded:
    got, _ = await ledger.lease("replica-1", [DAY], [Decimal(amount)], NONE)
    assert isinstance(got, Refusal), got
    return ledger.refusal(got, Decimal(amount))


def test_a_refusal_is_budget_exceeded_naming_the_budget_and_when_it_resets(tmp_path: Path) -> None:
    ledger, handle = client(tmp_path)

    async def scenario() -> BudgetExceeded:
        await handle.service.settle("r1", Decimal("0.9"), [("tenant:acme:day", "2026-12-02")])  # spent
        return await _refused(ledger, "0.2")

    error = run(scenario())
    assert error.status == 402 and error.param == "tenant:acme:day"
    assert error.retry_after_s == 12 * 3600
    assert error.message == (
        "the tenant:acme:day budget of 1 USD cannot cover this call (0.2 USD at worst; 0.1 USD left until it resets)"
    )
    back = pickle.loads(pickle.dumps(error))
    assert (back.param, back.retry_after_s, back.message) == (error.param, error.retry_after_s, error.message)


def test_a_refusal_only_holds_caused_says_to_retry_in_seconds(tmp_path: Path) -> None:
    ledger, _ = client(tmp_path)

    async def scenario() -> BudgetExceeded:
        got, _ = await ledger.lease("replica-2", [DAY], [Decimal("0.9")], NONE)  # another replica's slice
        assert not isinstance(got, Refusal)
        return await _refused(ledger, "0.2")

    assert run(scenario()).retry_after_s == 5  # not the period's end: the day has 1 USD unspent


@pytest.mark.parametrize("method", ["lease", "flush"])
def test_a_ledger_that_fails_is_budget_unavailable(tmp_path: Path, method: str) -> None:
    ledger, handle = client(tmp_path)
    handle.fail[method] = RuntimeError("the replica died")
    with pytest.raises(BudgetUnavailable) as raised:
        run(_call(ledger, method))
    assert raised.value.status == 503
    assert raised.value.message == "the budget ledger did not answer (RuntimeError)"


def test_a_ledger_that_does_not_answer_in_time_is_budget_unavailable(tmp_path: Path) -> None:
    ledger, handle = client(tmp_path, timeout_s=0.01)
    handle.hang.add("lease")
    with pytest.raises(BudgetUnavailable, match=r"did not answer \(TimeoutError\)"):
        run(_call(ledger, "lease"))


async def _call(ledger: LedgerClient, method: str) -> None:
    if method == "lease":
        await ledger.lease("replica-1", [DAY], [Decimal("0.1")], NONE)
    else:
        await ledger.flush("f1", "replica-1", [])
