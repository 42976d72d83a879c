"""serve.budget.purse: what one agent's run of a request may still spend; a call's worst case
is held before it runs and settled to what it cost (or released) after."""

from __future__ import annotations

import random
from decimal import Decimal

import pytest

from serve.budget import Hold, Purse
from serve.errors import BudgetExceeded

ZERO = Decimal(0)


def test_a_purse_is_limited_by_the_least_of_the_agents_cap_and_its_callers_allowance() -> None:
    cap, allowance = Decimal("0.05"), Decimal("0.02")
    assert Purse.of(cap, allowance, "request:clerk").limit == allowance
    assert Purse.of(allowance, cap, "request:clerk").limit == allowance
    assert Purse.of(cap, None, "request:clerk").limit == cap
    assert Purse.of(None, allowance, "request:boss").limit == allowance
    assert Purse.of(Decimal(0), allowance, "request:clerk").limit == 0  # a cap of 0 is a limit, not none
    unlimited = Purse.of(None, None, "request:clerk")
    assert unlimited.limit is None and unlimited.available is None
    assert unlimited.name == "request:clerk" and unlimited.spent == unlimited.held == 0


def test_a_hold_that_does_not_fit_is_refused_naming_the_budget() -> None:
    purse = Purse(Decimal("0.001"), "request:clerk")
    purse.settle(purse.hold(Decimal("0.0004")), Decimal("0.0004"))
    purse.hold(Decimal("0.0005"))
    with pytest.raises(BudgetExceeded) as refused:
        purse.hold(Decimal("0.00010001"))
    error = refused.value
    assert (error.status, error.type, error.code) == (402, "insufficient_quota", "budget_exceeded")
    assert error.param == "request:clerk"
    assert error.message == (
        "the request:clerk budget of 0.001 USD cannot cover this call (0.0001 USD at worst; 0.0001 USD left)"
    )
    assert (purse.spent, purse.held, purse.available) == (
        Decimal("0.0004"),
        Decimal("0.0005"),
        Decimal("0.0001"),
    )


def test_a_hold_of_exactly_what_is_left_fits_and_then_nothing_more_does() -> None:
    purse = Purse(Decimal("0.0003"), "request:clerk")
    purse.hold(Decimal("0.0003"))
    assert purse.available == 0
    purse.hold(Decimal(0))  # a call that costs nothing (no price) still fits
    with pytest.raises(BudgetExceeded) as refused:
        purse.hold(Decimal("0.000001"))
    assert refused.value.message.endswith("(0.000001 USD at worst; 0 USD left)")


def test_without_a_limit_every_hold_fits_and_spending_is_still_counted() -> None:
    purse = Purse(name="request:clerk")
    purse.settle(purse.hold(Decimal(10**9)), Decimal("12.5"))
    purse.release(purse.hold(Decimal(3)))
    assert (purse.spent, purse.held, purse.available) == (Decimal("12.5"), ZERO, None)


def test_settling_moves_the_hold_to_what_was_spent_and_releasing_gives_it_back() -> None:
    purse = Purse(Decimal("0.01"), "request:clerk")
    first, second = purse.hold(Decimal("0.004")), purse.hold(Decimal("0.003"))
    assert (purse.spent, purse.held, purse.available) == (ZERO, Decimal("0.007"), Decimal("0.003"))
    purse.settle(first, Decimal("0.0015"))  # it cost less than its worst case: the rest is free again
    assert (purse.spent, purse.held, purse.available) == (
        Decimal("0.0015"),
        Decimal("0.003"),
        Decimal("0.0055"),
    )
    purse.release(second)  # it failed before it cost anything
    assert (purse.spent, purse.held, purse.available) == (Decimal("0.0015"), ZERO, Decimal("0.0085"))


def test_a_purse_is_never_overspent_across_holds_settles_and_releases() -> None:
    rng = random.Random(82150962)
    limit = Decimal("0.02")
    purse = Purse(limit, "request:clerk")
    open_holds: list[Hold] = []
    settled, refused = Decimal(0), 0
    for _ in range(2000):
        if open_holds and rng.random() < 0.5:
            hold = open_holds.pop(rng.randrange(len(open_holds)))
            if rng.random() < 0.2:
                purse.release(hold)
            else:
                cost = hold.amount * Decimal(rng.randint(0, 100)) / 100  # a call costs at most its hold
                purse.settle(hold, cost)
                settled += cost
        else:
            amount = Decimal(rng.randint(1, 4000)) / Decimal(10**6)
            try:
                open_holds.append(purse.hold(amount))
            except BudgetExceeded:
                refused += 1
                assert amount > limit - purse.spent - purse.held  # refused only what did not fit
        assert purse.spent + purse.held <= limit
        assert purse.held == sum((h.amount for h in open_holds), Decimal(0))
        assert purse.spent == settled
    assert refused > 0 and settled > limit / 2  # the sequence did reach the limit


@pytest.mark.parametrize("ways", [1, 2, 3, 6, 7])
@pytest.mark.parametrize("left", ["0.05", "0.07", "0.009994291", "0.0002187", "0"])
def test_shares_of_what_is_left_are_even_and_together_always_fit(left: str, ways: int) -> None:
    purse = Purse(Decimal(left), "request:clerk")
    share = purse.share(ways)
    assert share is not None and share >= 0
    assert share * ways <= Decimal(left)  # rounded to nearest, 0.05 / 3 * 3 is more than 0.05
    assert Decimal(left) - share * ways < Decimal("1e-20")  # and nothing worth a cent is left out
    purse.hold(share * ways)


def test_without_a_limit_there_is_no_share_to_hand_out() -> None:
    assert Purse(name="request:clerk").share(2) is None
