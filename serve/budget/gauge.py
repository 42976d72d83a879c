"""Each budget's used fraction, as the ledger sees it: ``ray_fleet_budget_used_ratio``.

The ratio is (spent + held) / limit of the budget's current period, set by the ledger
service after every reserve, settle and release for the budgets that call named. The
service learns a budget's limit from the lines a reservation brings (it has no other
copy of the config), so a budget shows once a call has counted toward it since the
ledger started. A reservation whose lease ran out stays in the ratio until that budget's
next call: the store drops it only when it looks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from decimal import Decimal
from typing import Protocol

from ray.util.metrics import Gauge

from serve.budget.store import Line, SqliteLedger, period
from serve.telemetry.metrics import EXPORTED

__all__ = ["UsedRatio", "used_ratio"]


class _Gauge(Protocol):
    def set(self, value: float, tags: dict[str, str]) -> None: ...


def used_ratio(spent: Decimal, held: Decimal, limit: Decimal) -> float:
    """What a budget has used of its limit; a limit of 0 is all used."""
    if limit <= 0:
        return 1.0
    return float((spent + held) / limit)  # a gauge: Prometheus's values are floats


class UsedRatio:
    """The gauge, and the lines (budget, period kind, limit) it has seen, by name."""

    def __init__(self, ledger: SqliteLedger, clock: Callable[[], float], gauge: _Gauge | None = None):
        self._ledger, self._clock = ledger, clock
        self._lines: dict[str, Line] = {}
        self._gauge = gauge or Gauge(
            "fleet_budget_used_ratio", EXPORTED["ray_fleet_budget_used_ratio"], ("budget",)
        )

    def track(self, lines: Iterable[Line]) -> None:
        """Remember these lines' limits (a limit the config changed replaces the old) and set them."""
        names = []
        for line in lines:
            self._lines[line.name] = line
            names.append(line.name)
        self.update(names)

    def refresh(self) -> None:
        """Set every budget it knows again: Ray drops a gauge not set within two export
        intervals, and a budget's series must not vanish between its calls (an alert on
        it would flap)."""
        self.update(list(self._lines))

    def update(self, names: Iterable[str]) -> None:
        """Set the ratio of each named budget it knows, for its current period."""
        now = self._clock()
        for name in dict.fromkeys(names):
            line = self._lines.get(name)
            if line is None:  # settled after a restart, before any reservation told its limit
                continue
            label, _ = period(line.kind, now)
            spent, held = self._ledger.spent(name, label), self._ledger.held(name, label)
            self._gauge.set(used_ratio(spent, held, line.limit), {"budget": name})
