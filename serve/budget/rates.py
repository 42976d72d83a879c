"""Rate limits: requests and tokens per minute, per tenant and per key, for the whole cluster.

The ledger keeps, for each limited tenant or key, the times of the requests it admitted in
the last minute and the tokens their answers used (a sliding window: no burst at a minute's
edge). A request is admitted while every window it counts toward has a request left and has
used fewer tokens than its limit; its own tokens are counted when it ends (they are known
then, from the engines' counts). Refused, the client is told exactly when to come back:
when enough of the window has aged out.

In memory, as the reservations are: a restarted ledger forgets the last minute.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

__all__ = ["RateLimited", "RateLine", "RateState", "RateWindows", "duration"]

WINDOW_S = 60.0
Kind = Literal["requests", "tokens"]


@dataclass(frozen=True, slots=True)
class RateLine:
    """The limits one request counts toward: ``tenant:acme``'s, or one key's."""

    budget: str  # "tenant:acme", "key:acme:1f2e..."
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


@dataclass(frozen=True, slots=True)
class RateState:
    """One kind of limit as the ``x-ratelimit-*`` headers tell it: the tightest line's."""

    kind: Kind
    limit: int
    remaining: int
    reset_s: float  # until the window is whole again
    granted: int = 1  # requests admitted by the call (a batch, for an ingress replica)
    at: float = field(default=0.0, compare=False)  # when, on the ledger's clock


@dataclass(frozen=True, slots=True)
class RateLimited:
    """A request refused: which limit, and in how many seconds one would be admitted."""

    budget: str
    kind: Kind
    limit: int
    retry_after_s: float
    states: tuple[RateState, ...]


@dataclass(slots=True)
class _Window:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    used: int = 0  # tokens in ``tokens``

    def age(self, now: float) -> None:
        start = now - WINDOW_S
        while self.requests and self.requests[0] <= start:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= start:
            self.used -= self.tokens.popleft()[1]

    def requests_free_in(self, limit: int, now: float) -> float:
        """Seconds until fewer than ``limit`` requests are in the window."""
        over = len(self.requests) - limit
        return 0.0 if over < 0 else self.requests[over] + WINDOW_S - now

    def tokens_free_in(self, limit: int, now: float) -> float:
        """Seconds until fewer than ``limit`` tokens are in the window."""
        used = self.used
        if used < limit:
            return 0.0
        for at, tokens in self.tokens:
            used -= tokens
            if used < limit:
                return at + WINDOW_S - now
        return 0.0  # pragma: no cover -- used is the sum of the window's tokens

    def reset_s(self, kind: Kind, now: float) -> float:
        """Seconds until nothing of ``kind`` is left in the window."""
        if kind == "requests":
            newest = self.requests[-1] if self.requests else None
        else:
            newest = self.tokens[-1][0] if self.tokens else None
        return 0.0 if newest is None else newest + WINDOW_S - now


class RateWindows:
    """Every limited tenant's and key's last minute; one writer (the ledger service)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def admit(
        self, lines: Sequence[RateLine], n: int = 1, unused: int = 0, unused_at: float = 0.0
    ) -> RateLimited | tuple[RateState, ...]:
        """Count one request against every line, or refuse it (counted nowhere): the state
        of each kind of limit after it, or the limit that refused it. ``n``: admit up to
        that many at once (an ingress replica's batch; the states' ``granted`` says how
        many, ``at`` when); ``unused``: requests of the batch admitted ``unused_at`` that
        never came, uncounted first (those still in the window, and no other's)."""
        now = self._clock()
        windows = [self._window(line.budget, now) for line in lines]
        if unused:
            for window in windows:
                _uncount(window.requests, unused_at, unused)
        refusals = []
        for line, window in zip(lines, windows, strict=True):
            if line.requests_per_minute is not None:
                wait = window.requests_free_in(line.requests_per_minute, now)
                if wait > 0:
                    refusals.append(RateLimited(line.budget, "requests", line.requests_per_minute, wait, ()))
            if line.tokens_per_minute is not None:
                wait = window.tokens_free_in(line.tokens_per_minute, now)
                if wait > 0:
                    refusals.append(RateLimited(line.budget, "tokens", line.tokens_per_minute, wait, ()))
        if refusals:  # the one that keeps it out longest: before then another would refuse it
            worst = max(refusals, key=lambda r: r.retry_after_s)
            return RateLimited(
                worst.budget, worst.kind, worst.limit, worst.retry_after_s, self._states(lines, windows, now)
            )
        granted = n
        for line, window in zip(lines, windows, strict=True):
            if line.requests_per_minute is not None:
                granted = min(granted, line.requests_per_minute - len(window.requests))
        for window in windows:
            window.requests.extend([now] * granted)
        return tuple(replace(state, granted=granted, at=now) for state in self._states(lines, windows, now))

    def count(self, budgets: Iterable[str], tokens: int) -> None:
        """A request admitted earlier ended, having used ``tokens``: they count for a minute."""
        if tokens <= 0:
            return
        now = self._clock()
        for budget in budgets:
            window = self._window(budget, now)
            window.tokens.append((now, tokens))
            window.used += tokens

    def _window(self, budget: str, now: float) -> _Window:
        window = self._windows.setdefault(budget, _Window())
        window.age(now)
        return window

    @staticmethod
    def _states(lines: Sequence[RateLine], windows: Sequence[_Window], now: float) -> tuple[RateState, ...]:
        """For each kind of limit, the line with the least left (what the headers show)."""
        states: dict[Kind, RateState] = {}
        for line, window in zip(lines, windows, strict=True):
            for kind, limit, used in (
                ("requests", line.requests_per_minute, len(window.requests)),
                ("tokens", line.tokens_per_minute, window.used),
            ):
                if limit is None:
                    continue
                state = RateState(kind, limit, max(limit - used, 0), window.reset_s(kind, now))  # type: ignore[arg-type]
                held = states.get(state.kind)
                if held is None or state.remaining < held.remaining:
                    states[state.kind] = state
        return tuple(states.values())


def _uncount(requests: deque[float], at: float, count: int) -> None:
    """Take ``count`` of the requests admitted at ``at`` out of a window (a batch's unused)."""
    kept = [t for t in requests if t != at]
    ours = len(requests) - len(kept)
    if ours == 0:
        return
    mine = [at] * max(ours - count, 0)
    requests.clear()
    requests.extend(sorted([*kept, *mine]))


def duration(seconds: float) -> str:
    """A wait as the OpenAI API writes it in ``x-ratelimit-reset-*``: ``20ms``, ``17s``, ``1m0s``."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    whole = math.ceil(seconds)
    minutes, rest = divmod(whole, 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"
