"""serve.approvals.service: who may decide (the ``approval`` policy point over the Rego in
configs/policies), every step audited, expiry on the service's clock."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from serve.app import agent_card
from serve.approvals.config import ApprovalsConfig
from serve.approvals.service import OPERATOR, OPERATOR_ID, ApprovalsService
from serve.errors import Conflict, Gone, InvalidRequest, NotFound, PolicyDenied
from serve.governance.config import GovernanceConfig
from serve.manifest import load_agent
from serve.policy.schema import Principal
from serve.testing import PROJECT_ROOT
from tests.unit.approvals.test_store import approval, turn
from tests.unit.budget.fakes import Clock
from tests.unit.conftest import run

REQUESTER = Principal(tenant="acme", roles=["employee", "approver"], authenticated=True)
APPROVER = Principal(tenant="ops", roles=["approver"], authenticated=True)
EMPLOYEE = Principal(tenant="acme", roles=["employee"], authenticated=True)


class _Method:
    def __init__(self, sink: FakeAudit, name: str) -> None:
        self._sink, self._name = sink, name

    def remote(self, *args: Any) -> Any:
        return self._sink.answer(self._name, args)


class FakeAudit:
    """The audit deployment's handle: its writer is out of reach, so batches are relayed."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)

    async def answer(self, name: str, args: tuple[Any, ...]) -> Any:
        if name == "address":
            return "127.0.0.1", 1, "token"  # nothing listens on port 1: relayed
        assert name == "append"
        self.records += args[0]
        self.events += args[1]
        return len(args[0]) + len(args[1])


SENT: list[tuple[str, str, str]] = []


async def sent(app: str, deployment: str, turn_id: str) -> None:
    SENT.append((app, deployment, turn_id))


def service(tmp_path: Path, clock: Clock, audit: FakeAudit) -> ApprovalsService:
    spec = load_agent(PROJECT_ROOT / "agents" / "hr-policy-advisor")
    cards = {"tester": agent_card(spec).model_copy(update={"name": "tester"})}
    config = ApprovalsConfig(test_clock=True)
    return ApprovalsService(
        str(tmp_path / "a.db"), config, cards, GovernanceConfig(), str(PROJECT_ROOT), audit, clock=clock,
        resume=sent,
    )  # fmt: skip


def test_people_decide_as_the_approval_policy_says_and_every_step_is_audited(tmp_path: Path) -> None:
    audit, clock = FakeAudit(), Clock(1000.0)

    async def scenario() -> None:
        approvals = service(tmp_path, clock, audit)
        [shown] = await approvals.park(turn(), [approval()], {}) or []
        assert shown["status"] == "pending" and shown["arguments"] == {
            "amount": 5,
            "note": "[REDACTED:email]",
        }
        own = await approvals.decide("apr_1", True, REQUESTER, "acme:1f2e")
        assert isinstance(own, PolicyDenied) and "separation of duties" in own.message
        wrong = await approvals.decide("apr_1", True, EMPLOYEE, "acme:77aa")
        assert isinstance(wrong, PolicyDenied) and "no role of this principal" in wrong.message
        assert isinstance(await approvals.get("apr_1", EMPLOYEE, "acme:77aa"), NotFound)  # nor look
        assert isinstance(await approvals.decide("apr_x", True, APPROVER, "ops:9a"), NotFound)
        assert isinstance(
            await approvals.decide("apr_1", True, APPROVER, "ops:9a", "x" * 2001), InvalidRequest
        )
        decided = await approvals.decide("apr_1", False, APPROVER, "ops:9a", "not today")
        assert isinstance(decided, dict) and decided["status"] == "rejected"
        assert decided["decision"] == {
            "outcome": "rejected",
            "by": "ops:9a",
            "reason": "not today",
            "at": 1000.0,
        }
        again = await approvals.decide("apr_1", True, APPROVER, "ops:9a")
        assert isinstance(again, Conflict)
        mine = await approvals.get("apr_1", REQUESTER, "acme:1f2e")
        assert isinstance(mine, dict) and mine["status"] == "rejected"
        await asyncio.sleep(0.2)  # the sweeper's audit batch ships

    run(scenario())
    # Each step is a record of the hash-chained log, in the request's trail (its tenant's).
    steps = [(r["event"], r["by"]) for r in audit.records if r.get("kind") == "approval"]
    assert steps == [("requested", None), ("rejected", "ops:9a")]
    assert all(r["tenant"] == "acme" and r["request_id"] == "req_1" for r in audit.records if r.get("kind"))
    decisions = [r for r in audit.records if r.get("point") == "approval"]
    # Asked at every decision, the refused ones too (the late approve was allowed, then a 409).
    assert [r["outcome"] for r in decisions] == ["deny", "deny", "allow", "allow"]
    assert decisions[0]["tenant"] == "acme" and decisions[2]["tenant"] == "ops"
    assert SENT[-1] == ("fleet", "tester", "turn_1")  # decided: sent to a replica of its deployment


