"""What the approvals service keeps and shows: an approval's statuses, a claimed turn,
the public view of an approval, and the store protocol its backends implement
(:class:`~serve.approvals.store.SqliteApprovals`, the embedded default)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = ["ApprovalStore", "Claim", "Decided", "Status", "public"]

Status = Literal[
    "pending", "approved", "rejected", "expired", "running", "completed", "outcome_unknown", "failed"
]
Decided = Literal["approved", "rejected", "expired"]


@dataclass(frozen=True, slots=True)
class Claim:
    """A ready turn, claimed by one replica: what it parked, and how each waiting call was resolved."""

    turn: str
    parked: dict[str, Any]
    # call id -> {"kind": "approval", "id", "decision", "by", "reason"} or
    # {"kind": "child", "result": {...}} (a delegate's finished turn)
    resolutions: dict[str, dict[str, Any]]


class ApprovalStore(Protocol):
    """Parked turns and their approvals (see serve/approvals/store.py for what each does)."""

    def park(
        self,
        turn: dict[str, Any],
        approvals: list[dict[str, Any]],
        children: dict[str, str],
        holder: str | None = None,
    ) -> bool: ...
    def approval(self, approval_id: str) -> dict[str, Any] | None: ...
    def approvals(
        self, status: str | None = None, agent: str | None = None, limit: int = 500
    ) -> list[dict[str, Any]]: ...
    def of_turn(self, turn_id: str) -> list[dict[str, Any]]: ...
    def of_tree(self, root_id: str) -> list[dict[str, Any]]: ...
    def status(self, row: dict[str, Any]) -> Status: ...
    def result(self, row: dict[str, Any]) -> dict[str, Any] | None: ...
    def decide(self, approval_id: str, decision: Decided, by: str, reason: str | None) -> bool: ...
    def expired(self) -> list[dict[str, Any]]: ...
    def ready(self, turn_id: str) -> bool: ...
    def to_dispatch(self, redispatch_s: float) -> list[dict[str, Any]]: ...
    def dispatched(self, turn_id: str) -> None: ...
    def claim(self, turn_id: str, holder: str, lease_s: float) -> Claim | None: ...
    def renew(self, turn_id: str, holder: str, lease_s: float) -> bool: ...
    def start_run(self, approval_id: str, holder: str) -> tuple[str, str | None]: ...
    def ran(self, approval_id: str, holder: str, outcome: str) -> bool: ...
    def finish(
        self, turn_id: str, holder: str, result: dict[str, Any], failed: bool
    ) -> dict[str, Any] | None: ...
    def lapsed(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]: ...
    def in_flight(self) -> bool: ...
    def pending_counts(self) -> dict[str, int]: ...


def public(row: dict[str, Any], status: Status, result: dict[str, Any] | None) -> dict[str, Any]:
    """An approval as the API shows it: its arguments as redacted at parking (``shown``)."""
    decision = None
    if row["decision"] is not None:
        decision = {
            "outcome": row["decision"],
            "by": row["decided_by"],
            "reason": row["reason"],
            "at": row["decided_at"],
        }
    return {
        "object": "approval",
        "id": row["id"],
        "status": status,
        "agent": row["agent"],
        "agent_version": row["version"],
        "tool": row["tool"],
        "arguments": json.loads(row["shown"]),
        "request_id": row["request_id"],
        "tenant": row["tenant"],
        "requester": row["requester"],
        "created_at": row["created"],
        "expires_at": row["expires"],
        "decision": decision,
        "result": result,
    }
