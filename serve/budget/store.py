"""The ledger's store: settled spend per budget and period (SQLite), and the reservations
held against it (in memory: a restarted ledger has none, so none can be left behind).

Periods are UTC calendar days and months, named by their dates (``2026-12-02``,
``2026-12``): a new period starts at its boundary exactly, with nothing to reset.
"""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Literal

__all__ = ["Grant", "Line", "Refusal", "Reservation", "SqliteLedger", "period"]

Period = Literal["day", "month"]
ZERO = Decimal(0)
_SETTLED_KEPT_S = 86_400.0
# A refusal only others' holds caused: try again in this long (a slice idle 5 s goes back).
HOLDS_CLEAR_S = 5


def period(kind: Period, now: float) -> tuple[str, float]:
    """The period ``now`` (epoch seconds) falls in: its name, and when it ends."""
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    if kind == "day":
        start, label = today, today.isoformat()
        end = start + dt.timedelta(days=1)
    else:
        start, label = today.replace(day=1), today.strftime("%Y-%m")
        end = (start + dt.timedelta(days=32)).replace(day=1)
    ends = dt.datetime(end.year, end.month, end.day, tzinfo=dt.UTC).timestamp()
    return label, ends


@dataclass(frozen=True, slots=True)
class Line:
    """One budget a call counts toward: ``tenant:acme:day`` with its cap."""

    budget: str  # e.g. "tenant:acme", "key:acme:1f2e...", "agent:hr-policy-advisor"
    kind: Period
    limit: Decimal

    @property
    def name(self) -> str:
        return f"{self.budget}:{self.kind}"


@dataclass(frozen=True, slots=True)
class Refusal:
    """The budget that could not cover a reservation, and when it resets."""

    budget: str
    limit: Decimal
    left: Decimal
    retry_after_s: int


@dataclass(frozen=True, slots=True)
class Grant:
    """A slice of one budget's period leased to a replica (:meth:`SqliteLedger.lease`)."""

    budget: str  # the line's name, "tenant:acme:day"
    period: str
    ends: float  # when the period ends, on the ledger's clock
    amount: Decimal


@dataclass(slots=True)
class Reservation:
    amount: Decimal
    keys: tuple[tuple[str, str], ...]  # (budget name, period) of each line it counts toward
    expires: float


