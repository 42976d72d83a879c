"""What one request (or one delegate's share of it) may still spend: reserve, then settle.

A purse belongs to one agent's run of a request. Before each model call the loop holds the
call's worst case; after it, it settles to the actual cost. A delegation is handed what is
left as its allowance (split evenly when several run at once), and its reported cost is
settled in turn, so the request tree as a whole never spends more than its limit. The
limit is the least of the agent's `policies.cost.per_request_usd` and the allowance its
caller passed down (:attr:`serve.context.Context.allowance`).
"""

from __future__ import annotations

import decimal
from dataclasses import dataclass
from decimal import Decimal

from serve.errors import BudgetExceeded

__all__ = ["Hold", "Purse"]

ZERO = Decimal(0)
# Shares are rounded down: rounded to nearest, three shares of 0.05 (0.01666...67) are more than 0.05.
_SHARES = decimal.Context(rounding=decimal.ROUND_DOWN)


@dataclass(frozen=True, slots=True)
class Hold:
    """An amount set aside for one call (or one turn's delegations) until it settles."""

    amount: Decimal


@dataclass(slots=True)
class Purse:
    """A request's spending limit at one agent; ``limit`` None: no limit (still counted)."""

    limit: Decimal | None = None
    name: str = "request"  # the budget's name, as a refusal's `param` says it
    spent: Decimal = ZERO
    held: Decimal = ZERO

    @staticmethod
    def of(per_request: Decimal | None, allowance: Decimal | None, name: str) -> Purse:
        """The purse of an agent's run: its own cap, within what its caller allows."""
        limits = [x for x in (per_request, allowance) if x is not None]
        return Purse(min(limits) if limits else None, name)

    @property
    def available(self) -> Decimal | None:
        """What may still be held (None: no limit)."""
        return None if self.limit is None else self.limit - self.spent - self.held

    def share(self, ways: int) -> Decimal | None:
        """An even share of what is left, for each of ``ways`` calls made at once (None: no
        limit); rounded down, so that ``ways`` shares always fit."""
        left = self.available
        return None if left is None or ways < 1 else _SHARES.divide(max(left, ZERO), ways)

    def hold(self, amount: Decimal, overdraw: bool = False) -> Hold:
        """Set ``amount`` aside, or refuse (:class:`BudgetExceeded`) if it does not fit
        (``overdraw``: a policy let it go over)."""
        left = self.available
        if left is not None and amount > left and not overdraw:
            raise BudgetExceeded(
                f"the {self.name} budget of {self.limit} USD cannot cover this call "
                f"({_usd(amount)} USD at worst; {_usd(left)} USD left)",
                param=self.name,
                amount=amount,
                left=max(left, ZERO),
                limit=self.limit,
            )
        self.held += amount
        return Hold(amount)

    def settle(self, hold: Hold, cost: Decimal) -> None:
        """The call is over: it cost ``cost`` (at most what was held, for a model call)."""
        self.held -= hold.amount
        self.spent += cost

    def release(self, hold: Hold) -> None:
        """The call failed before it cost anything."""
        self.held -= hold.amount


def _usd(amount: Decimal) -> str:
    return f"{amount.quantize(Decimal('0.000001')).normalize():f}"
