"""The example agents' tools, on their bundled data, loaded the way a replica loads them."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from serve.errors import InvalidToolArguments, ToolError
from serve.tools import Tool, load_tools
from tests.unit.conftest import AGENTS, ROOT, run

HR = AGENTS / "hr-policy-advisor"
SCM = AGENTS / "supply-chain-optimizer"
MONITOR = AGENTS / "fleet-monitor"


def call(t: Tool, **arguments: Any) -> Any:
    return json.loads(run(t.run(json.dumps(arguments), 5)))


@pytest.fixture(scope="module")
def hr() -> dict[str, Tool]:
    return load_tools(HR, ["leave_balance", "search_handbook", "request_leave"])


@pytest.fixture(scope="module")
def scm() -> dict[str, Tool]:
    return load_tools(SCM, ["reorder_quantity", "inventory_lookup"])


# --- hr-policy-advisor ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("employee", "expected"),
    [
        # 25 + 3 carried - 12 taken - 2 pending
        ("E1001", (25, 3, 12, 2, 14, False)),
        # 25 + 5 - 20 - 0
        ("E1002", (25, 5, 20, 0, 10, False)),
        # part-time: 15 + 0 - 4 - 1
        ("E1003", (15, 0, 4, 1, 10, False)),
        # 25 + 0 - 26 - 0: overdrawn
        ("E1004", (25, 0, 26, 0, -1, True)),
    ],
)
def test_leave_balance(hr: dict[str, Tool], employee: str, expected: tuple[Any, ...]) -> None:
    entitlement, carried, taken, pending, remaining, overdrawn = expected
    assert call(hr["leave_balance"], employee_id=employee) == {
        "employee_id": employee,
        "entitlement_days": entitlement,
        "carried_over_days": carried,
        "taken_days": taken,
        "pending_days": pending,
        "remaining_days": remaining,
        "overdrawn": overdrawn,
    }


def test_leave_balance_caps_carry_over_at_five_days(tmp_path: Path) -> None:
    # The handbook: "Up to 5 unused annual leave days may be carried over".
    folder = tmp_path / "hr-copy"
    shutil.copytree(HR, folder)
    with (folder / "employees.csv").open("a", encoding="utf-8") as f:
        f.write("E2001,Gus Grant,Finance,US,full-time,25,9,10,0\n")
    balance = call(load_tools(folder, ["leave_balance"])["leave_balance"], employee_id="E2001")
    assert balance["carried_over_days"] == 5
    assert balance["remaining_days"] == 25 + 5 - 10


def test_leave_balance_unknown_employee(hr: dict[str, Tool]) -> None:
    with pytest.raises(ToolError) as info:
        run(hr["leave_balance"].run('{"employee_id": "E9999"}', 5))
    assert str(info.value) == "leave_balance failed: LookupError: no employee E9999"


def test_leave_balance_rejects_a_malformed_id(hr: dict[str, Tool]) -> None:
    with pytest.raises(
        InvalidToolArguments, match="invalid arguments for leave_balance: employee_id: String should"
    ):
        run(hr["leave_balance"].run('{"employee_id": "1001"}', 5))


def request_leave(tools: dict[str, Tool], **arguments: Any) -> str:
    return run(tools["request_leave"].run(json.dumps(arguments), 5))  # a text result, not JSON


def test_request_leave_files_a_numbered_request(hr: dict[str, Tool]) -> None:
    filed = request_leave(hr, employee_id="E1001", days=3, start_date="2026-12-14")
    assert re.fullmatch(
        r"leave request LR-\d{4} filed: E1001, 3 days from 2026-12-14; pending the manager's sign-off", filed
    )
    one = request_leave(hr, employee_id="E1002", days=1, start_date="2027-01-04")
    assert one.endswith("filed: E1002, 1 day from 2027-01-04; pending the manager's sign-off")


def test_request_leave_numbers_a_request_by_what_it_asks() -> None:
    """The same request gets the same number in any process (a demo's answer does not drift)."""
    script = (
        "import asyncio, json, sys; from pathlib import Path; from serve.tools import load_tools; "
        "t = load_tools(Path(sys.argv[1]), ['request_leave'])['request_leave']; "
        "print(asyncio.run(t.run(json.dumps({'employee_id': 'E1001', 'days': 3, 'start_date': '2026-12-14'}), 5)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(HR)], capture_output=True, text=True, check=True, cwd=ROOT
    )
    tools = load_tools(HR, ["request_leave"])
    here = request_leave(tools, employee_id="E1001", days=3, start_date="2026-12-14")
    assert done.stdout.strip() == here
    numbers = {
        request_leave(tools, employee_id=e, days=d, start_date="2026-12-14").split()[2]
        for e in ("E1001", "E1002")
        for d in (1, 2, 3)
    }
    assert len(numbers) == 6  # each request its own number


def test_request_leave_unknown_employee(hr: dict[str, Tool]) -> None:
    with pytest.raises(ToolError) as info:
        run(hr["request_leave"].run('{"employee_id": "E9999", "days": 2, "start_date": "2026-12-14"}', 5))
    assert str(info.value) == "request_leave failed: LookupError: no employee E9999"


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"employee_id": "1001", "days": 2, "start_date": "2026-12-14"}, "employee_id: String should match"),
        (
            {"employee_id": "E1001", "days": 0, "start_date": "2026-12-14"},
            "days: Input should be greater than",
        ),
        ({"employee_id": "E1001", "days": 31, "start_date": "2026-12-14"}, "days: Input should be less than"),
        ({"employee_id": "E1001", "days": 2, "start_date": "14.12.2026"}, "start_date: String should match"),
        (
            {"employee_id": "E1001", "days": 2, "start_date": "2026-02-30"},
            "start_date: Value error, day is out",
        ),
        ({"employee_id": "E1001", "days": 2}, "start_date: Field required"),
    ],
)
def test_request_leave_rejects_bad_arguments(
    hr: dict[str, Tool], arguments: dict[str, Any], problem: str
) -> None:
    with pytest.raises(
        InvalidToolArguments, match=f"invalid arguments for request_leave: {re.escape(problem)}"
    ):
        run(hr["request_leave"].run(json.dumps(arguments), 5))


