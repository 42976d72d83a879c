"""What ``GET /v1/usage`` shows: the ledger's rows with each budget's cap and what is left."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from serve.budget.config import BudgetLimits, BudgetsConfig

__all__ = ["budget_limits", "with_remaining"]


def _caps(budget: str, limits: BudgetLimits) -> dict[str, Decimal]:
    caps = {f"{budget}:day": limits.per_day_usd, f"{budget}:month": limits.per_month_usd}
    return {name: cap for name, cap in caps.items() if cap is not None}


def budget_limits(
    cards: Mapping[str, Any], budgets: BudgetsConfig, keys: Mapping[str, BudgetLimits]
) -> dict[str, Decimal]:
    """Every budget's cap by its name (``tenant:acme:day``, ``agent:hr-policy-advisor:day``);
    ``keys``: each key's caps by its principal id (:func:`serve.auth.key_budgets`)."""
    caps: dict[str, Decimal] = {}
    for name, card in cards.items():
        per_day = card.policies.cost.per_day_usd
        if per_day is not None:
            caps[f"agent:{name}:day"] = per_day
    for tenant, limits in budgets.tenants.items():
        caps |= _caps(f"tenant:{tenant}", limits)
    for principal_id, limits in keys.items():
        caps |= _caps(f"key:{principal_id}", limits)
    return caps


def with_remaining(row: Mapping[str, str], caps: Mapping[str, Decimal]) -> dict[str, Any]:
    cap = caps.get(row["budget"])
    left = None if cap is None else cap - Decimal(row["spent_usd"]) - Decimal(row["held_usd"])
    return {
        **row,
        "limit_usd": None if cap is None else f"{cap:f}",
        "remaining_usd": None if left is None else f"{max(left, Decimal(0)):f}",
    }
