"""serve.budget.service: the ledger deployment, one writer over the store; its clock moves
only for a test that asked for it (``budgets.test_clock``)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest

from serve.budget.store import Line, Refusal
from serve.errors import InvalidRequest
from tests.unit.budget.fakes import Clock, service
from tests.unit.conftest import run

NEAR_MIDNIGHT = dt.datetime(2026, 12, 2, 23, 59, tzinfo=dt.UTC).timestamp()
DAY = Line("tenant:acme", "day", Decimal("1.00"))


def test_the_service_reserves_settles_releases_and_reports_over_its_store(tmp_path: Path) -> None:
    ledger = service(tmp_path, Clock(NEAR_MIDNIGHT))

    async def scenario() -> None:
        keys = await ledger.reserve("r1", [DAY], Decimal("0.4"))
        assert keys == (("tenant:acme:day", "2026-12-02"),)
        assert isinstance(await ledger.reserve("r2", [DAY], Decimal("0.7")), Refusal)
        await ledger.settle("r1", Decimal("0.3"), keys)
        assert await ledger.reserve("r3", [DAY], Decimal("0.5")) == keys
        await ledger.release("r3")
        assert await ledger.usage("tenant:") == [
            {"budget": "tenant:acme:day", "period": "2026-12-02", "spent_usd": "0.3", "held_usd": "0"}
        ]
        assert await ledger.usage("key:") == []

    run(scenario())


def test_reservations_live_for_the_services_lease(tmp_path: Path) -> None:
    clock = Clock(NEAR_MIDNIGHT - 3600)
    ledger = service(tmp_path, clock, lease_s=5)

    async def scenario() -> None:
        await ledger.reserve("dead", [DAY], Decimal("0.9"))
        assert isinstance(await ledger.reserve("r2", [DAY], Decimal("0.9")), Refusal)
        clock.now += 5
        assert not isinstance(await ledger.reserve("r3", [DAY], Decimal("0.9")), Refusal)

    run(scenario())


def test_the_clock_moves_only_with_test_clock(tmp_path: Path) -> None:
    ledger = service(tmp_path, Clock(NEAR_MIDNIGHT))
    with pytest.raises(InvalidRequest, match=r"budgets\.test_clock: true"):
        run(ledger.advance(120))

    async def same_day() -> object:  # the refusal did not move it
        return await ledger.reserve("r1", [DAY], Decimal("0.1"))

    assert run(same_day()) == (("tenant:acme:day", "2026-12-02"),)


def test_advance_moves_the_ledgers_clock_into_the_next_period(tmp_path: Path) -> None:
    ledger = service(tmp_path / "moved", Clock(NEAR_MIDNIGHT), test_clock=True)

    async def scenario() -> None:
        keys = await ledger.reserve("r1", [DAY], Decimal("1.0"))
        await ledger.settle("r1", Decimal("1.0"), keys)
        refused = await ledger.reserve("r2", [DAY], Decimal("0.1"))
        assert isinstance(refused, Refusal) and refused.retry_after_s == 60
        assert await ledger.advance(60) == NEAR_MIDNIGHT + 60  # the ledger's own clock, moved
        assert await ledger.reserve("r3", [DAY], Decimal("0.1")) == (("tenant:acme:day", "2026-12-03"),)
        assert await ledger.advance(0.5) == NEAR_MIDNIGHT + 60.5  # offsets add up

    run(scenario())