def test_request_leave_is_gated_and_constrained_as_the_manifest_and_policy_say() -> None:
    import yaml

    from serve.manifest import load_agent

    manifest = load_agent(HR).manifest
    [grant] = [t for t in manifest.tools if t.name == "request_leave"]
    assert (grant.scope, grant.approval, grant.approval_ttl_s) == ("hr.leave.write", True, None)
    assert "hr.leave.write" in manifest.scopes
    assert manifest.approval_webhook is None
    access = yaml.safe_load((ROOT / "configs/policies/access.yaml").read_text(encoding="utf-8"))
    assert access["tools"]["request_leave"] == {
        "employee_id": access["tools"]["leave_balance"]["employee_id"],
        "days": {"min": 1, "max": 30},
    }
    schema = load_tools(HR, ["request_leave"])["request_leave"].openai_schema()["function"]["parameters"]
    assert schema["required"] == ["employee_id", "days", "start_date"]
    assert (schema["properties"]["days"]["minimum"], schema["properties"]["days"]["maximum"]) == (1, 30)


@pytest.mark.parametrize(
    ("query", "sections"),
    [
        ("carry over unused leave", ["Carry-over of leave", "Parental leave"]),
        ("medical certificate sick", ["Sick leave"]),
        ("work remotely from another country", ["Remote work", "Sick leave"]),
        ("meals receipts travel", ["Expenses"]),
        ("xyzzy quux", []),
    ],
)
def test_search_handbook_ranks_sections(hr: dict[str, Tool], query: str, sections: list[str]) -> None:
    hits = call(hr["search_handbook"], query=query)
    assert [h["section"] for h in hits] == sections
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)


