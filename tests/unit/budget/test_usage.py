"""serve.budget.usage: what GET /v1/usage shows of each budget: its cap, and what is left
of it after what was spent and what is held."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from serve.budget.config import BudgetLimits, BudgetsConfig
from serve.budget.usage import budget_limits, with_remaining
from serve.errors import BudgetExceeded
from serve.manifest import load_agent
from serve.protocol import error_response
from tests.unit.conftest import write_agent


def test_every_budget_has_its_cap_by_name(tmp_path: Path) -> None:
    capped = load_agent(write_agent(tmp_path, "clerk", policies={"cost": {"per_day_usd": "2.5"}})).manifest
    free = load_agent(write_agent(tmp_path, "scribe")).manifest
    budgets = BudgetsConfig(tenants={"acme": BudgetLimits(per_day_usd=Decimal("1"))})
    keys = {"acme:0011": BudgetLimits(per_day_usd=Decimal("0.2"), per_month_usd=Decimal("4"))}
    assert budget_limits({"clerk": capped, "scribe": free}, budgets, keys) == {
        "agent:clerk:day": Decimal("2.5"),
        "tenant:acme:day": Decimal("1"),
        "key:acme:0011:day": Decimal("0.2"),
        "key:acme:0011:month": Decimal("4"),
    }


ROW = {"budget": "tenant:acme:day", "period": "2026-12-02", "spent_usd": "0.3", "held_usd": "0.05"}


def test_remaining_is_the_cap_less_what_was_spent_and_what_is_held() -> None:
    assert with_remaining(ROW, {"tenant:acme:day": Decimal("1.00")}) == {
        **ROW,
        "limit_usd": "1.00",
        "remaining_usd": "0.65",
    }


def test_remaining_is_never_below_zero() -> None:
    over = {**ROW, "spent_usd": "0.99", "held_usd": "0.02"}
    assert with_remaining(over, {"tenant:acme:day": Decimal("1")})["remaining_usd"] == "0"
    exact = {**ROW, "spent_usd": "0.95", "held_usd": "0.05"}
    assert with_remaining(exact, {"tenant:acme:day": Decimal("1")})["remaining_usd"] == "0.00"


def test_a_budget_without_a_cap_any_more_shows_none() -> None:
    # spend of a budget the config no longer caps (a tenant removed): shown, without a limit
    assert with_remaining(ROW, {}) == {**ROW, "limit_usd": None, "remaining_usd": None}


# --- the 402 ----------------------------------------------------------------------------


def test_a_402_says_when_the_budget_resets_and_not_to_retry_before() -> None:
    error = BudgetExceeded("spent", param="tenant:acme:day", retry_after_s=3600)
    response = error_response(error, retry_after=4)
    assert response.status_code == 402
    assert response.headers["retry-after"] == "3600"
    assert response.headers["x-should-retry"] == "false"
    assert json.loads(response.body)["error"]["param"] == "tenant:acme:day"


def test_a_402_of_a_request_budget_has_no_retry_after() -> None:
    response = error_response(BudgetExceeded("spent", param="request:clerk"), retry_after=4)
    assert "retry-after" not in response.headers and response.headers["x-should-retry"] == "false"
