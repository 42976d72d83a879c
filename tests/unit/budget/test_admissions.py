"""serve.budget.admissions: an ingress replica admits rate-limited requests in batches, never
over the limit; what a batch did not use is uncounted; low limits are asked one by one."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

from serve.budget.admissions import Admissions
from serve.budget.client import LedgerClient
from serve.budget.rates import RateLimited, RateLine, RateState
from tests.unit.budget.fakes import Clock, FakeHandle, service
from tests.unit.conftest import run

NOON = dt.datetime(2026, 12, 2, 12, tzinfo=dt.UTC).timestamp()


def front(tmp_path: Path) -> tuple[Admissions, FakeHandle, Clock]:
    handle = FakeHandle(service(tmp_path, Clock(NOON)))
    local = Clock(100.0)  # the replica's monotonic clock
    return Admissions(LedgerClient(handle, 2.0), batch_s=1.0, clock=local), handle, local


def test_a_high_limit_is_admitted_a_seconds_worth_at_a_time(tmp_path: Path) -> None:
    admissions, handle, _ = front(tmp_path)
    fast = [RateLine("tenant:acme", requests_per_minute=600)]  # 10 a second

    async def scenario() -> list[tuple[RateState, ...] | RateLimited]:
        return [await admissions.admit(fast) for _ in range(12)]

    got = run(scenario())
    assert handle.names() == ["admit", "admit"]  # 10, then the next 10
    assert [s[0].remaining for s in got if not isinstance(s, RateLimited)] == list(range(599, 587, -1))


def test_what_a_batch_did_not_use_is_uncounted_with_the_next_call(tmp_path: Path) -> None:
    admissions, handle, local = front(tmp_path)
    lines = [RateLine("tenant:acme", requests_per_minute=600)]

    async def scenario() -> tuple[RateState, ...] | RateLimited:
        await admissions.admit(lines)  # 10 counted, 1 used
        local.now += 2  # the batch expired with 9 unused
        return await admissions.admit(lines)

    got = run(scenario())
    assert not isinstance(got, RateLimited) and got[0].remaining == 598  # 2 used in all
    assert [args[2] for name, args in handle.calls if name == "admit"] == [0, 9]


def test_a_low_limit_is_asked_request_by_request_and_refused_exactly(tmp_path: Path) -> None:
    admissions, handle, _ = front(tmp_path)
    slow = [RateLine("tenant:acme", requests_per_minute=3)]

    async def scenario() -> list[tuple[RateState, ...] | RateLimited]:
        return [await admissions.admit(slow) for _ in range(4)]

    *admitted, refused = run(scenario())
    assert [a[0].remaining for a in admitted] == [2, 1, 0]  # type: ignore[index]
    assert isinstance(refused, RateLimited) and refused.kind == "requests"
    assert handle.names() == ["admit"] * 4


def test_tokens_go_with_the_next_call(tmp_path: Path) -> None:
    admissions, handle, _ = front(tmp_path)
    tokens = [RateLine("key:acme:00", requests_per_minute=3, tokens_per_minute=100)]

    async def scenario() -> tuple[RateState, ...] | RateLimited:
        await admissions.admit(tokens)
        admissions.count(tokens, 40)
        return await admissions.admit(tokens)

    got = run(scenario())
    assert not isinstance(got, RateLimited)
    assert {s.kind: s.remaining for s in got} == {"requests": 1, "tokens": 60}
    assert [args[4] for name, args in handle.calls if name == "admit"] == [0, 40]


def test_requests_arriving_together_share_one_ledger_call(tmp_path: Path) -> None:
    admissions, handle, _ = front(tmp_path)
    fast = [RateLine("tenant:acme", requests_per_minute=600)]

    async def scenario() -> list[tuple[RateState, ...] | RateLimited]:
        return list(await asyncio.gather(*(admissions.admit(fast) for _ in range(10))))

    got = run(scenario())
    assert all(not isinstance(g, RateLimited) for g in got)
    assert handle.names() == ["admit"]  # one batch of 10, not ten batches


def test_a_batch_uncounts_only_its_own_unused_requests(tmp_path: Path) -> None:
    handle = FakeHandle(service(tmp_path, Clock(NOON)))
    first = Admissions(LedgerClient(handle, 2.0), clock=Clock(100.0))
    second_clock = Clock(100.0)
    second = Admissions(LedgerClient(handle, 2.0), clock=second_clock)
    lines = [RateLine("tenant:acme", requests_per_minute=600)]

    async def scenario() -> None:
        await first.admit(lines)  # 10 counted at noon, 1 used
        handle.service._clock.now += 30
        for _ in range(10):  # another replica's 10, used
            await second.admit(lines)
        first._clock.now += 2  # type: ignore[attr-defined]  # first's batch expired: 9 unused
        await first.admit(lines)

    run(scenario())
    window = handle.service._rates._windows["tenant:acme"]
    assert len(window.requests) == 1 + 10 + 10  # first's 1 used, second's 10, first's new batch
    assert list(window.requests).count(NOON + 30) == 20


def test_with_a_tokens_limit_a_batch_is_what_the_tokens_left_pay_for(tmp_path: Path) -> None:
    admissions, handle, local = front(tmp_path)
    lines = [RateLine("key:acme:00", requests_per_minute=6000, tokens_per_minute=1000)]

    async def scenario() -> None:
        await admissions.admit(lines)  # the first: one, until a request's tokens are known
        admissions.count(lines, 300)
        local.now += 2
        await admissions.admit(lines)  # 1000 left then, 300 a request: three at once

    run(scenario())
    assert [args[1] for name, args in handle.calls if name == "admit"] == [1, 3]
