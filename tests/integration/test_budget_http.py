"""Cost and the per-request budget over HTTP on a real Ray (fleet-test.yaml prices its
scripted backend at 2 / 8 USD per million prompt / completion tokens; ``frugal`` may
spend 0.01 USD a request)."""

from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import httpx
import pytest

from serve.budget import Price
from serve.testing import wait_until
from tests.integration.conftest import HASTY_KEY, HOLDER_KEY, QA_KEY, SPENDER_ADMIN_KEY, SPENDER_KEY, Fleet

PRICE = Price(prompt_usd_per_million=Decimal("2.00"), completion_usd_per_million=Decimal("8.00"))
LONG = "word " * 1200  # 6 KB: its prompt's bound alone costs more than frugal's 0.01 USD


def post(fleet: Fleet, agent: str, text: str, **extra: Any) -> httpx.Response:
    body = {"model": agent, "messages": [{"role": "user", "content": text}], **extra}
    with fleet.client(fleet.test_url, QA_KEY) as client:
        return client.post("/v1/chat/completions", json=body)


def test_a_request_costs_what_every_model_call_of_its_tree_cost(fleet: Fleet) -> None:
    r = post(fleet, "tester", "#delegate now")
    assert r.status_code == 200, r.text
    cost = Decimal(r.json()["fleet"]["cost_usd"])
    with fleet.client(fleet.test_url, QA_KEY) as client:
        report = client.get(f"/v1/requests/{r.headers['x-fleet-request-id']}/explain").json()
    calls = report["model_calls"]
    assert [c["agent"] for c in calls] == ["tester", "helper", "tester"]  # the delegate's call counts
    expected = sum((PRICE.cost(c["prompt_tokens"], c["completion_tokens"]) for c in calls), Decimal(0))
    assert cost == expected == Decimal(report["usage"]["cost_usd"]) > 0
    assert all(
        Decimal(c["cost_usd"]) == PRICE.cost(c["prompt_tokens"], c["completion_tokens"]) for c in calls
    )


def test_a_call_the_budget_cannot_cover_is_a_402_before_the_model_is_called(fleet: Fleet) -> None:
    r = post(fleet, "frugal", LONG)
    assert r.status_code == 402, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "insufficient_quota",
        "budget_exceeded",
        "request:frugal",
    )
    assert "0.01 USD" in error["message"]
    assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers  # it will not fit later
    request_id = r.headers["x-fleet-request-id"]
    with fleet.client(fleet.test_url, QA_KEY) as client:
        report = client.get(f"/v1/requests/{request_id}/explain").json()
    assert report["model_calls"] == [] and report["outcome"]["status"] == 402
    # A stream is refused the same way: nothing was sent yet, so it is the status.
    streamed = post(fleet, "frugal", LONG, stream=True)
    assert streamed.status_code == 402 and json.loads(streamed.text)["error"]["code"] == "budget_exceeded"
    # What fits still passes.
    assert post(fleet, "frugal", "ping").status_code == 200


def test_a_max_tokens_the_budget_could_never_pay_is_a_400_naming_it(fleet: Fleet) -> None:
    r = post(fleet, "frugal", "ping", max_tokens=5000)  # 5000 x 8 USD/M = 0.04 USD > 0.01
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "max_tokens"


# --- the cluster's ledger: a tenant's budget per day (fleet-test.yaml: spender, 0.008 USD) ---

# A keeper call's worst case is 0.00702 (its prompt's bound): one hold at a time fits.
SPENDER_DAY = Decimal("0.008")


def _spend(fleet: Fleet, key: str = SPENDER_KEY) -> httpx.Response:
    body = {"model": "keeper", "messages": [{"role": "user", "content": "#spend"}], "max_tokens": 16}
    with fleet.client(fleet.test_url, key) as client:
        return client.post("/v1/chat/completions", json=body)


def _usage(fleet: Fleet, key: str) -> list[dict[str, Any]]:
    with fleet.client(fleet.test_url, key) as client:
        r = client.get("/v1/usage")
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


