"""One replica's leased slices of the cluster's budgets: reserve locally, refill from the ledger.

A model call's worst case is held against the replica's slice of each budget it counts
toward, with no round trip while the slices cover it. A slice that does not is refilled
from the ledger (:meth:`serve.budget.store.SqliteLedger.lease`: a share of the budget's
limit, at least what the call needs, at most what is left); the ledger refuses there, and
only there. What the replica spends is reported in batches (``flush_s``), which also
renews its lease; a slice unused for ``idle_s`` is given back. The ledger counts every
slice as held until then, so the cluster's total never exceeds a limit: what one
replica's slice covers, no other replica can reserve.

What a replica loses if it dies: the spend of the last ``flush_s`` not yet reported (its
slices, held meanwhile, are freed when its lease ends). What slicing costs: a budget may
refuse a call while other replicas hold unused slices of it, at most a ``fraction`` of
its limit per replica, until they give them back.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from serve.budget.client import LedgerClient, budget_lines
from serve.budget.config import BudgetLimits, BudgetsConfig
from serve.budget.store import Grant, Line, Refusal
from serve.context import Context
from serve.errors import BudgetUnavailable

__all__ = ["AgentLedger", "SliceHold", "Slices"]

log = logging.getLogger(__name__)
ZERO = Decimal(0)


@dataclass(slots=True)
class _Slice:
    budget: str  # "tenant:acme:day"
    period: str
    ends: float  # on the ledger's clock
    free: Decimal  # what may still be reserved here
    held: Decimal = ZERO  # by calls in flight
    spent: Decimal = ZERO  # spent and not yet reported
    used_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class SliceHold:
    """A call's worst case, taken from one slice of each budget it counts toward."""

    parts: tuple[tuple[_Slice, Decimal], ...]


