"""The ``budget`` deployment: the cluster's one ledger, one replica, reached by every agent.

Every model call of every replica reserves against the same counters here, and settles
after; settled spend is in SQLite and survives a restart of the ledger or the
application. Reservations live in memory with a lease: one whose holder died is gone
once its lease ends (or at once, if the ledger restarts), so a lost replica cannot leave
refusals behind.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path

from serve.budget.gauge import UsedRatio
from serve.budget.rates import RateLimited, RateLine, RateState, RateWindows
from serve.budget.store import Grant, Line, Refusal, SqliteLedger
from serve.errors import InvalidRequest
from serve.telemetry import logs

__all__ = ["BudgetService"]

log = logging.getLogger("fleet.budget")
PUBLISH_EVERY_S = 1.0  # within two of Ray's metric export intervals (1 s in the tests, 10 s by default)


class BudgetService:
    def __init__(
        self, path: str, lease_s: float, test_clock: bool = False, clock: Callable[[], float] = time.time
    ):
        logs.route_to_serve()
        self._offset = 0.0
        self._test_clock = test_clock
        self._clock = clock
        self._ledger = SqliteLedger(Path(path), self._now)
        self._lease_s = lease_s
        self._used = UsedRatio(self._ledger, self._now)  # ray_fleet_budget_used_ratio
        self._rates = RateWindows(self._now)
        self._publisher: asyncio.Task[None] | None = None

    async def reserve(
        self, rid: str, lines: Sequence[Line], amount: Decimal, overdraw: bool = False
    ) -> Refusal | tuple[tuple[str, str], ...]:
        got = self._ledger.reserve(rid, lines, amount, self._lease_s, overdraw)
        self._used.track(lines)
        self._publish()
        return got

    async def settle(self, rid: str, cost: Decimal, keys: Sequence[tuple[str, str]]) -> None:
        self._ledger.settle(rid, cost, keys)
        self._used.update(budget for budget, _ in keys)

    async def release(self, rid: str) -> None:
        keys = self._ledger.reserve_keys(rid)
        self._ledger.release(rid)
        self._used.update(budget for budget, _ in keys)

    async def lease(
        self,
        holder: str,
        lines: Sequence[Line],
        needs: Sequence[Decimal],
        fraction: Decimal,
        overdraw: Sequence[str] = (),
    ) -> tuple[Refusal | list[Grant], float]:
        """More of ``holder``'s slice of each line, or the refusal; and the ledger's clock."""
        got = self._ledger.lease(holder, lines, needs, fraction, self._lease_s, overdraw)
        self._used.track(lines)
        self._publish()
        return got, self._now()

    async def flush(
        self, flush_id: str, holder: str, parts: Sequence[tuple[str, str, Decimal, Decimal]]
    ) -> float:
        """What ``holder`` spent of its slices, and what it holds of them now; its lease renewed."""
        self._ledger.flush(flush_id, holder, parts, self._lease_s)
        self._used.update(budget for budget, _, _, _ in parts)
        return self._now()

    async def admit(
        self, lines: Sequence[RateLine], n: int = 1, unused: int = 0, unused_at: float = 0.0, tokens: int = 0
    ) -> RateLimited | tuple[RateState, ...]:
        """Count up to ``n`` requests against their rate limits, or refuse (serve/budget/rates.py);
        first uncount ``unused`` of the batch admitted at ``unused_at``, and count ``tokens``
        used since."""
        self._rates.count([line.budget for line in lines if line.tokens_per_minute is not None], tokens)
        return self._rates.admit(lines, n, unused, unused_at)

    async def count(self, budgets: Sequence[str], tokens: int) -> None:
        """The tokens admitted requests used, for their tokens-per-minute limits."""
        self._rates.count(budgets, tokens)

    async def usage(self, prefix: str = "", current: Sequence[str] = ()) -> list[dict[str, str]]:
        return self._ledger.usage(prefix, current)

    async def advance(self, seconds: float) -> float:
        """Move the ledger's clock (``budgets.test_clock`` only): a test's period boundary."""
        if not self._test_clock:
            raise InvalidRequest("the ledger's clock moves only with budgets.test_clock: true")
        self._offset += seconds
        return self._now()

    async def check_health(self) -> None:
        self._publish()

    def _publish(self) -> None:
        """Once a budget is known: its used ratio set each second (:meth:`UsedRatio.refresh`)."""
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.get_running_loop().create_task(self._publishing())

    async def _publishing(self) -> None:
        while True:
            try:
                self._used.refresh()
            except Exception as exc:  # the next second tries again
                log.error("budget gauge update failed", exc_info=exc)
            await asyncio.sleep(PUBLISH_EVERY_S)

    def _now(self) -> float:
        return self._clock() + self._offset