def _settled_day(fleet: Fleet) -> dict[str, Any]:
    """The spender's day once every settlement has landed (they go in the background)."""

    def settled() -> dict[str, Any]:
        [day] = [u for u in _usage(fleet, SPENDER_KEY) if u["budget"] == "tenant:spender:day"]
        assert day["held_usd"] == "0", day
        return day

    return wait_until(settled, timeout_s=30)  # slices are given back once idle (5 s)


def test_a_tenants_day_is_never_overspent_across_replicas_and_resets_at_midnight(fleet: Fleet) -> None:
    from ray import serve as rayserve

    if fleet.ray_address is None:
        pytest.skip("needs the test run's own cluster (its driver moves the ledger's clock)")
    # 100 at once, through two ingress replicas at keeper's two: each reserves in one ledger.
    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(lambda _: _spend(fleet), range(100)))
    statuses = Counter(a.status_code for a in answers)
    assert set(statuses) <= {200, 402, 503}, statuses  # 503: keeper's queues were full (admission control)
    assert statuses[200] >= 1 and statuses[402] >= 1, statuses  # the day fit some, not all at once
    assert all("retry-after" in a.headers for a in answers if a.status_code == 503)
    for refused in (a for a in answers if a.status_code == 402):
        error = refused.json()["error"]
        assert (error["code"], error["param"]) == ("budget_exceeded", "tenant:spender:day")
        assert refused.headers["x-should-retry"] == "false"
        assert 0 < int(refused.headers["retry-after"]) <= 86_400  # the next UTC midnight (5 s: holds alone)
    reported = sum(
        (Decimal(a.json()["fleet"]["cost_usd"]) for a in answers if a.status_code == 200), Decimal(0)
    )
    day = _settled_day(fleet)
    assert Decimal(day["spent_usd"]) == reported > 0  # no drift: the ledger holds what the answers cost
    assert Decimal(day["spent_usd"]) <= SPENDER_DAY  # never overspent
    assert day["limit_usd"] == "0.008"
    # Asked one after another, the day runs out: a refusal comes, and the cap still holds.
    for _ in range(200):  # about 45 at 0.000022 each
        last = _spend(fleet)
        if last.status_code == 402:
            break
    assert last.status_code == 402, last.text
    assert Decimal(_settled_day(fleet)["spent_usd"]) <= SPENDER_DAY
    # The budget policy lets the tenant's admin overdraw its day (tests/integration/policies),
    # and says so in the audit log.
    # (A replica may still have room in its slice of the day: the policy is asked once none has.)
    with fleet.client(fleet.test_url, SPENDER_KEY) as client:

        def budget_decisions(answer: httpx.Response) -> list[str]:
            report = client.get(f"/v1/requests/{answer.headers['x-fleet-request-id']}/explain").json()
            return [d["outcome"] for d in report["decisions"] if d["action"] == "budget:tenant:spender:day"]

        assert budget_decisions(last) == ["deny"]
        for _ in range(10):
            overdrawn = _spend(fleet, SPENDER_ADMIN_KEY)
            assert overdrawn.status_code == 200, overdrawn.text
            if budget_decisions(overdrawn):
                break
        assert budget_decisions(overdrawn) == ["allow"]
    # Another tenant sees none of it.
    assert all(not u["budget"].startswith("tenant:spender") for u in _usage(fleet, QA_KEY))
    # The next UTC day: the tenant may spend again.
    _to_next_day(rayserve.get_deployment_handle("budget", app_name="fleet-test"))
    assert _spend(fleet).status_code == 200


def _to_next_day(ledger: Any) -> None:
    """Move the ledger's clock to just past the next UTC midnight (its own clock: a test may
    have moved it before). A refusal's Retry-After is not used: one that only holds in
    flight caused (a replica's slice) says a few seconds, not the period's end."""
    import datetime as dt

    now = ledger.advance.remote(0).result()
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    midnight = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), dt.UTC).timestamp()
    ledger.advance.remote(midnight - now + 1).result()


