"""Supply chain tools: inventory lookup and economic order quantity with safety stock."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from statistics import NormalDist
from typing import Annotated

from pydantic import Field

from serve.tools import tool

HERE = Path(__file__).parent
SKU = Annotated[str, Field(pattern=r"^SKU-\d{4}$", description="Stock keeping unit, e.g. SKU-1001.")]


def _item(sku: str) -> dict[str, str]:
    with (HERE / "inventory.csv").open(encoding="utf-8") as f:
        row = next((r for r in csv.DictReader(f) if r["sku"] == sku), None)
    if row is None:
        raise LookupError(f"unknown SKU {sku}")
    return row


@tool
def inventory_lookup(sku: SKU) -> dict[str, object]:
    """Stock on hand for a SKU, its average daily demand and days of cover."""
    row = _item(sku)
    on_hand, demand = float(row["on_hand"]), float(row["daily_demand"])
    return {
        "sku": sku,
        "name": row["name"],
        "on_hand": on_hand,
        "daily_demand": demand,
        "lead_time_days": float(row["lead_time_days"]),
        "days_of_cover": round(on_hand / demand, 1) if demand else None,
    }


@tool
def reorder_quantity(
    sku: SKU,
    service_level: Annotated[
        float, Field(gt=0.5, lt=1.0, description="Probability of no stockout per cycle.")
    ] = 0.95,
) -> dict[str, object]:
    """Economic order quantity, safety stock and reorder point for a SKU; says whether to order now."""
    row = _item(sku)
    demand, std = float(row["daily_demand"]), float(row["daily_demand_std"])
    lead, on_hand = float(row["lead_time_days"]), float(row["on_hand"])
    holding = float(row["unit_cost"]) * float(row["holding_rate"])  # per unit per year
    eoq = math.sqrt(2 * demand * 365 * float(row["order_cost"]) / holding)
    z = NormalDist().inv_cdf(service_level)
    safety = z * std * math.sqrt(lead)
    reorder_point = demand * lead + safety
    return {
        "sku": sku,
        "economic_order_quantity": math.ceil(eoq),
        "safety_stock": math.ceil(safety),
        "reorder_point": math.ceil(reorder_point),
        "on_hand": on_hand,
        "order_now": on_hand <= reorder_point,
        "service_level": service_level,
    }
