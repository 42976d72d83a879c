"""serve.budget.slices: a replica reserves against its leased slice of each budget, refills
from the one ledger, reports its spend in batches; the cluster's total never exceeds a limit."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from serve.budget.client import LedgerClient
from serve.budget.service import BudgetService
from serve.budget.slices import Slices
from serve.budget.store import Line
from serve.errors import BudgetExceeded
from tests.unit.budget.fakes import Clock, FakeHandle, service
from tests.unit.conftest import run

NOON = dt.datetime(2026, 12, 2, 12, tzinfo=dt.UTC).timestamp()
DAY = Line("tenant:acme", "day", Decimal("1"))


def replica(handle: Any, fraction: str = "0.1", **options: Any) -> Slices:
    return Slices(LedgerClient(handle, 2.0), Decimal(fraction), clock=handle.service._clock, **options)


def ledger_of(handle: FakeHandle) -> Any:
    return handle.service._ledger


def test_many_calls_take_one_lease_and_one_flush_reports_them_all(tmp_path: Path) -> None:
    handle = FakeHandle(service(tmp_path, Clock(NOON)))
    slices = replica(handle)

    async def scenario() -> None:
        for _ in range(10):
            hold = await slices.reserve([DAY], Decimal("0.005"))
            slices.settle(hold, Decimal("0.002"))
        assert ledger_of(handle).held("tenant:acme:day", "2026-12-02") == Decimal("0.1")  # the slice
        await slices.drain()

    run(scenario())
    assert handle.names() == ["lease", "flush"]
    assert ledger_of(handle).spent("tenant:acme:day", "2026-12-02") == Decimal("0.020")
    assert ledger_of(handle).held("tenant:acme:day", "2026-12-02") == 0


def test_two_replicas_never_reserve_more_than_the_limit_together(tmp_path: Path) -> None:
    handle = FakeHandle(service(tmp_path, Clock(NOON)))
    first, second = replica(handle, "0.5"), replica(handle, "0.5")

    async def scenario() -> None:
        await first.reserve([DAY], Decimal("0.3"))  # leases 0.5
        await second.reserve([DAY], Decimal("0.3"))  # leases the other 0.5
        with pytest.raises(BudgetExceeded) as refused:  # first's slice has 0.2: the ledger has nothing
            await first.reserve([DAY], Decimal("0.3"))
        assert refused.value.param == "tenant:acme:day" and refused.value.left == 0
        await second.drain()  # second gives back what it does not use (its call still holds 0.3)

    run(scenario())
    ledger = ledger_of(handle)
    assert ledger.held("tenant:acme:day", "2026-12-02") == Decimal("0.8")  # first's 0.5, second's call


def test_a_slice_of_a_small_budget_is_what_the_call_needs(tmp_path: Path) -> None:
    handle = FakeHandle(service(tmp_path, Clock(NOON)))
    slices = replica(handle, "0.02")
    small = Line("tenant:tiny", "day", Decimal("0.01"))

    async def scenario() -> None:
        hold = await slices.reserve([small], Decimal("0.007"))  # 2 % would be 0.0002: the call needs more
        assert ledger_of(handle).held("tenant:tiny:day", "2026-12-02") == Decimal("0.007")
        with pytest.raises(BudgetExceeded):
            await slices.reserve([small], Decimal("0.007"))
        slices.release(hold)

    run(scenario())


def test_a_new_period_takes_a_new_slice_and_the_old_ones_spend_stays_in_its_day(tmp_path: Path) -> None:
    clock = Clock(NOON)
    handle = FakeHandle(service(tmp_path, clock))
    slices = replica(handle)

    async def scenario() -> None:
        slices.settle(await slices.reserve([DAY], Decimal("0.01")), Decimal("0.004"))
        clock.now += 86_400
        slices.settle(await slices.reserve([DAY], Decimal("0.01")), Decimal("0.003"))
        await slices.drain()

    run(scenario())
    ledger = ledger_of(handle)
    assert ledger.spent("tenant:acme:day", "2026-12-02") == Decimal("0.004")
    assert ledger.spent("tenant:acme:day", "2026-12-03") == Decimal("0.003")
    assert ledger.held("tenant:acme:day", "2026-12-02") == ledger.held("tenant:acme:day", "2026-12-03") == 0


def test_spend_is_reported_while_the_replica_works_and_idle_slices_are_given_back(tmp_path: Path) -> None:
    handle = FakeHandle(service(tmp_path, Clock(NOON)))
    slices = replica(handle, flush_s=0.02, idle_s=0.05)

    async def scenario() -> None:
        slices.settle(await slices.reserve([DAY], Decimal("0.01")), Decimal("0.004"))
        await asyncio.sleep(0.04)  # a flush came: spent is in the ledger, the slice still held
        assert ledger_of(handle).spent("tenant:acme:day", "2026-12-02") == Decimal("0.004")
        assert ledger_of(handle).held("tenant:acme:day", "2026-12-02") > 0
        await asyncio.sleep(0.2)  # idle: given back
        assert ledger_of(handle).held("tenant:acme:day", "2026-12-02") == 0

    run(scenario())


class LosesAnswer(FakeHandle):
    """The ledger does the first ``method`` call, but its answer is lost on the way back."""

    def __init__(self, target: BudgetService, method: str) -> None:
        super().__init__(target)
        self.method, self.lost = method, 1

    async def answer(self, name: str, args: tuple[Any, ...]) -> Any:
        got = await super().answer(name, args)
        if name == self.method and self.lost:
            self.lost -= 1
            raise RuntimeError("connection reset")
        return got


def test_a_flush_whose_answer_was_lost_is_sent_again_and_charged_once(tmp_path: Path) -> None:
    handle = LosesAnswer(service(tmp_path, Clock(NOON)), "flush")
    slices = replica(handle)

    async def scenario() -> None:
        slices.settle(await slices.reserve([DAY], Decimal("0.01")), Decimal("0.004"))
        with pytest.raises(Exception, match="did not answer"):
            await slices.drain()
        await slices.drain()  # the same flush, again

    run(scenario())
    flushes = [args for name, args in handle.calls if name == "flush"]
    assert len(flushes) == 2 and flushes[0] == flushes[1]  # same id, same parts
    assert ledger_of(handle).spent("tenant:acme:day", "2026-12-02") == Decimal("0.004")


def test_a_lease_whose_answer_was_lost_is_put_right_by_the_next_flush(tmp_path: Path) -> None:
    handle = LosesAnswer(service(tmp_path, Clock(NOON)), "lease")
    slices = replica(handle)

    async def scenario() -> None:
        with pytest.raises(Exception, match="did not answer"):
            await slices.reserve([DAY], Decimal("0.01"))
        assert ledger_of(handle).held("tenant:acme:day", "2026-12-02") == Decimal("0.1")  # granted, unknown
        hold = await slices.reserve([DAY], Decimal("0.01"))  # leased again: 0.2 held in all
        await slices._flush(give_back=False)  # says it holds its one slice of 0.1
        assert ledger_of(handle).held("tenant:acme:day", "2026-12-02") == Decimal("0.1")
        slices.release(hold)
        await slices.drain()

    run(scenario())
    assert ledger_of(handle).held("tenant:acme:day", "2026-12-02") == 0


def test_a_restarted_ledger_learns_the_replicas_slices_from_its_next_flush(tmp_path: Path) -> None:
    clock = Clock(NOON)
    handle = FakeHandle(service(tmp_path, clock))
    slices = replica(handle)

    async def scenario() -> None:
        hold = await slices.reserve([DAY], Decimal("0.01"))
        handle.service = service(tmp_path, clock)  # the ledger restarted: it holds nothing
        assert ledger_of(handle).held("tenant:acme:day", "2026-12-02") == 0
        await slices._flush(give_back=False)
        assert ledger_of(handle).held("tenant:acme:day", "2026-12-02") == Decimal("0.1")  # counted again
        slices.release(hold)
        await slices.drain()

    run(scenario())


def test_what_a_replica_has_free_counts_toward_its_next_lease(tmp_path: Path) -> None:
    handle = FakeHandle(service(tmp_path, Clock(NOON)))
    slices = replica(handle, "0.15")

    async def scenario() -> None:
        first = await slices.reserve([DAY], Decimal("0.05"))  # leases 0.15: 0.1 free
        other = replica(handle, "0.75")
        await other.reserve([DAY], Decimal("0.7"))  # another replica: 0.75; the ledger has 0.1 left
        # 0.15 needs 0.05 more than this replica has free: the ledger's 0.1 covers it
        second = await slices.reserve([DAY], Decimal("0.15"))
        slices.release(first)
        slices.release(second)

    run(scenario())
    [*_, (_, _, needs, _, _)] = [args for name, args in handle.calls if name == "lease"]
    assert needs == [Decimal("0.05")]


def test_only_the_budget_a_policy_allowed_is_overdrawn(tmp_path: Path) -> None:
    handle = FakeHandle(service(tmp_path, Clock(NOON)))
    slices = replica(handle)
    tight = Line("tenant:acme", "day", Decimal("0.001"))
    agent = Line("agent:clerk", "day", Decimal("0.001"))

    async def scenario() -> None:
        with pytest.raises(BudgetExceeded) as refused:  # allowed to overdraw the tenant, not the agent
            await slices.reserve([tight, agent], Decimal("0.01"), ["tenant:acme:day"])
        assert refused.value.param == "agent:clerk:day"
        hold = await slices.reserve([tight, agent], Decimal("0.01"), ["tenant:acme:day", "agent:clerk:day"])
        slices.release(hold)
        await slices.drain()

    run(scenario())
