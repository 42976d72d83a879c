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
        self._asking: dict[tuple[RateLine, ...], asyncio.Future[None]] = {}  # one ledger call per key
        self._tokens: dict[tuple[str, ...], int] = {}  # used, not yet reported, by their budgets
        self._per_request: dict[tuple[str, ...], float] = {}  # tokens a request uses, on average
        self._flusher: asyncio.Task[None] | None = None

    async def admit(self, lines: Sequence[RateLine]) -> RateLimited | tuple[RateState, ...]:
        """Admit one request (from this replica's batch, else from the ledger) or refuse it."""
        key = tuple(lines)
        while True:
            batch = self._batches.get(key)
            if batch is not None and batch.left > 0 and batch.expires > self._clock():
                batch.left -= 1
                return tuple(_with(state, batch.left) for state in batch.states)
            asking = self._asking.get(key)
            if asking is None:
                break
            await asyncio.shield(asking)  # another request of this key is asking: share its batch
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._asking[key] = done
        try:
            return await self._ask(key, self._batches.pop(key, None))
        finally:
            del self._asking[key]
            done.set_result(None)

    async def _ask(
        self, key: tuple[RateLine, ...], spent: _Batch | None
    ) -> RateLimited | tuple[RateState, ...]:
        unused, at = (spent.left, spent.states[0].at) if spent is not None and spent.states else (0, 0.0)
        rated = _rated(key)
        tokens = self._tokens.pop(rated, 0)
        try:
            got = await self._client.admit(list(key), self._size(key, spent), unused, at, tokens)
        except BudgetUnavailable:
            if tokens:
                self._tokens[rated] = self._tokens.get(rated, 0) + tokens
            raise
        if isinstance(got, RateLimited):
            return got
        granted = got[0].granted if got else 1
        self._batches[key] = _Batch(granted - 1, self._clock() + self._batch_s, got)
        return tuple(_with(state, granted - 1) for state in got)

    def _size(self, key: tuple[RateLine, ...], last: _Batch | None) -> int:
        """How many to ask for: a second's worth of the tightest requests-per-minute, and
        no more than the tokens left pay for at this replica's average request (one, until
        that is known)."""
        rates = [line.requests_per_minute for line in key if line.requests_per_minute is not None]
        size = max(1, min(MOST_AT_ONCE, min(rates) // 60)) if rates else MOST_AT_ONCE
        if _rated(key):
            average = self._per_request.get(_rated(key))
            tokens = [s.remaining for s in last.states if s.kind == "tokens"] if last is not None else []
            if average is None or not tokens:
                return 1
            size = max(1, min(size, int(min(tokens) // max(average, 1.0))))
        return size

    def count(self, lines: Sequence[RateLine], tokens: int) -> None:
        """A request admitted here used ``tokens``: reported with the next call, or soon."""
        budgets = _rated(tuple(lines))
        if tokens <= 0 or not budgets:
            return
        self._tokens[budgets] = self._tokens.get(budgets, 0) + tokens
        average = self._per_request.get(budgets)
        self._per_request[budgets] = tokens if average is None else 0.9 * average + 0.1 * tokens
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        while self._tokens:  # counted while this sent: sent on the next round
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
