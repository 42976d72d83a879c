"""Cost and the per-request budget over HTTP on a real Ray (fleet-test.yaml prices its
scripted backend at 2 / 8 USD per million prompt / completion tokens; ``helper`` may
spend 0.01 USD a request)."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import httpx

from serve.budget import Price
from tests.integration.conftest import QA_KEY, Fleet

PRICE = Price(prompt_usd_per_million=Decimal("2.00"), completion_usd_per_million=Decimal("8.00"))
LONG = "word " * 1200  # 6 KB: its prompt's bound alone costs more than helper's 0.01 USD


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
    r = post(fleet, "helper", LONG)
    assert r.status_code == 402, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "insufficient_quota",
        "budget_exceeded",
        "request:helper",
    )
    assert "0.01 USD" in error["message"]
    assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers  # it will not fit later
    request_id = r.headers["x-fleet-request-id"]
    with fleet.client(fleet.test_url, QA_KEY) as client:
        report = client.get(f"/v1/requests/{request_id}/explain").json()
    assert report["model_calls"] == [] and report["outcome"]["status"] == 402
    # A stream is refused the same way: nothing was sent yet, so it is the status.
    streamed = post(fleet, "helper", LONG, stream=True)
    assert streamed.status_code == 402 and json.loads(streamed.text)["error"]["code"] == "budget_exceeded"
    # What fits still passes.
    assert post(fleet, "helper", "ping").status_code == 200


def test_a_max_tokens_the_budget_could_never_pay_is_a_400_naming_it(fleet: Fleet) -> None:
    r = post(fleet, "helper", "ping", max_tokens=5000)  # 5000 x 8 USD/M = 0.04 USD > 0.01
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "max_tokens"