class Slices:
    def __init__(
        self,
        client: LedgerClient,
        fraction: Decimal,
        flush_s: float = 1.0,
        idle_s: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._fraction = fraction
        self._flush_s, self._idle_s = flush_s, idle_s
        self._clock = clock
        self._holder = uuid.uuid4().hex  # this replica, to the ledger
        self._offset = 0.0  # the ledger's clock minus this one's (a test may move the ledger's)
        self._slices: dict[str, _Slice] = {}  # by budget name: the current period's
        self._retired: list[_Slice] = []  # of an earlier period, still to report
        self._flusher: asyncio.Task[None] | None = None
        # One call to the ledger at a time: a flush says what this replica holds, so no
        # lease may pass it on the way.
        self._lock = asyncio.Lock()
        # The spend of a flush not yet answered: sent again under the same id (charged once).
        self._pending: tuple[str, dict[tuple[str, str], Decimal]] | None = None

    async def reserve(
        self, lines: Sequence[Line], amount: Decimal, overdraw: Collection[str] = ()
    ) -> SliceHold:
        """Take ``amount`` from this replica's slice of every line, leasing more of those
        that cannot cover it from the ledger in one round trip; or refuse (402). ``overdraw``:
        the lines a policy let this call go over."""
        while True:
            now = self._clock() + self._offset
            short = [line for line in lines if not self._covers(line.name, amount, now)]
            if not short:
                break
            needs = [amount - max(self._free(line.name, now), ZERO) for line in short]
            async with self._lock:
                grants, ledger_now = await self._client.lease(
                    self._holder,
                    short,
                    needs,
                    self._fraction,
                    [n for n in overdraw if n in {x.name for x in short}],
                )
            self._offset = ledger_now - self._clock()
            if isinstance(grants, Refusal):
                raise self._client.refusal(grants, amount)
            for grant in grants:
                self._install(grant)
        parts = tuple((self._slices[line.name], amount) for line in lines)
        moment = time.monotonic()
        for piece, _ in parts:
            piece.free -= amount
            piece.held += amount
            piece.used_at = moment
        self._start()
        return SliceHold(parts)

    def settle(self, hold: SliceHold, cost: Decimal) -> None:
        """The call cost ``cost`` (at most what it held): reported with the next flush."""
        for piece, amount in hold.parts:
            piece.held -= amount
            piece.free += amount - cost
            piece.spent += cost

    def release(self, hold: SliceHold) -> None:
        for piece, amount in hold.parts:
            piece.held -= amount
            piece.free += amount

    async def drain(self) -> None:
        """Report everything spent and give every slice back (a replica shutting down, a test)."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        for _ in range(3):  # a flush left pending first, then what came since
            await self._flush(give_back=True)
            if self._pending is None and not any(p.spent or p.free for p in self._all()):
                return

    def _covers(self, budget: str, amount: Decimal, now: float) -> bool:
        piece = self._slices.get(budget)
        return piece is not None and piece.ends > now and piece.free >= amount

    def _free(self, budget: str, now: float) -> Decimal:
        piece = self._slices.get(budget)
        return piece.free if piece is not None and piece.ends > now else ZERO

    def _install(self, grant: Grant) -> None:
        piece = self._slices.get(grant.budget)
        if piece is not None and piece.period == grant.period:
            piece.free += grant.amount
            return
        if piece is not None:  # a new period began: the old slice is reported, then given back
            self._retired.append(piece)
        self._slices[grant.budget] = _Slice(grant.budget, grant.period, grant.ends, grant.amount)

    def _all(self) -> list[_Slice]:
        return [*self._retired, *self._slices.values()]

    def _start(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        """Every ``flush_s`` while there are slices: report spend, say what is held (which
        renews the lease), give back idle slices."""
        while self._slices or self._retired or self._pending is not None:
            await asyncio.sleep(self._flush_s)
            try:
                await self._flush(give_back=False)
            except BudgetUnavailable:
                log.warning("the budget ledger did not take a flush; it is sent again")

    async def _flush(self, give_back: bool) -> None:
        """One round trip: what was spent since the last flush, and what this replica holds
        of each slice now (the free part of slices idle for ``idle_s`` given back; all of
        it with ``give_back``)."""
        async with self._lock:
            pieces = self._all()
            if self._pending is None:
                if not pieces:
                    return
                spent: dict[tuple[str, str], Decimal] = {}
                idle_before = time.monotonic() - self._idle_s
                for piece in pieces:
                    if piece.spent:
                        spent[(piece.budget, piece.period)] = piece.spent
                        piece.spent = ZERO  # calls settling meanwhile add anew
                    if give_back or piece in self._retired or piece.used_at < idle_before:
                        piece.free = ZERO  # given back: said below as no longer held
                self._pending = (uuid.uuid4().hex, spent)
            flush_id, spent = self._pending
            held = {(p.budget, p.period): max(p.held + p.free, ZERO) for p in pieces}
            parts = [
                (b, period, spent.get((b, period), ZERO), held.get((b, period), ZERO))
                for b, period in held | spent
            ]
            ledger_now = await self._client.flush(flush_id, self._holder, parts)  # unavailable: stays pending
            self._pending = None
        self._offset = ledger_now - self._clock()
        for piece in pieces:  # a slice wholly given back, and not used since, is forgotten
            if piece.free == 0 and piece.held == 0 and piece.spent == 0:
                if piece in self._retired:
                    self._retired.remove(piece)
                elif self._slices.get(piece.budget) is piece:
                    del self._slices[piece.budget]


@dataclass(frozen=True)
class AgentLedger:
    """The ledger as one agent's loop uses it: the budgets of a request, and its replica's slices."""

    slices: Slices
    agent: str
    per_day: Decimal | None
    config: BudgetsConfig
    keys: Mapping[str, BudgetLimits]

    def lines(self, ctx: Context) -> list[Line]:
        return budget_lines(self.agent, self.per_day, self.config, self.keys, ctx)
