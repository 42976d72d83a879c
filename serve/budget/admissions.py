"""One ingress replica's side of the rate limits: requests admitted in batches, tokens
reported in batches, so that most requests make no round trip to the ledger.

For a key whose limits allow ``requests_per_minute`` R, the replica asks the ledger to
admit up to R/60 requests at once (one second's worth, at most 100, at least 1) and
uses them within ``batch_s``; what it did not use is uncounted with its next call. So a
limit is never exceeded, and a low one (R < 120) is asked about request by request,
exactly. Tokens a request used are sent with the next call, or within ``batch_s``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from serve.budget.client import LedgerClient
from serve.budget.rates import RateLimited, RateLine, RateState
from serve.errors import BudgetUnavailable

__all__ = ["Admissions"]

log = logging.getLogger(__name__)
MOST_AT_ONCE = 100


@dataclass(slots=True)
class _Batch:
    left: int  # admitted by the ledger, not yet used
    expires: float
    states: tuple[RateState, ...]


class Admissions:
    def __init__(
        self, client: LedgerClient, batch_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._client = client
        self._batch_s = batch_s
        self._clock = clock
        self._batches: dict[tuple[RateLine, ...], _Batch] = {}
        self._tokens: dict[tuple[str, ...], int] = {}  # used, not yet reported, by their budgets
        self._flusher: asyncio.Task[None] | None = None

    async def admit(self, lines: Sequence[RateLine]) -> RateLimited | tuple[RateState, ...]:
        """Admit one request (from this replica's batch, else from the ledger) or refuse it."""
        key = tuple(lines)
        batch = self._batches.get(key)
        now = self._clock()
        if batch is not None and batch.left > 0 and batch.expires > now:
            batch.left -= 1
            return tuple(_with(state, batch.left) for state in batch.states)
        unused = batch.left if batch is not None else 0
        self._batches.pop(key, None)
        tokens = self._tokens.pop(_rated(key), 0)
        try:
            got = await self._client.admit(list(lines), _batch_size(lines), unused, tokens)
        except BudgetUnavailable:
            if tokens:
                self._tokens[_rated(key)] = self._tokens.get(_rated(key), 0) + tokens
            raise
        if isinstance(got, RateLimited):
            return got
        granted = got[0].granted if got else 1
        self._batches[key] = _Batch(granted - 1, now + self._batch_s, got)
        return tuple(_with(state, granted - 1) for state in got)

    def count(self, lines: Sequence[RateLine], tokens: int) -> None:
        """A request admitted here used ``tokens``: reported with the next call, or soon."""
        budgets = _rated(tuple(lines))
        if tokens <= 0 or not budgets:
            return
        self._tokens[budgets] = self._tokens.get(budgets, 0) + tokens
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self._batch_s)
        pending, self._tokens = self._tokens, {}
        for budgets, tokens in pending.items():
            try:
                await self._client.count(list(budgets), tokens)
            except BudgetUnavailable:  # a minute's tokens under-counted: said, nothing else lost
                log.warning("tokens not counted toward a rate limit", extra={"tokens": tokens})


def _rated(lines: tuple[RateLine, ...]) -> tuple[str, ...]:
    return tuple(line.budget for line in lines if line.tokens_per_minute is not None)


def _batch_size(lines: Sequence[RateLine]) -> int:
    rates = [line.requests_per_minute for line in lines if line.requests_per_minute is not None]
    return max(1, min(MOST_AT_ONCE, min(rates) // 60)) if rates else MOST_AT_ONCE


def _with(state: RateState, left: int) -> RateState:
    """The state as a client sees it: the batch's requests this replica has not used yet
    are still the key's to send (the ledger counted them all)."""
    if state.kind != "requests":
        return state
    return replace(state, remaining=state.remaining + left)