def test_without_keys_the_one_user_sees_every_budget(fleet: Fleet) -> None:
    """The example fleet (configs/scripted.yaml) has no keys: its agents' days are shown."""
    body = {
        "model": "hr-policy-advisor",
        "messages": [{"role": "user", "content": "Leave balance of E1001?"}],
    }
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200

        def charged() -> dict[str, Any]:  # settlements go in the background
            rows = client.get("/v1/usage").json()["data"]
            [day] = [r for r in rows if r["budget"] == "agent:hr-policy-advisor:day"]
            assert Decimal(day["spent_usd"]) > 0, day
            return dict(day)

        day = wait_until(charged)
    assert day["limit_usd"] == "25"  # its manifest's per_day_usd
    assert Decimal(day["remaining_usd"]) == Decimal("25") - Decimal(day["spent_usd"]) - Decimal(
        day["held_usd"]
    )


# --- rate limits: hasty may send 3 requests a minute (fleet-test.yaml) -----------------


def test_a_burst_over_a_tenants_requests_per_minute_is_refused_then_passes_after_retry_after(
    fleet: Fleet,
) -> None:
    from ray import serve as rayserve

    if fleet.ray_address is None:
        pytest.skip("needs the test run's own cluster (its driver moves the ledger's clock)")
    body = {"model": "tester", "messages": [{"role": "user", "content": "hello"}]}

    def ask(_: int) -> httpx.Response:
        with fleet.client(fleet.test_url, HASTY_KEY) as client:
            return client.post("/v1/chat/completions", json=body)

    # 8 at once, through both ingress replicas: the one ledger admits exactly 3.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(8)))
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {200: 3, 429: 5}, statuses
    for answer in answers:
        assert answer.headers["x-ratelimit-limit-requests"] == "3"
    waits = []
    for refused in (a for a in answers if a.status_code == 429):
        error = refused.json()["error"]
        assert (error["type"], error["code"], error["param"]) == (
            "requests",
            "rate_limit_exceeded",
            "tenant:hasty:rpm",
        )
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        waits.append(int(refused.headers["retry-after"]))
    assert all(0 < w <= 60 for w in waits), waits
    # After the longest wait it said (the ledger's clock moved, not the test's), one passes.
    rayserve.get_deployment_handle("budget", app_name="fleet-test").advance.remote(max(waits)).result()
    again = ask(0)
    assert again.status_code == 200, again.text
    assert again.headers["x-ratelimit-remaining-requests"] in {"0", "1", "2"}


# --- a lost holder, a lost ledger ---------------------------------------------------------

APP = "fleet-test"


def _replicas(deployment: str) -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"  # a replica actor's name
    return [
        a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)
    ]


def _kill(names: list[str]) -> None:
    import ray

    for name in names:
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def _healthy(deployment: str, replicas: int, gone: list[str]) -> bool:
    from ray import serve as rayserve

    state = rayserve.status().applications[APP].deployments[deployment]
    running = sum(n for s, n in state.replica_states.items() if s == "RUNNING")
    names = _replicas(deployment)
    return state.status == "HEALTHY" and running == replicas == len(names) and not set(gone) & set(names)


def _day(fleet: Fleet, key: str, budget: str) -> dict[str, Any] | None:
    return next((u for u in _usage(fleet, key) if u["budget"] == budget), None)


def test_reservations_of_a_killed_replica_are_released_when_their_lease_ends(fleet: Fleet) -> None:
    from ray import serve as rayserve

    if fleet.ray_address is None:
        pytest.skip("needs the test run's own cluster (its driver kills replicas)")
    body = {"model": "keeper", "messages": [{"role": "user", "content": "#linger"}], "max_tokens": 16}
    answers: list[httpx.Response] = []

    def linger() -> None:
        with fleet.client(fleet.test_url, HOLDER_KEY) as client:
            answers.append(client.post("/v1/chat/completions", json=body))

    with ThreadPoolExecutor(2) as pool:
        for _ in range(2):
            pool.submit(linger)  # each model call waits 60 s, holding its worst case

        def holding() -> dict[str, Any]:
            day = _day(fleet, HOLDER_KEY, "tenant:holder:day")
            assert day is not None and Decimal(day["held_usd"]) > 0, day
            return day

        held = wait_until(holding, timeout_s=6, interval_s=0.05)
        victims = _replicas("keeper")
        _kill(victims)  # both replicas, holding whatever they held, before any settles
    assert len(answers) == 2 and all(a.status_code in (500, 502, 503) for a in answers), answers
    day = _day(fleet, HOLDER_KEY, "tenant:holder:day")
    assert day is not None and Decimal(day["held_usd"]) >= Decimal(held["held_usd"]) > 0  # still held
    assert day["spent_usd"] == "0"
    # The lease (budgets.lease_s, 120 s) ends: what the dead replicas held is free again.
    rayserve.get_deployment_handle("budget", app_name=APP).advance.remote(121).result()
    day = _day(fleet, HOLDER_KEY, "tenant:holder:day")
    assert day is not None and (day["held_usd"], day["spent_usd"], day["remaining_usd"]) == ("0", "0", "1")
    wait_until(
        lambda: _healthy("keeper", 2, victims), timeout_s=120, interval_s=0.5
    )  # replaced, for the tests after


