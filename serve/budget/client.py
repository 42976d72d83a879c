"""An agent's and an ingress's view of the ledger (serve/budget/service.py): the budgets and
rate limits a request counts toward, and the calls that lease slices of budgets
(serve/budget/slices.py), report their spend, admit rate-limited requests in batches
(serve/budget/admissions.py) and read usage. A ledger that does not answer in time is a 503."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from serve.budget.config import BudgetLimits, BudgetsConfig
from serve.budget.rates import RateLimited, RateLine, RateState
from serve.budget.store import Grant, Line, Refusal
from serve.context import Context
from serve.errors import BudgetExceeded, BudgetUnavailable

__all__ = ["LedgerClient", "budget_lines", "rate_lines"]


def _limits(budget: str, limits: BudgetLimits | None) -> list[Line]:
    if limits is None:
        return []
    caps = (("day", limits.per_day_usd), ("month", limits.per_month_usd))
    return [Line(budget, kind, cap) for kind, cap in caps if cap is not None]  # type: ignore[arg-type]


def budget_lines(
    agent: str,
    per_day: Decimal | None,
    config: BudgetsConfig,
    keys: Mapping[str, BudgetLimits],
    ctx: Context,
) -> list[Line]:
    """Every budget a model call of ``agent`` counts toward, for the request in ``ctx``:
    the agent's per day, its tenant's and its key's per day and month. ``keys``: each
    key's caps by its principal id (``<tenant>:<16 hex>``)."""
    lines = [Line(f"agent:{agent}", "day", per_day)] if per_day is not None else []
    principal = ctx.principal
    if principal is not None and principal.authenticated:
        lines += _limits(f"tenant:{principal.tenant}", config.tenants.get(principal.tenant))
        lines += _limits(f"key:{ctx.principal_id}", keys.get(ctx.principal_id))
    return lines


def rate_lines(config: BudgetsConfig, keys: Mapping[str, BudgetLimits], ctx: Context) -> list[RateLine]:
    """The rate limits a request counts toward: its tenant's and its key's, where set."""
    principal = ctx.principal
    if principal is None or not principal.authenticated:
        return []
    lines = []
    for budget, limits in (
        (f"tenant:{principal.tenant}", config.tenants.get(principal.tenant)),
        (f"key:{ctx.principal_id}", keys.get(ctx.principal_id or "")),
    ):
        if limits is not None and limits.rated:
            lines.append(RateLine(budget, limits.requests_per_minute, limits.tokens_per_minute))
    return lines


class LedgerClient:
    def __init__(self, handle: Any, timeout_s: float) -> None:
        self._handle = handle
        self._timeout = timeout_s

    @staticmethod
    def refusal(got: Refusal, amount: Decimal) -> BudgetExceeded:
        """The 402 of a budget that cannot cover ``amount``."""
        return BudgetExceeded(
            f"the {got.budget} budget of {got.limit} USD cannot cover this call "
            f"({amount:f} USD at worst; {got.left:f} USD left until it resets)",
            param=got.budget,
            retry_after_s=got.retry_after_s,
            amount=amount,
            left=got.left,
            limit=got.limit,
        )

    async def lease(
        self,
        holder: str,
        lines: Sequence[Line],
        needs: Sequence[Decimal],
        fraction: Decimal,
        overdraw: Sequence[str] = (),
    ) -> tuple[Refusal | list[Grant], float]:
        """More of ``holder``'s slices of ``lines`` (serve/budget/slices.py), and the ledger's clock."""
        got: tuple[Refusal | list[Grant], float] = await self._call(
            "lease", holder, list(lines), list(needs), fraction, list(overdraw)
        )
        return got

    async def flush(
        self, flush_id: str, holder: str, parts: list[tuple[str, str, Decimal, Decimal]]
    ) -> float:
        """What ``holder`` spent of its slices and holds of them now; the ledger's clock."""
        now: float = await self._call("flush", flush_id, holder, parts)
        return now

    async def admit(
        self, lines: list[RateLine], n: int, unused: int, unused_at: float, tokens: int
    ) -> RateLimited | tuple[RateState, ...]:
        """Admit up to ``n`` requests at once (serve/budget/admissions.py)."""
        got: RateLimited | tuple[RateState, ...] = await self._call(
            "admit", lines, n, unused, unused_at, tokens
        )
        return got

    async def count(self, budgets: list[str], tokens: int) -> None:
        await self._call("count", budgets, tokens)

    async def usage(self, prefix: str, current: list[str]) -> list[dict[str, str]]:
        rows: list[dict[str, str]] = await self._call("usage", prefix, current)
        return rows

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            async with asyncio.timeout(self._timeout):
                return await getattr(self._handle, method).remote(*args)
        except (TimeoutError, Exception) as exc:
            raise BudgetUnavailable(f"the budget ledger did not answer ({type(exc).__name__})") from None