def test_search_handbook_returns_the_section_text(hr: dict[str, Tool]) -> None:
    (hit,) = call(hr["search_handbook"], query="carry over", top_k=1)
    assert hit["section"] == "Carry-over of leave"
    assert hit["text"].startswith("Up to 5 unused annual leave days may be carried over")
    assert "\n" not in hit["text"]


def test_search_handbook_top_k_bounds(hr: dict[str, Tool]) -> None:
    assert len(call(hr["search_handbook"], query="leave days employees", top_k=5)) == 5
    with pytest.raises(InvalidToolArguments, match="top_k: Input should be less than or equal to 5"):
        run(hr["search_handbook"].run('{"query": "leave", "top_k": 6}', 5))
    with pytest.raises(InvalidToolArguments, match="query: String should have at least 2 characters"):
        run(hr["search_handbook"].run('{"query": "a"}', 5))


# --- supply-chain-optimizer -----------------------------------------------------------

Z95 = 1.6448536269514722  # NormalDist().inv_cdf(0.95)
Z99 = 2.3263478740408408  # NormalDist().inv_cdf(0.99)


@pytest.mark.parametrize(
    ("sku", "service_level", "eoq", "safety", "reorder_point", "on_hand", "order_now"),
    [
        # demand 35/d, sd 8, lead 7 d, order cost 120, holding 14.50 * 0.22 = 3.19/unit/yr
        # EOQ = sqrt(2 * 35 * 365 * 120 / 3.19) = 980.37; SS = 1.645 * 8 * sqrt(7) = 34.81;
        # ROP = 35 * 7 + 34.81 = 279.81; 420 on hand > ROP
        ("SKU-1001", 0.95, 981, 35, 280, 420.0, False),
        # same item at 99%: SS = 2.326 * 8 * sqrt(7) = 49.24; ROP = 294.24
        ("SKU-1001", 0.99, 981, 50, 295, 420.0, False),
        # demand 12/d, sd 4, lead 10 d, order cost 60, holding 8.00 * 0.20 = 1.60
        # EOQ = sqrt(2 * 12 * 365 * 60 / 1.6) = 573.15; SS = 1.645 * 4 * sqrt(10) = 20.81;
        # ROP = 120 + 20.81 = 140.81; 95 on hand <= ROP: order now
        ("SKU-1003", 0.95, 574, 21, 141, 95.0, True),
        # demand 0.2/d, sd 0.1, lead 30 d, order cost 400, holding 2400 * 0.18 = 432
        # EOQ = sqrt(2 * 0.2 * 365 * 400 / 432) = 11.63; SS = 1.645 * 0.1 * sqrt(30) = 0.90;
        # ROP = 6 + 0.90 = 6.90; 6 on hand <= ROP: order now
        ("SKU-1004", 0.95, 12, 1, 7, 6.0, True),
    ],
)
def test_reorder_quantity(
    scm: dict[str, Tool],
    sku: str,
    service_level: float,
    eoq: int,
    safety: int,
    reorder_point: int,
    on_hand: float,
    order_now: bool,
) -> None:
    assert call(scm["reorder_quantity"], sku=sku, service_level=service_level) == {
        "sku": sku,
        "economic_order_quantity": eoq,
        "safety_stock": safety,
        "reorder_point": reorder_point,
        "on_hand": on_hand,
        "order_now": order_now,
        "service_level": service_level,
    }


def test_hand_computed_numbers_match_the_formulas() -> None:
    # A guard on the table above: the same numbers from the textbook formulas.
    assert math.ceil(math.sqrt(2 * 35 * 365 * 120 / (14.5 * 0.22))) == 981
    assert math.ceil(Z95 * 8 * math.sqrt(7)) == 35
    assert math.ceil(35 * 7 + Z95 * 8 * math.sqrt(7)) == 280
    assert math.ceil(35 * 7 + Z99 * 8 * math.sqrt(7)) == 295
    assert math.ceil(12 * 10 + Z95 * 4 * math.sqrt(10)) == 141


