"""serve.budget.store: periods are UTC days and months; the ledger holds a call's worst case
against every budget it counts toward, or none, and charges what it cost to the periods it
was reserved in."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from pathlib import Path

import pytest

from serve.budget.store import Line, Refusal, SqliteLedger, period

ZERO = Decimal(0)


def at(*when: int) -> float:
    """Epoch seconds of a UTC date and time."""
    return dt.datetime(*when, tzinfo=dt.UTC).timestamp()  # type: ignore[misc]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- periods ----------------------------------------------------------------------------


def test_a_day_is_named_by_its_date_and_ends_at_the_next_utc_midnight() -> None:
    assert period("day", at(2026, 12, 2, 16, 19)) == ("2026-12-02", at(2026, 12, 3))
    assert period("day", at(2026, 12, 2)) == ("2026-12-02", at(2026, 12, 3))  # its first second
    assert period("day", at(2026, 12, 2, 23, 59, 59)) == ("2026-12-02", at(2026, 12, 3))
    assert period("day", at(2026, 12, 2, 23, 59, 59) + 0.999) == ("2026-12-02", at(2026, 12, 3))
    assert period("day", at(2026, 12, 3)) == ("2026-12-03", at(2026, 12, 4))


def test_a_month_is_named_by_its_year_and_month_and_ends_on_the_first_of_the_next() -> None:
    assert period("month", at(2026, 12, 2, 12)) == ("2026-12", at(2027, 1, 1))
    assert period("month", at(2026, 12, 31, 23, 59, 59)) == ("2026-12", at(2027, 1, 1))
    assert period("day", at(2026, 12, 31, 23, 59, 59)) == ("2026-12-31", at(2027, 1, 1))
    assert period("month", at(2027, 1, 1)) == ("2027-01", at(2027, 2, 1))
    assert period("month", at(2028, 2, 29, 12)) == ("2028-02", at(2028, 3, 1))  # a leap year
    assert period("day", at(2028, 2, 28, 12)) == ("2028-02-28", at(2028, 2, 29))
    assert period("month", at(2027, 2, 28, 12)) == ("2027-02", at(2027, 3, 1))
    assert period("month", at(2026, 1, 31, 12)) == ("2026-01", at(2026, 2, 1))  # +32 days, not Mar


def test_periods_read_epoch_seconds_as_floats() -> None:
    assert period("day", 1_796_169_600.5) == ("2026-12-02", 1_796_256_000.0)
    assert period("day", 1_796_255_999.999) == ("2026-12-02", 1_796_256_000.0)
    assert period("month", 0.0) == ("1970-01", at(1970, 2, 1))


# --- the ledger -------------------------------------------------------------------------

DAY = Line("tenant:acme", "day", Decimal("1.00"))
MONTH = Line("tenant:acme", "month", Decimal("5.00"))
KEY = Line("key:acme:00", "day", Decimal("0.50"))
NOON = at(2026, 12, 2, 12)


@pytest.fixture
def clock() -> Clock:
    return Clock(NOON)


@pytest.fixture
def ledger(tmp_path: Path, clock: Clock) -> SqliteLedger:
    return SqliteLedger(tmp_path / "var" / "ledger.db", clock)


def spent(ledger: SqliteLedger, line: Line, label: str) -> Decimal:
    return ledger.spent(line.name, label)


def test_a_reservation_holds_against_every_line_and_names_their_periods(ledger: SqliteLedger) -> None:
    keys = ledger.reserve("r1", [DAY, MONTH, KEY], Decimal("0.3"), lease_s=60)
    assert keys == (
        ("tenant:acme:day", "2026-12-02"),
        ("tenant:acme:month", "2026-12"),
        ("key:acme:00:day", "2026-12-02"),
    )
    assert ledger.reserve_keys("r1") == keys
    for name, label in keys:
        assert ledger.held(name, label) == Decimal("0.3")


def test_a_refusal_names_the_first_line_that_cannot_cover_it_and_holds_nothing(
    ledger: SqliteLedger,
) -> None:
    refused = ledger.reserve("r1", [DAY, KEY, MONTH], Decimal("0.6"), lease_s=60)
    assert refused == Refusal("key:acme:00:day", Decimal("0.50"), Decimal("0.50"), 12 * 3600)
    assert ledger.held("tenant:acme:day", "2026-12-02") == ZERO  # all or nothing
    assert ledger.reserve_keys("r1") == ()
    tight = Line("tenant:acme", "day", Decimal("0.1"))
    first = ledger.reserve("r2", [tight, Line("key:acme:00", "day", Decimal("0.05"))], Decimal("0.2"), 60)
    assert isinstance(first, Refusal) and first.budget == "tenant:acme:day"


def test_what_is_held_counts_against_later_reservations(ledger: SqliteLedger) -> None:
    assert not isinstance(ledger.reserve("r1", [DAY], Decimal("0.7"), 60), Refusal)
    refused = ledger.reserve("r2", [DAY], Decimal("0.4"), 60)
    assert isinstance(refused, Refusal) and refused.left == Decimal("0.30")
    assert not isinstance(ledger.reserve("r3", [DAY], Decimal("0.3"), 60), Refusal)  # exactly what is left
    refused = ledger.reserve("r4", [DAY], Decimal("0.000001"), 60)
    assert isinstance(refused, Refusal) and refused.left == ZERO


def test_left_is_never_negative_when_spend_went_over_the_cap(ledger: SqliteLedger) -> None:
    ledger.reserve("r1", [DAY], Decimal("0.9"), 60)
    ledger.settle("r1", Decimal("1.2"), [("tenant:acme:day", "2026-12-02")])  # the engine overran
    refused = ledger.reserve("r2", [DAY], ZERO, 60)
    assert isinstance(refused, Refusal) and refused.left == ZERO


@pytest.mark.parametrize(
    ("now", "line", "expected"),
    [
        (at(2026, 12, 2, 12), DAY, 12 * 3600),
        (at(2026, 12, 2, 23, 59, 59), DAY, 1),
        (at(2026, 12, 2, 23, 59, 59) + 0.999, DAY, 1),  # never 0: ceil, at least a second
        (at(2026, 12, 2, 23, 59, 58) + 0.5, DAY, 2),  # 1.5 s: rounded up
        (at(2026, 12, 31, 12), MONTH, 12 * 3600),
        (at(2026, 12, 30), MONTH, 2 * 86400),
    ],
)
def test_a_refusal_says_to_retry_when_its_period_ends(
    ledger: SqliteLedger, clock: Clock, now: float, line: Line, expected: int
) -> None:
    clock.now = now
    refused = ledger.reserve("r1", [line], Decimal(100), 60)
    assert isinstance(refused, Refusal) and refused.retry_after_s == expected


def test_settle_charges_the_cost_to_every_period_reserved_and_frees_the_hold(ledger: SqliteLedger) -> None:
    keys = ledger.reserve("r1", [DAY, MONTH], Decimal("0.3"), 60)
    assert not isinstance(keys, Refusal)
    ledger.settle("r1", Decimal("0.12"), keys)
    assert spent(ledger, DAY, "2026-12-02") == spent(ledger, MONTH, "2026-12") == Decimal("0.12")
    assert ledger.held(*keys[0]) == ledger.held(*keys[1]) == ZERO
    refused = ledger.reserve("r2", [DAY], Decimal(1), 60)
    assert isinstance(refused, Refusal) and refused.left == Decimal("0.88")


def test_a_call_that_ran_past_midnight_is_charged_to_the_day_it_was_reserved_in(
    ledger: SqliteLedger, clock: Clock
) -> None:
    clock.now = at(2026, 12, 31, 23, 59, 50)
    keys = ledger.reserve("r1", [DAY, MONTH], Decimal("0.3"), 60)
    assert not isinstance(keys, Refusal)
    clock.now = at(2027, 1, 1, 0, 0, 5)
    ledger.settle("r1", Decimal("0.2"), keys)
    assert spent(ledger, DAY, "2026-12-31") == spent(ledger, MONTH, "2026-12") == Decimal("0.2")
    assert spent(ledger, DAY, "2027-01-01") == spent(ledger, MONTH, "2027-01") == ZERO
    # and the new day has its whole cap
    assert ledger.reserve("r2", [DAY], Decimal(1), 60) == (("tenant:acme:day", "2027-01-01"),)


def test_a_reservation_whose_lease_ended_is_still_charged_when_it_settles(
    ledger: SqliteLedger, clock: Clock
) -> None:
    keys = ledger.reserve("r1", [DAY], Decimal("0.3"), lease_s=10)
    assert not isinstance(keys, Refusal)
    clock.now += 11
    ledger.reserve("other", [KEY], Decimal("0.1"), 60)  # expiry is lazy: this drops r1
    assert ledger.reserve_keys("r1") == ()
    ledger.settle("r1", Decimal("0.25"), keys)
    assert spent(ledger, DAY, "2026-12-02") == Decimal("0.25")


def test_a_settle_from_a_holder_the_ledger_never_saw_is_charged_to_its_keys(ledger: SqliteLedger) -> None:
    ledger.settle("from-before-a-restart", Decimal("0.1"), [("tenant:acme:day", "2026-12-02")])
    assert spent(ledger, DAY, "2026-12-02") == Decimal("0.1")


def test_a_free_settle_charges_nothing_and_frees_the_hold(ledger: SqliteLedger) -> None:
    keys = ledger.reserve("r1", [DAY], Decimal("0.3"), 60)
    assert not isinstance(keys, Refusal)
    ledger.settle("r1", ZERO, keys)
    assert ledger.usage() == [] and ledger.held(*keys[0]) == ZERO


def test_release_frees_the_hold_and_charges_nothing(ledger: SqliteLedger) -> None:
    keys = ledger.reserve("r1", [DAY], Decimal("0.9"), 60)
    assert not isinstance(keys, Refusal)
    ledger.release("r1")
    ledger.release("r1")  # twice, or unknown: nothing happens
    ledger.release("never")
    assert ledger.held(*keys[0]) == ZERO and spent(ledger, DAY, "2026-12-02") == ZERO
    assert not isinstance(ledger.reserve("r2", [DAY], Decimal(1), 60), Refusal)


def test_a_dead_holders_hold_stops_counting_when_its_lease_ends(ledger: SqliteLedger, clock: Clock) -> None:
    ledger.reserve("dead", [DAY], Decimal("0.9"), lease_s=30)
    clock.now += 29.9
    assert isinstance(ledger.reserve("r2", [DAY], Decimal("0.2"), 30), Refusal)
    clock.now = NOON + 30  # exactly at its end
    assert not isinstance(ledger.reserve("r3", [DAY], Decimal("0.2"), 30), Refusal)
    assert ledger.reserve_keys("dead") == ()


def test_settled_spend_survives_a_new_ledger_on_the_same_file(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "ledger.db"
    first = SqliteLedger(path, clock)
    keys = first.reserve("r1", [DAY, MONTH], Decimal("0.5"), 60)
    assert not isinstance(keys, Refusal)
    first.settle("r1", Decimal("0.4"), keys)
    first.reserve("r2", [DAY], Decimal("0.3"), 60)  # in memory only: gone with the ledger
    first.close()
    again = SqliteLedger(path, clock)
    assert spent(again, DAY, "2026-12-02") == Decimal("0.4")
    assert again.held("tenant:acme:day", "2026-12-02") == ZERO
    refused = again.reserve("r3", [DAY], Decimal(1), 60)
    assert isinstance(refused, Refusal) and refused.left == Decimal("0.60")


def test_many_small_settles_add_up_exactly(ledger: SqliteLedger) -> None:
    for i in range(1000):
        keys = ledger.reserve(f"r{i}", [DAY], Decimal("0.0001"), 60)
        assert not isinstance(keys, Refusal)
        ledger.settle(f"r{i}", Decimal("0.000022"), keys)
    assert spent(ledger, DAY, "2026-12-02") == Decimal("0.022")
    assert ledger.usage()[0]["spent_usd"] == "0.022000"


def test_usage_lists_spent_and_held_per_budget_and_period(ledger: SqliteLedger) -> None:
    keys = ledger.reserve("r1", [DAY, MONTH, KEY], Decimal("0.2"), 60)
    assert not isinstance(keys, Refusal)
    ledger.settle("r1", Decimal("0.15"), keys)
    ledger.reserve("r2", [DAY, MONTH], Decimal("0.05"), 60)
    assert ledger.usage() == [
        {"budget": "key:acme:00:day", "period": "2026-12-02", "spent_usd": "0.15", "held_usd": "0"},
        {"budget": "tenant:acme:day", "period": "2026-12-02", "spent_usd": "0.15", "held_usd": "0.05"},
        {"budget": "tenant:acme:month", "period": "2026-12", "spent_usd": "0.15", "held_usd": "0.05"},
    ]
    assert [r["budget"] for r in ledger.usage("tenant:")] == ["tenant:acme:day", "tenant:acme:month"]


def test_usage_under_a_prefix_takes_it_literally(ledger: SqliteLedger) -> None:
    for budget in ("tenant:a_c", "tenant:abc", "tenant:a%"):
        line = Line(budget, "day", Decimal(1))
        keys = ledger.reserve(budget, [line], Decimal("0.1"), 60)
        assert not isinstance(keys, Refusal)
        ledger.settle(budget, Decimal("0.1"), keys)
    assert [r["budget"] for r in ledger.usage("tenant:a_")] == ["tenant:a_c:day"]
    assert [r["budget"] for r in ledger.usage("tenant:a%")] == ["tenant:a%:day"]


def test_a_settlement_sent_again_is_charged_once_even_by_a_restarted_ledger(
    tmp_path: Path, clock: Clock
) -> None:
    path = tmp_path / "ledger.db"
    first = SqliteLedger(path, clock)
    keys = first.reserve("r1", [DAY], Decimal("0.5"), 60)
    assert not isinstance(keys, Refusal)
    first.settle("r1", Decimal("0.2"), keys)
    first.settle("r1", Decimal("0.2"), keys)  # its answer was lost: the client sent it again
    first.close()
    again = SqliteLedger(path, clock)
    again.settle("r1", Decimal("0.2"), keys)
    assert spent(again, DAY, "2026-12-02") == Decimal("0.2")
    again.settle("r2", Decimal("0.2"), keys)  # another reservation is charged
    assert spent(again, DAY, "2026-12-02") == Decimal("0.4")


def test_settlements_are_remembered_a_day_then_forgotten(tmp_path: Path, clock: Clock) -> None:
    ledger = SqliteLedger(tmp_path / "ledger.db", clock)
    ledger.settle("old", Decimal("0.1"), [("tenant:acme:day", "2026-12-02")])
    clock.now += 86_400 + 3_601  # past a day, and past the next pruning
    ledger.settle("new", Decimal("0.1"), [("tenant:acme:day", "2026-12-03")])
    rids = [r for (r,) in ledger._db.execute("SELECT rid FROM settled").fetchall()]
    assert rids == ["new"]


def test_usage_shows_each_named_budget_in_its_current_period_even_unused(
    ledger: SqliteLedger, clock: Clock
) -> None:
    keys = ledger.reserve("r1", [DAY], Decimal("0.3"), 60)
    assert not isinstance(keys, Refusal)
    ledger.settle("r1", Decimal("0.1"), keys)
    rows = ledger.usage("tenant:", ["tenant:acme:day", "tenant:acme:month", "key:acme:00:day"])
    assert rows == [
        {"budget": "tenant:acme:day", "period": "2026-12-02", "spent_usd": "0.1", "held_usd": "0"},
        {"budget": "tenant:acme:month", "period": "2026-12", "spent_usd": "0", "held_usd": "0"},
    ]  # the key's is not under the prefix
    clock.now += 86_400  # the next day: yesterday's row stays, today's is shown empty
    assert [(r["period"], r["spent_usd"]) for r in ledger.usage("tenant:acme:day", ["tenant:acme:day"])] == [
        ("2026-12-02", "0.1"),
        ("2026-12-03", "0"),
    ]
    with pytest.raises(ValueError, match="ends with its period"):
        ledger.usage("", ["tenant:acme"])