def test_settled_spend_survives_the_ledgers_replica_being_killed(fleet: Fleet) -> None:
    if fleet.ray_address is None:
        pytest.skip("needs the test run's own cluster (its driver kills the ledger)")
    assert _spend(fleet, HOLDER_KEY).status_code == 200

    def settled() -> dict[tuple[str, str], str]:  # every budget's spend, as an admin sees it
        rows = _usage(fleet, SPENDER_ADMIN_KEY)
        assert all(u["held_usd"] == "0" for u in rows), rows
        # (a restarted ledger's test clock starts again at the real time: its unused
        # current periods may differ, so they are left out)
        return {(u["budget"], u["period"]): u["spent_usd"] for u in rows if Decimal(u["spent_usd"]) > 0}

    before = wait_until(settled, timeout_s=30)
    assert Decimal(before[("tenant:holder:day", _holder_period(fleet))]) > 0
    victims = _replicas("budget")
    _kill(victims)
    wait_until(lambda: _healthy("budget", 1, victims), timeout_s=120, interval_s=0.5)
    assert wait_until(settled, timeout_s=30) == before  # from its SQLite file, to the last digit
    assert _spend(fleet, HOLDER_KEY).status_code == 200  # and the new replica takes new calls


def _holder_period(fleet: Fleet) -> str:
    day = _day(fleet, HOLDER_KEY, "tenant:holder:day")
    assert day is not None
    return str(day["period"])


def test_a_burst_across_midnight_charges_each_day_within_its_cap(fleet: Fleet) -> None:
    import datetime as dt

    from ray import serve as rayserve

    if fleet.ray_address is None:
        pytest.skip("needs the test run's own cluster (its driver moves the ledger's clock)")
    ledger = rayserve.get_deployment_handle("budget", app_name=APP)
    now = ledger.advance.remote(0).result()  # the ledger's clock, as a test moved it
    today = dt.datetime.fromtimestamp(now, dt.UTC).date()
    midnight = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), dt.UTC).timestamp()
    ledger.advance.remote(midnight - now - 1.5).result()  # midnight comes in 1.5 s
    days = (today.isoformat(), (today + dt.timedelta(days=1)).isoformat())

    def spent() -> dict[str, Decimal]:
        rows = _usage(fleet, SPENDER_KEY)
        return {
            u["period"]: Decimal(u["spent_usd"])
            for u in rows
            if u["budget"] == "tenant:spender:day" and u["period"] in days
        }

    before = spent()
    reported = Decimal(0)
    with ThreadPoolExecutor(20) as pool:
        for _ in range(10):  # waves of 20 until the new day has been charged
            answers = list(pool.map(lambda _: _spend(fleet), range(20)))
            assert {a.status_code for a in answers} <= {200, 402, 503}
            reported += sum(
                (Decimal(a.json()["fleet"]["cost_usd"]) for a in answers if a.status_code == 200), Decimal(0)
            )
            if spent().get(days[1], Decimal(0)) > 0:
                break

    def settled() -> dict[str, Decimal]:
        rows = [u for u in _usage(fleet, SPENDER_KEY) if u["budget"] == "tenant:spender:day"]
        assert all(u["held_usd"] == "0" for u in rows), rows
        return spent()

    after = wait_until(settled, timeout_s=30)
    assert after.get(days[1], Decimal(0)) > 0, after  # the burst crossed midnight
    for day in days:
        assert after.get(day, Decimal(0)) <= SPENDER_DAY  # each day within its cap
    assert sum(after.values()) - sum(before.values()) == reported  # and nothing lost or doubled