def test_reorder_quantity_defaults_to_95_percent(scm: dict[str, Tool]) -> None:
    assert call(scm["reorder_quantity"], sku="SKU-1001")["service_level"] == 0.95
    assert call(scm["reorder_quantity"], sku="SKU-1001")["safety_stock"] == 35


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"sku": "1001"}, "sku: String should match pattern"),
        ({"sku": "SKU-1001", "service_level": 1.0}, "service_level: Input should be less than 1"),
        ({"sku": "SKU-1001", "service_level": 0.5}, "service_level: Input should be greater than 0.5"),
    ],
)
def test_reorder_quantity_invalid_arguments(
    scm: dict[str, Tool], arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidToolArguments, match=message):
        run(scm["reorder_quantity"].run(json.dumps(arguments), 5))


def test_reorder_quantity_unknown_sku(scm: dict[str, Tool]) -> None:
    with pytest.raises(ToolError) as info:
        run(scm["reorder_quantity"].run('{"sku": "SKU-9999"}', 5))
    assert str(info.value) == "reorder_quantity failed: LookupError: unknown SKU SKU-9999"


def test_inventory_lookup(scm: dict[str, Tool]) -> None:
    assert call(scm["inventory_lookup"], sku="SKU-1003") == {
        "sku": "SKU-1003",
        "name": "Barcode labels (roll)",
        "on_hand": 95.0,
        "daily_demand": 12.0,
        "lead_time_days": 10.0,
        "days_of_cover": 7.9,  # 95 / 12 = 7.92
    }


# --- fleet-monitor --------------------------------------------------------------------


@pytest.fixture(scope="module")
def recommend() -> Any:
    tools = load_tools(MONITOR, ["fleet_status"])
    assert set(tools) == {"fleet_status"}
    return sys.modules["fleet_agent_tools_fleet_monitor"].recommend


def rec(recommend: Any, **changes: Any) -> str:
    numbers: dict[str, Any] = {
        "status": "HEALTHY",
        "running": 2,
        "ongoing": 4,
        "target_per_replica": 2.0,
        "min_replicas": 1,
        "max_replicas": 4,
    }
    result: str = recommend(**{**numbers, **changes})
    return result


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, "ok"),
        ({"status": "UNHEALTHY"}, "investigate: deployment is UNHEALTHY"),
        ({"status": "DEPLOY_FAILED", "running": 0}, "investigate: deployment is DEPLOY_FAILED"),
        ({"running": 0}, "no running replicas: check placement and resources"),
        ({"target_per_replica": None}, "fixed replica count: no action"),
        # ceil(10 / 2) = 5, capped at max 4
        ({"ongoing": 10}, "scale up to 4 replicas"),
        ({"ongoing": 5, "status": "UPSCALING"}, "scale up to 3 replicas"),
        # 20 ongoing on 4 replicas = 5 each > 2, and already at max_replicas
        ({"running": 4, "ongoing": 20}, "saturated at max_replicas=4: raise max_replicas"),
        # ceil(1 / 2) = 1
        ({"running": 3, "ongoing": 1, "status": "DOWNSCALING"}, "can scale down to 1 replicas"),
        # idle, but min_replicas holds two
        ({"running": 2, "ongoing": 0, "min_replicas": 2}, "ok"),
        ({"running": 3, "ongoing": 0, "min_replicas": 0}, "can scale down to 0 replicas"),
    ],
)
def test_recommend(recommend: Any, changes: dict[str, Any], expected: str) -> None:
    assert rec(recommend, **changes) == expected


def test_fleet_status_schema() -> None:
    schema = load_tools(MONITOR, ["fleet_status"])["fleet_status"].openai_schema()["function"]
    assert schema["name"] == "fleet_status"
    assert "application" in schema["parameters"]["properties"]
    assert schema["parameters"].get("required", []) == []
