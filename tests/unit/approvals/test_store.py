"""serve.approvals.store: parked turns and their approvals; what makes a run exactly once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve.approvals.records import public
from serve.approvals.store import SqliteApprovals
from tests.unit.budget.fakes import Clock


def turn(turn_id: str = "turn_1", nested: bool = False) -> dict[str, Any]:
    return {
        "id": turn_id,
        "agent": "tester",
        "version": "1.0.0",
        "deployment": "tester",
        "app": "fleet",
        "request_id": "req_1",
        "tenant": "acme",
        "requester": "acme:1f2e",
        "nested": nested,
        "parked": {"state": "{}", "request": "{}", "context": {}},
    }


def approval(approval_id: str = "apr_1", call_id: str = "call_1", ttl_s: float = 60) -> dict[str, Any]:
    return {
        "id": approval_id,
        "call_id": call_id,
        "tool": "transfer",
        "arguments": {"amount": 5, "note": "dana.canary@example.org"},
        "shown": {"amount": 5, "note": "[REDACTED:email]"},
        "decision_id": "dec_1",
        "ttl_s": ttl_s,
    }


def store(tmp_path: Path, clock: Clock | None = None) -> SqliteApprovals:
    return SqliteApprovals(tmp_path / "approvals.db", clock or Clock(1000.0))


def test_a_parked_turn_is_ready_once_every_approval_is_decided(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.park(turn(), [approval("apr_1", "c1"), approval("apr_2", "c2")], {})
    assert not s.ready("turn_1") and s.claim("turn_1", "run_a", 30) is None
    assert s.decide("apr_1", "approved", "ops:9a", "fine")
    assert not s.ready("turn_1") and s.to_dispatch(10) == []
    assert s.decide("apr_2", "rejected", "ops:9a", None)
    assert [t["id"] for t in s.to_dispatch(10)] == ["turn_1"]
    claim = s.claim("turn_1", "run_a", 30)
    assert claim is not None and claim.parked == turn()["parked"]
    assert claim.resolutions["c1"] == {
        "kind": "approval",
        "id": "apr_1",
        "decision": "approved",
        "by": "ops:9a",
        "reason": "fine",
    }
    assert claim.resolutions["c2"]["decision"] == "rejected"
    assert s.claim("turn_1", "run_b", 30) is None  # one replica at a time


def test_a_decision_is_taken_once(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.park(turn(), [approval()], {})
    assert s.decide("apr_1", "approved", "ops:9a", None)
    assert not s.decide("apr_1", "rejected", "ops:77", None)
    assert s.approval("apr_1")["decision"] == "approved"  # type: ignore[index]


def test_a_run_starts_once_and_a_lost_one_is_never_started_again(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    s = store(tmp_path, clock)
    s.park(turn(), [approval()], {})
    assert s.start_run("apr_1", "run_a") == ("refused", None)  # not approved: a forged resume
    s.decide("apr_1", "approved", "ops:9a", None)
    assert s.claim("turn_1", "run_a", 30) is not None
    assert s.start_run("apr_1", "run_a") == ("start", None)
    clock.now += 31  # run_a stopped renewing: lost while its tool ran
    turns, lost = s.lapsed()
    assert [t["id"] for t in turns] == ["turn_1"] and [r["id"] for r in lost] == ["apr_1"]
    assert s.claim("turn_1", "run_b", 30) is not None  # handed to another replica ...
    assert s.start_run("apr_1", "run_b") == ("unknown", None)  # ... which does not run it again
    assert not s.ran("apr_1", "run_a", "moved 5")  # a late report of the lost one changes nothing
    row = s.approval("apr_1")
    assert row is not None and s.status(row) == "outcome_unknown"


def test_a_run_that_finished_is_told_not_rerun(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    s = store(tmp_path, clock)
    s.park(turn(), [approval()], {})
    s.decide("apr_1", "approved", "ops:9a", None)
    s.claim("turn_1", "run_a", 30)
    assert s.start_run("apr_1", "run_a") == ("start", None)
    assert s.ran("apr_1", "run_a", "moved 5")
    clock.now += 31  # lost after the tool, before the answer
    turns, lost = s.lapsed()
    assert len(turns) == 1 and lost == []
    s.claim("turn_1", "run_b", 30)
    assert s.start_run("apr_1", "run_b") == ("done", "moved 5")


def test_a_renewed_lease_keeps_the_turn(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    s = store(tmp_path, clock)
    s.park(turn(), [approval()], {})
    s.decide("apr_1", "approved", "ops:9a", None)
    s.claim("turn_1", "run_a", 30)
    clock.now += 20
    assert s.renew("turn_1", "run_a", 30) and not s.renew("turn_1", "run_b", 30)
    clock.now += 20
    assert s.lapsed() == ([], [])


def test_a_callers_turn_waits_for_its_delegates_and_the_tree_finishes_at_its_top(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.park(turn("turn_child", nested=True), [approval("apr_c", "c9")], {})
    s.park(turn("turn_top"), [], {"call_d": "turn_child"})
    assert s.root("turn_child")["id"] == "turn_top"  # type: ignore[index]
    assert not s.ready("turn_top")
    s.decide("apr_c", "approved", "ops:9a", None)
    assert [t["id"] for t in s.to_dispatch(10)] == ["turn_child"]
    s.claim("turn_child", "run_c", 30)
    child = s.finish("turn_child", "run_c", {"content": "filed", "usage": {}}, failed=False)
    assert child is not None and child["parent"] == "turn_top"
    row = s.approval("apr_c")
    assert row is not None and s.status(row) == "approved" and s.result(row) is None  # the request goes on
    claim = s.claim("turn_top", "run_t", 30)
    assert claim is not None and claim.resolutions == {
        "call_d": {"kind": "child", "result": {"content": "filed", "usage": {}}}
    }
    s.finish("turn_top", "run_t", {"completion": {"id": "chatcmpl-1"}}, failed=False)
    assert s.status(row) == "completed" and s.result(row) == {"completion": {"id": "chatcmpl-1"}}
    assert [r["id"] for r in s.of_tree("turn_top")] == ["apr_c"]


def test_pending_approvals_expire_and_the_public_view_shows_the_redacted_arguments(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    s = store(tmp_path, clock)
    s.park(turn(), [approval(ttl_s=60)], {})
    assert s.expired() == []
    clock.now += 60
    assert [r["id"] for r in s.expired()] == ["apr_1"]
    row = s.approval("apr_1")
    assert row is not None
    shown = public(row, s.status(row), None)
    assert shown["arguments"] == {"amount": 5, "note": "[REDACTED:email]"}
    assert (shown["created_at"], shown["expires_at"], shown["status"]) == (1000.0, 1060.0, "pending")
    assert s.pending_counts() == {"tester": 1}
    assert [r["id"] for r in s.approvals("pending", "tester")] == ["apr_1"] and s.approvals(
        "pending", "other"
    ) == []


def test_a_replica_that_lost_its_turn_cannot_park_or_finish_it(tmp_path: Path) -> None:
    clock = Clock(1000.0)
    s = store(tmp_path, clock)
    s.park(turn(), [approval()], {})
    s.decide("apr_1", "approved", "ops:9a", None)
    s.claim("turn_1", "run_a", 30)
    clock.now += 31
    s.lapsed()
    s.claim("turn_1", "run_b", 30)
    assert not s.park(turn(), [approval("apr_2", "c2")], {}, holder="run_a")
    assert s.finish("turn_1", "run_a", {"completion": {}}, failed=False) is None
    assert s.finish("turn_1", "run_b", {"completion": {}}, failed=False) is not None


def test_in_flight_tells_an_idle_store_from_one_with_work(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert not s.in_flight()
    s.park(turn(), [approval()], {})
    assert s.in_flight()  # pending
    s.decide("apr_1", "approved", "ops:9a", None)
    assert s.in_flight()  # parked, ready
    s.claim("turn_1", "run_a", 30)
    assert s.in_flight()  # resuming
    s.finish("turn_1", "run_a", {"completion": {}}, failed=False)
    assert not s.in_flight()