def test_the_operator_decides_and_an_approval_expires_on_the_services_clock(tmp_path: Path) -> None:
    audit, clock = FakeAudit(), Clock(1000.0)

    async def scenario() -> None:
        approvals = service(tmp_path, clock, audit)
        await approvals.park(
            turn(), [approval("apr_1", "c1", ttl_s=60), approval("apr_2", "c2", ttl_s=600)], {}
        )
        pending = await approvals.inbox(OPERATOR, OPERATOR_ID, "pending")
        assert [a["id"] for a in pending] == ["apr_2", "apr_1"] or {a["id"] for a in pending} == {
            "apr_1",
            "apr_2",
        }
        assert await approvals.inbox(EMPLOYEE, "acme:77aa", "pending") == []
        await approvals.advance(61)
        late = await approvals.decide("apr_1", True, OPERATOR, OPERATOR_ID)
        assert isinstance(late, Gone)
        expired = await approvals.get("apr_1", OPERATOR, OPERATOR_ID)
        assert isinstance(expired, dict) and expired["status"] == "expired"
        assert expired["decision"]["by"] == "system"
        ok = await approvals.decide("apr_2", True, OPERATOR, OPERATOR_ID)
        assert isinstance(ok, dict) and ok["status"] == "approved"
        await asyncio.sleep(0.2)

    run(scenario())
    assert [r["event"] for r in audit.records if r.get("kind") == "approval"] == [
        "requested",
        "requested",
        "expired",
        "approved",
    ]


def test_a_wait_returns_when_the_approval_changes(tmp_path: Path) -> None:
    audit, clock = FakeAudit(), Clock(1000.0)

    async def scenario() -> None:
        approvals = service(tmp_path, clock, audit)
        await approvals.park(turn(), [approval()], {})
        waiting = asyncio.ensure_future(approvals.get("apr_1", REQUESTER, "acme:1f2e", wait_s=30))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await approvals.decide("apr_1", False, APPROVER, "ops:9a")
        got = await asyncio.wait_for(waiting, 5)
        assert isinstance(got, dict) and got["status"] == "rejected"

    run(scenario())


def test_the_clock_moves_only_with_test_clock(tmp_path: Path) -> None:
    spec = load_agent(PROJECT_ROOT / "agents" / "hr-policy-advisor")
    approvals = ApprovalsService(
        str(tmp_path / "a.db"), ApprovalsConfig(), {"hr-policy-advisor": agent_card(spec)},
        GovernanceConfig(), str(PROJECT_ROOT), FakeAudit(), resume=sent,
    )  # fmt: skip
    result: Any = None
    try:
        run(approvals.advance(10))
    except InvalidRequest as exc:
        result = exc
    assert isinstance(result, InvalidRequest) and "test_clock" in result.message