class SqliteLedger:
    """Spend and reservations; one writer (the ledger service), so no locking beyond SQLite's."""

    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS spend (budget TEXT, period TEXT, spent TEXT NOT NULL, "
            "PRIMARY KEY (budget, period))"
        )
        # Reservations settled, so that a settlement sent again (its answer was lost) is not
        # charged twice; kept a day (a settlement is retried for minutes at most).
        self._db.execute("CREATE TABLE IF NOT EXISTS settled (rid TEXT PRIMARY KEY, at REAL NOT NULL)")
        self._clock = clock
        self._held: dict[str, Reservation] = {}
        self._pruned = 0.0

    def spent(self, budget: str, label: str) -> Decimal:
        row = self._db.execute(
            "SELECT spent FROM spend WHERE budget = ? AND period = ?", (budget, label)
        ).fetchone()
        return Decimal(row[0]) if row else ZERO

    def held(self, budget: str, label: str) -> Decimal:
        return sum((r.amount for r in self._held.values() if (budget, label) in r.keys), ZERO)

    def reserve(
        self, rid: str, lines: Sequence[Line], amount: Decimal, lease_s: float, overdraw: bool = False
    ) -> Refusal | tuple[tuple[str, str], ...]:
        """Hold ``amount`` against every line, or none of them: the (budget, period) pairs it
        counts toward, or the first line that cannot cover it (``overdraw``: held however
        little is left, as a policy allowed)."""
        now = self._clock()
        self._expire(now)
        keys = []
        for line in lines:
            label, ends, left = self._room(line, now)
            if amount > left and not overdraw:
                return self._refusal(line, label, amount, left, ends, now)
            keys.append((line.name, label))
        self._held[rid] = Reservation(amount, tuple(keys), now + lease_s)
        return tuple(keys)

    def reserve_keys(self, rid: str) -> tuple[tuple[str, str], ...]:
        """The (budget, period) pairs a live reservation counts toward."""
        reservation = self._held.get(rid)
        return reservation.keys if reservation else ()

    def settle(self, rid: str, cost: Decimal, keys: Sequence[tuple[str, str]]) -> None:
        """The call cost ``cost``: charged to the periods it was reserved in (``keys``, which
        the holder keeps: a reservation that expired, or a ledger restarted since, is charged
        all the same, since the engine did the work). Once per reservation: the same
        settlement sent again changes nothing."""
        self._held.pop(rid, None)
        if cost <= 0:
            return
        now = self._clock()
        with self._db:  # autocommit otherwise: every line's charge lands, or none does
            self._db.execute("BEGIN")
            if self._db.execute("INSERT OR IGNORE INTO settled VALUES (?, ?)", (rid, now)).rowcount == 0:
                return  # settled before
            for budget, label in keys:
                self._charge(budget, label, cost)
            self._prune(now)

    def release(self, rid: str) -> None:
        self._held.pop(rid, None)

    def lease(
        self,
        holder: str,
        lines: Sequence[Line],
        needs: Sequence[Decimal],
        fraction: Decimal,
        lease_s: float,
        overdraw: Collection[str] = (),
    ) -> Refusal | list[Grant]:
        """Lease ``holder`` (a replica) more of its slice of each line's current period, all
        or none: ``fraction`` of the line's limit, at least its ``need`` (what the call needs
        beyond what the holder has free), at most what is left; or the first line that has
        less than its need left (a line named in ``overdraw``, which a policy let go over:
        its need, however little is left). A slice counts as held as its holder last said
        (:meth:`flush`), or until its lease ends."""
        now = self._clock()
        self._expire(now)
        grants = []
        for line, need in zip(lines, needs, strict=True):
            label, ends, left = self._room(line, now)
            over = line.name in overdraw
            if need > left and not over:
                return self._refusal(line, label, need, left, ends, now)
            amount = need if over else min(max(need, line.limit * fraction), left)
            grants.append(Grant(line.name, label, ends, amount))
        for grant in grants:
            rid = _slice_id(holder, grant.budget, grant.period)
            held = self._held.get(rid)
            if held is None:
                self._held[rid] = Reservation(grant.amount, ((grant.budget, grant.period),), now + lease_s)
            else:
                held.amount += grant.amount
        self._renew(holder, now + lease_s)
        return grants

    def flush(
        self, flush_id: str, holder: str, parts: Sequence[tuple[str, str, Decimal, Decimal]], lease_s: float
    ) -> None:
        """``holder`` (a replica) says, for every slice it has, (budget, period, what it spent
        since its last flush, what it holds now): the spend is charged, once per
        ``flush_id`` (the same flush sent again, its answer lost, is charged nothing more),
        and the holder's slices are what it says, no more: a lease whose answer it never
        got, or slices a restarted ledger forgot, are put right. Its lease is renewed."""
        now = self._clock()
        with self._db:
            self._db.execute("BEGIN")
            fresh = self._db.execute("INSERT OR IGNORE INTO settled VALUES (?, ?)", (flush_id, now)).rowcount
            if fresh:
                for budget, label, spent, _ in parts:
                    if spent > 0:
                        self._charge(budget, label, spent)
                self._prune(now)
        if not fresh:
            return  # an old flush sent again: what it said it held is out of date
        prefix = holder + "|"
        for rid in [rid for rid in self._held if rid.startswith(prefix)]:
            del self._held[rid]
        for budget, label, _, holding in parts:
            if holding > 0:
                key = ((budget, label),)
                self._held[_slice_id(holder, budget, label)] = Reservation(holding, key, now + lease_s)

    def _room(self, line: Line, now: float) -> tuple[str, float, Decimal]:
        """The period ``now`` is in for ``line``: its name, its end, and what it has left."""
        label, ends = period(line.kind, now)
        return label, ends, line.limit - self.spent(line.name, label) - self.held(line.name, label)

    def _refusal(
        self, line: Line, label: str, amount: Decimal, left: Decimal, ends: float, now: float
    ) -> Refusal:
        """``line`` cannot cover ``amount``: what it has left, and when to try again: when
        the period resets, or, if only what others hold is in the way (calls in flight,
        replicas' slices, given back within seconds), in ``HOLDS_CLEAR_S``."""
        wait = math.ceil(ends - now)
        if line.limit - self.spent(line.name, label) >= amount:
            wait = min(wait, HOLDS_CLEAR_S)
        return Refusal(line.name, line.limit, max(left, ZERO), max(wait, 1))

    def _renew(self, holder: str, expires: float) -> None:
        prefix = holder + "|"
        for rid, held in self._held.items():
            if rid.startswith(prefix):
                held.expires = expires

    def _charge(self, budget: str, label: str, cost: Decimal) -> None:
        self._db.execute(
            "INSERT INTO spend (budget, period, spent) VALUES (?, ?, ?) "
            "ON CONFLICT (budget, period) DO UPDATE SET spent = ?",
            (budget, label, f"{cost:f}", f"{self.spent(budget, label) + cost:f}"),
        )

    def _prune(self, now: float) -> None:
        if now >= self._pruned + _SETTLED_KEPT_S / 24:
            self._db.execute("DELETE FROM settled WHERE at < ?", (now - _SETTLED_KEPT_S,))
            self._pruned = now

    def usage(self, prefix: str = "", current: Sequence[str] = ()) -> list[dict[str, str]]:
        """Settled spend and held amounts per budget and period, of budgets under ``prefix``
        (one that only holds so far included), and of each budget named in ``current``
        (``tenant:acme:day``) in the period it is in now, if nothing was charged to it yet."""
        now = self._clock()
        self._expire(now)
        rows = self._db.execute(
            "SELECT budget, period, spent FROM spend WHERE substr(budget, 1, ?) = ?", (len(prefix), prefix)
        ).fetchall()
        spent = {(b, p): Decimal(s) for b, p, s in rows}
        held = {key for r in self._held.values() for key in r.keys if key[0].startswith(prefix)}
        held |= {(name, period(_kind(name), now)[0]) for name in current if name.startswith(prefix)}
        return [
            {
                "budget": b,
                "period": p,
                "spent_usd": f"{spent.get((b, p), ZERO):f}",
                "held_usd": f"{self.held(b, p):f}",
            }
            for b, p in sorted(spent.keys() | held)
        ]

    def _expire(self, now: float) -> None:
        for rid in [rid for rid, r in self._held.items() if r.expires <= now]:
            del self._held[rid]

    def close(self) -> None:
        self._db.close()


def _kind(name: str) -> Period:
    kind = name.rsplit(":", 1)[-1]
    if kind not in ("day", "month"):
        raise ValueError(f"a budget's name ends with its period, day or month: {name!r}")
    return kind  # type: ignore[return-value]


def _slice_id(holder: str, budget: str, label: str) -> str:
    return f"{holder}|{budget}|{label}"
