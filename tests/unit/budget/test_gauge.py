"""serve.budget.gauge: each budget's used fraction of its current period, set by the ledger
service after every reserve, settle and release for the budgets the call named."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest

from serve.budget.gauge import UsedRatio, used_ratio
from serve.budget.service import BudgetService
from serve.budget.store import Line, Refusal, SqliteLedger
from serve.telemetry.metrics import EXPORTED
from tests.unit.budget.fakes import Clock, service
from tests.unit.conftest import run

NEAR_MIDNIGHT = dt.datetime(2026, 12, 2, 23, 59, tzinfo=dt.UTC).timestamp()
DAY = Line("tenant:acme", "day", Decimal("1.00"))
MONTH = Line("tenant:acme", "month", Decimal("10.00"))
AGENT = Line("agent:keeper", "day", Decimal("0.50"))


class Recorded:
    """Stands in for Ray's gauge: the last value set per budget, and every set in order."""

    def __init__(self) -> None:
        self.sets: list[tuple[str, float]] = []

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.sets.append((tags["budget"], value))

    @property
    def last(self) -> dict[str, float]:
        return dict(self.sets)


def recorded(ledger: BudgetService) -> Recorded:
    gauge = Recorded()
    ledger._used._gauge = gauge
    return gauge


def test_the_ratio_counts_spent_and_held_against_the_limit() -> None:
    assert used_ratio(Decimal("0.3"), Decimal("0.5"), Decimal("1.00")) == 0.8
    assert used_ratio(Decimal("1.2"), Decimal(0), Decimal("1.00")) == 1.2  # overdrawn shows so
    assert used_ratio(Decimal(0), Decimal(0), Decimal(0)) == 1.0  # a cap of nothing is all used


def test_a_reservation_sets_the_ratio_of_every_budget_it_counts_toward(tmp_path: Path) -> None:
    ledger = service(tmp_path, Clock(NEAR_MIDNIGHT))
    gauge = recorded(ledger)
    run(ledger.reserve("r1", [DAY, MONTH, AGENT], Decimal("0.4")))
    assert gauge.last == {"tenant:acme:day": 0.4, "tenant:acme:month": 0.04, "agent:keeper:day": 0.8}


def test_settle_and_release_set_the_ratio_of_the_budgets_they_touch(tmp_path: Path) -> None:
    ledger = service(tmp_path, Clock(NEAR_MIDNIGHT))
    gauge = recorded(ledger)

    async def scenario() -> None:
        keys = await ledger.reserve("r1", [DAY, AGENT], Decimal("0.4"))
        assert isinstance(keys, tuple)
        await ledger.reserve("r2", [DAY], Decimal("0.3"))
        assert gauge.last["tenant:acme:day"] == 0.7
        gauge.sets.clear()
        await ledger.settle("r1", Decimal("0.1"), keys)  # 0.1 spent, r2's 0.3 still held
        assert gauge.sets == [("tenant:acme:day", 0.4), ("agent:keeper:day", 0.2)]
        gauge.sets.clear()
        await ledger.release("r2")
        assert gauge.sets == [("tenant:acme:day", 0.1)]
        gauge.sets.clear()
        await ledger.release("r2")  # already gone: nothing it counted toward, nothing set
        assert gauge.sets == []

    run(scenario())


def test_a_refused_reservation_still_shows_how_full_the_budget_is(tmp_path: Path) -> None:
    ledger = service(tmp_path, Clock(NEAR_MIDNIGHT))
    gauge = recorded(ledger)

    async def scenario() -> None:
        keys = await ledger.reserve("r1", [DAY], Decimal("0.9"))
        await ledger.settle("r1", Decimal("0.9"), keys)  # type: ignore[arg-type]
        gauge.sets.clear()
        assert isinstance(await ledger.reserve("r2", [DAY], Decimal("0.2")), Refusal)
        assert gauge.sets == [("tenant:acme:day", 0.9)]

    run(scenario())


def test_the_ratio_is_of_the_current_period(tmp_path: Path) -> None:
    clock = Clock(NEAR_MIDNIGHT)
    ledger = service(tmp_path, clock)
    gauge = recorded(ledger)

    async def scenario() -> None:
        keys = await ledger.reserve("r1", [DAY], Decimal("0.5"))
        clock.now += 120  # the call ends after midnight: charged to the day it was admitted in
        await ledger.settle("r1", Decimal("0.5"), keys)  # type: ignore[arg-type]
        assert gauge.last == {"tenant:acme:day": 0.0}  # the new day has spent nothing yet

    run(scenario())


def test_a_budget_the_ledger_has_not_seen_a_limit_for_is_not_set(tmp_path: Path) -> None:
    """After a restart, a settlement may come before any reservation told the budget's limit."""
    gauge = Recorded()
    clock = Clock(NEAR_MIDNIGHT)
    ledger = SqliteLedger(tmp_path / "ledger.db", clock)
    used = UsedRatio(ledger, clock, gauge)
    ledger.settle("r0", Decimal("0.2"), [("tenant:acme:day", "2026-12-02")])
    used.update(["tenant:acme:day"])
    assert gauge.sets == []
    used.track([DAY])
    assert gauge.sets == [("tenant:acme:day", 0.2)]
    used.track([Line("tenant:acme", "day", Decimal("0.25"))])  # the config's cap changed
    assert gauge.last == {"tenant:acme:day": 0.8}


def test_rays_own_gauge_is_named_as_exported_and_takes_the_values(tmp_path: Path) -> None:
    """Ray's gauge (no cluster here) refuses a set whose tags do not match its keys."""
    ledger = service(tmp_path, Clock(NEAR_MIDNIGHT))
    info = ledger._used._gauge.info  # type: ignore[attr-defined]
    assert "ray_" + info["name"] in EXPORTED and info["tag_keys"] == ("budget",)
    keys = run(ledger.reserve("r1", [DAY], Decimal("0.4")))
    run(ledger.settle("r1", Decimal("0.4"), keys))  # type: ignore[arg-type]
    run(ledger.release("r1"))


def test_a_known_budgets_ratio_is_set_again_each_second_without_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray drops a gauge not set within two export intervals: between a budget's calls its
    series must stay (the integration test's scrape once missed it)."""
    monkeypatch.setattr("serve.budget.service.PUBLISH_EVERY_S", 0.01)
    ledger = service(tmp_path, Clock(NEAR_MIDNIGHT))
    gauge = Recorded()
    ledger._used._gauge = gauge  # type: ignore[attr-defined]

    async def scenario() -> None:
        enough = asyncio.Event()
        record = gauge.set

        def counted(value: float, tags: dict[str, str]) -> None:
            record(value, tags)
            if len(gauge.sets) >= 4:  # the reservation's own set, then three of the publisher's
                enough.set()

        gauge.set = counted  # type: ignore[method-assign]
        await ledger.reserve("r1", [DAY], Decimal("0.4"))  # no call to the ledger after this one
        await asyncio.wait_for(enough.wait(), timeout=10)
        assert gauge.sets[-3:] == [("tenant:acme:day", 0.4)] * 3

    run(scenario())
