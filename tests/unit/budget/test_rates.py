"""serve.budget.rates: requests and tokens per minute in a sliding window, refusals that
say exactly when to come back, and the x-ratelimit-* states of the tightest limit."""

from __future__ import annotations

import pytest

from serve.budget.rates import RateLimited, RateLine, RateState, RateWindows, duration
from tests.unit.budget.fakes import Clock

T0 = 1_764_000_000.0
TENANT = RateLine("tenant:acme", requests_per_minute=3)
KEY = RateLine("key:acme:00", requests_per_minute=5, tokens_per_minute=100)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def rates(clock: Clock) -> RateWindows:
    return RateWindows(clock)


def test_requests_are_admitted_up_to_the_limit_then_refused_until_the_oldest_ages_out(
    rates: RateWindows, clock: Clock
) -> None:
    for i in range(3):
        clock.now = T0 + 10 * i  # at 0, 10 and 20 s
        admitted = rates.admit([TENANT])
        assert admitted == (RateState("requests", 3, 2 - i, 60.0),)
    clock.now = T0 + 25
    refused = rates.admit([TENANT])
    assert isinstance(refused, RateLimited)
    assert (refused.budget, refused.kind, refused.limit) == ("tenant:acme", "requests", 3)
    assert refused.retry_after_s == 35.0  # the request at 0 s leaves the window at 60 s
    assert refused.states == (RateState("requests", 3, 0, 55.0),)
    clock.now = T0 + 59.999
    assert isinstance(rates.admit([TENANT]), RateLimited)  # a refusal is not counted
    clock.now = T0 + 60
    assert rates.admit([TENANT]) == (RateState("requests", 3, 0, 60.0),)


def test_a_request_counts_toward_every_line_or_none(rates: RateWindows) -> None:
    for _ in range(3):
        assert not isinstance(rates.admit([TENANT, KEY]), RateLimited)
    refused = rates.admit([TENANT, KEY])
    assert isinstance(refused, RateLimited) and refused.budget == "tenant:acme"
    # the key's window did not count the refused request: 3 of 5 used
    states = {s.kind: s for s in rates.admit([KEY])}  # type: ignore[union-attr]
    assert states["requests"].remaining == 1


def test_the_headers_show_the_line_with_the_least_left(rates: RateWindows) -> None:
    first = rates.admit([TENANT, KEY])
    assert first == (RateState("requests", 3, 2, 60.0), RateState("tokens", 100, 100, 0.0))


def test_tokens_are_counted_when_a_request_ends_and_admit_while_under_the_limit(
    rates: RateWindows, clock: Clock
) -> None:
    tokens_only = RateLine("key:acme:00", tokens_per_minute=100)
    assert not isinstance(rates.admit([tokens_only]), RateLimited)
    rates.count(["key:acme:00"], 60)
    clock.now = T0 + 20
    rates.count(["key:acme:00"], 50)  # 110 in the window: over
    clock.now = T0 + 30
    refused = rates.admit([tokens_only])
    assert isinstance(refused, RateLimited) and refused.kind == "tokens"
    assert refused.retry_after_s == 30.0  # at 60 s the first 60 age out: 50 < 100
    assert refused.states == (RateState("tokens", 100, 0, 50.0),)
    clock.now = T0 + 60
    assert rates.admit([tokens_only]) == (RateState("tokens", 100, 50, 20.0),)


def test_a_refusal_names_the_limit_that_keeps_the_request_out_longest(
    rates: RateWindows, clock: Clock
) -> None:
    both = RateLine("key:acme:00", requests_per_minute=1, tokens_per_minute=10)
    rates.admit([both])
    clock.now = T0 + 30
    rates.count(["key:acme:00"], 10)
    clock.now = T0 + 40
    refused = rates.admit([both])
    assert isinstance(refused, RateLimited)
    assert (refused.kind, refused.retry_after_s) == ("tokens", 50.0)  # requests would free at 20 s


def test_no_tokens_no_count_and_windows_are_per_budget(rates: RateWindows) -> None:
    rates.count(["key:acme:00"], 0)
    other = RateLine("tenant:globex", requests_per_minute=1)
    assert not isinstance(rates.admit([other]), RateLimited)
    assert not isinstance(rates.admit([TENANT]), RateLimited)
    assert isinstance(rates.admit([other]), RateLimited)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.02, "20ms"), (0.0001, "1ms"), (1.0, "1s"), (16.2, "17s"), (60, "1m0s"), (95, "1m35s")],
)
def test_a_wait_is_written_as_the_openai_api_writes_it(seconds: float, text: str) -> None:
    assert duration(seconds) == text
