"""The approvals store: parked turns and their approvals, in SQLite (one writer: the service).

A **turn** is an agent's turn stopped at gated calls: its loop state, request and context
as JSON, the call it answers in its caller's turn (``parent``, ``parent_call``) if it is a
delegate's, and its outcome once it finishes. An **approval** is one gated call of a
turn: the tool, its arguments, who asked, when it expires, the decision, and the run of
the tool (``run``: started, done or unknown), which is what makes it exactly once: a run
is marked started, durably, before the tool starts, and is never started twice.

A turn is *ready* when every approval of it is decided and every delegate turn it waits
for has finished; a ready turn is claimed by one replica at a time (``holder``, with a
lease it renews), and handed to another only once the lease lapses.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serve.approvals.records import Claim, Decided, Status
from serve.sqlite import transaction

__all__ = ["SqliteApprovals"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
  id TEXT PRIMARY KEY, agent TEXT NOT NULL, version TEXT NOT NULL, deployment TEXT NOT NULL,
  app TEXT NOT NULL, request_id TEXT NOT NULL, tenant TEXT NOT NULL, requester TEXT NOT NULL,
  nested INTEGER NOT NULL, parent TEXT, parent_call TEXT, parked TEXT NOT NULL,
  status TEXT NOT NULL, holder TEXT, lease_until REAL, dispatched REAL, result TEXT,
  created REAL NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS turns_parent ON turns(parent);
CREATE INDEX IF NOT EXISTS turns_status ON turns(status);
CREATE TABLE IF NOT EXISTS approvals (
  id TEXT PRIMARY KEY, turn TEXT NOT NULL, call_id TEXT NOT NULL, agent TEXT NOT NULL,
  version TEXT NOT NULL, tool TEXT NOT NULL, arguments TEXT NOT NULL, shown TEXT NOT NULL,
  request_id TEXT NOT NULL, tenant TEXT NOT NULL, requester TEXT NOT NULL, decision_id TEXT,
  created REAL NOT NULL, expires REAL NOT NULL, decision TEXT, decided_by TEXT, reason TEXT,
  decided_at REAL, run TEXT, run_holder TEXT, outcome TEXT);
CREATE INDEX IF NOT EXISTS approvals_turn ON approvals(turn);
CREATE INDEX IF NOT EXISTS approvals_pending ON approvals(decision, expires);
"""

_APPROVAL_COLUMNS = (
    "id, turn, call_id, agent, version, tool, arguments, shown, request_id, tenant, requester, "
    "decision_id, created, expires, decision, decided_by, reason, decided_at, run, run_holder, outcome"
)


class SqliteApprovals:
    def __init__(self, path: Path, clock: Callable[[], float]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a decision or a run's start is durable when told
        self._db.executescript(_SCHEMA)
        self._now = clock

    # -- parking -----------------------------------------------------------------------

    def park(
        self,
        turn: dict[str, Any],
        approvals: list[dict[str, Any]],
        children: dict[str, str],
        holder: str | None = None,
    ) -> bool:
        """Store a parked turn (new, or parked again by the replica resuming it: ``holder``),
        its new approvals, and the delegate turns it waits for (call id -> turn id).
        False when ``holder`` no longer holds the turn."""
        now = self._now()
        with transaction(self._db) as db:
            if holder is None:
                db.execute(
                    "INSERT INTO turns (id, agent, version, deployment, app, request_id, tenant, requester, "
                    "nested, parked, status, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?, 'parked', ?, ?)",
                    (
                        turn["id"], turn["agent"], turn["version"], turn["deployment"], turn["app"],
                        turn["request_id"], turn["tenant"], turn["requester"], int(turn["nested"]),
                        json.dumps(turn["parked"]), now, now,
                    ),
                )  # fmt: skip
            else:
                cursor = db.execute(
                    "UPDATE turns SET parked=?, status='parked', holder=NULL, lease_until=NULL, "
                    "dispatched=NULL, updated=? WHERE id=? AND holder=? AND status='resuming'",
                    (json.dumps(turn["parked"]), now, turn["id"], holder),
                )
                if cursor.rowcount != 1:
                    return False
            for a in approvals:
                db.execute(
                    "INSERT INTO approvals (id, turn, call_id, agent, version, tool, arguments, shown, "
                    "request_id, tenant, requester, decision_id, created, expires) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        a["id"], turn["id"], a["call_id"], turn["agent"], turn["version"], a["tool"],
                        json.dumps(a["arguments"]), json.dumps(a["shown"]), turn["request_id"],
                        turn["tenant"], turn["requester"], a.get("decision_id"), now, now + a["ttl_s"],
                    ),
                )  # fmt: skip
            for call_id, child in children.items():
                db.execute(
                    "UPDATE turns SET parent=?, parent_call=? WHERE id=?", (turn["id"], call_id, child)
                )
        return True

    # -- reading -----------------------------------------------------------------------

    def approval(self, approval_id: str) -> dict[str, Any] | None:
        row = self._db.execute(
            f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE id=?", (approval_id,)
        ).fetchone()
        return None if row is None else dict(row)

    def approvals(
        self, status: str | None = None, agent: str | None = None, limit: int = 500
    ) -> list[dict[str, Any]]:
        """The newest ``limit`` approvals with ``status`` (and of ``agent``), newest first."""
        where, args = [], []
        if status == "pending":
            where.append("decision IS NULL")
        elif status is not None:  # what a status needs of the decision: the rest is worked out per row
            where.append("decision IS NOT NULL" if status == "outcome_unknown" else "decision=?")
            if status != "outcome_unknown":
                args.append(
                    "approved" if status in ("approved", "running", "completed", "failed") else status
                )
        if agent is not None:
            where.append("agent=?")
            args.append(agent)
        sql = f"SELECT {_APPROVAL_COLUMNS} FROM approvals"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = [dict(r) for r in self._db.execute(sql + " ORDER BY created DESC LIMIT ?", (*args, limit))]
        if status is not None and status != "pending":
            rows = [r for r in rows if self.status(r) == status]
        return rows

    def of_turn(self, turn_id: str) -> list[dict[str, Any]]:
        rows = self._db.execute(f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE turn=?", (turn_id,))
        return [dict(r) for r in rows]

    def of_tree(self, root_id: str) -> list[dict[str, Any]]:
        """Every approval of the request tree whose top turn is ``root_id``."""
        turns, frontier = [root_id], [root_id]
        while frontier:
            marks = ",".join("?" * len(frontier))
            frontier = [
                r[0] for r in self._db.execute(f"SELECT id FROM turns WHERE parent IN ({marks})", frontier)
            ]
            turns += frontier
        return [row for turn in turns for row in self.of_turn(turn)]

    def turn(self, turn_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM turns WHERE id=?", (turn_id,)).fetchone()
        return None if row is None else dict(row)

    def root(self, turn_id: str) -> dict[str, Any] | None:
        """The turn at the top of ``turn_id``'s request tree (its own, if it is the top)."""
        turn = self.turn(turn_id)
        while turn is not None and turn["parent"] is not None:
            turn = self.turn(turn["parent"])
        return turn

    def status(self, row: dict[str, Any]) -> Status:
        """An approval's status, as approvers see it."""
        if row["run"] == "unknown":
            return "outcome_unknown"
        if row["decision"] is None:
            return "pending"
        root = self.root(row["turn"])
        finished = root is not None and root["status"] in ("done", "failed") and not root["nested"]
        if row["decision"] != "approved":
            return row["decision"]  # type: ignore[no-any-return]
        if finished:
            return "failed" if root is not None and root["status"] == "failed" else "completed"
        return "running" if row["run"] is not None else "approved"

    def result(self, row: dict[str, Any]) -> dict[str, Any] | None:
        """The request's final answer (the tree's root outcome), once there is one."""
        root = self.root(row["turn"])
        if root is None or root["nested"] or root["result"] is None:
            return None
        return json.loads(root["result"])  # type: ignore[no-any-return]

    # -- deciding ----------------------------------------------------------------------

    def decide(self, approval_id: str, decision: Decided, by: str, reason: str | None) -> bool:
        """Record the decision of a pending approval; False if it was decided already."""
        with transaction(self._db) as db:
            cursor = db.execute(
                "UPDATE approvals SET decision=?, decided_by=?, reason=?, decided_at=? "
                "WHERE id=? AND decision IS NULL",
                (decision, by, reason, self._now(), approval_id),
            )
        return cursor.rowcount == 1

    def expired(self) -> list[dict[str, Any]]:
        """Pending approvals past their expiry (the service rejects them)."""
        rows = self._db.execute(
            f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE decision IS NULL AND expires <= ?",
            (self._now(),),
        )
        return [dict(r) for r in rows]

    # -- resuming ----------------------------------------------------------------------

    def ready(self, turn_id: str) -> bool:
        """Whether a parked turn has nothing left to wait for."""
        waiting = self._db.execute(
            "SELECT count(*) FROM approvals WHERE turn=? AND decision IS NULL", (turn_id,)
        ).fetchone()[0]
        children = self._db.execute(
            "SELECT count(*) FROM turns WHERE parent=? AND status NOT IN ('done', 'failed')", (turn_id,)
        ).fetchone()[0]
        return bool(waiting == 0 and children == 0)

    def to_dispatch(self, redispatch_s: float) -> list[dict[str, Any]]:
        """Parked turns that are ready and were not sent to a replica lately."""
        now = self._now()
        rows = self._db.execute(
            "SELECT * FROM turns WHERE status='parked' AND (dispatched IS NULL OR dispatched < ?)",
            (now - redispatch_s,),
        )
        return [dict(r) for r in rows if self.ready(r["id"])]

    def dispatched(self, turn_id: str) -> None:
        self._db.execute("UPDATE turns SET dispatched=? WHERE id=?", (self._now(), turn_id))

    def claim(self, turn_id: str, holder: str, lease_s: float) -> Claim | None:
        """Hand a ready parked turn to ``holder`` (one at a time), with how its calls were resolved."""
        if not self.ready(turn_id):
            return None
        now = self._now()
        with transaction(self._db) as db:
            cursor = db.execute(
                "UPDATE turns SET status='resuming', holder=?, lease_until=?, updated=? "
                "WHERE id=? AND status='parked'",
                (holder, now + lease_s, now, turn_id),
            )
            if cursor.rowcount != 1:
                return None
            turn = dict(db.execute("SELECT * FROM turns WHERE id=?", (turn_id,)).fetchone())
        resolutions: dict[str, dict[str, Any]] = {}
        for row in self.of_turn(turn_id):
            resolutions[row["call_id"]] = {
                "kind": "approval",
                "id": row["id"],
                "decision": row["decision"],
                "by": row["decided_by"],
                "reason": row["reason"],
            }
        for child in self._db.execute(
            "SELECT parent_call, result FROM turns WHERE parent=? AND status IN ('done', 'failed')",
            (turn_id,),
        ):
            resolutions[child["parent_call"]] = {"kind": "child", "result": json.loads(child["result"])}
        return Claim(turn_id, json.loads(turn["parked"]), resolutions)

    def renew(self, turn_id: str, holder: str, lease_s: float) -> bool:
        cursor = self._db.execute(
            "UPDATE turns SET lease_until=? WHERE id=? AND holder=? AND status='resuming'",
            (self._now() + lease_s, turn_id, holder),
        )
        return cursor.rowcount == 1

    def start_run(self, approval_id: str, holder: str) -> tuple[str, str | None]:
        """Mark an approved call's run started, once: ``("start", None)`` the first time;
        ``("done", outcome)`` if it ran already; ``("unknown", None)`` if a run started and
        its outcome never came (its replica was lost: ``"lost"`` when this call found it
        so); ``("refused", None)`` if the
        approval is not approved (a forged or replayed resume)."""
        with transaction(self._db) as db:
            row = db.execute(
                "SELECT decision, run, outcome FROM approvals WHERE id=?", (approval_id,)
            ).fetchone()
            if row is None or row["decision"] != "approved":
                return "refused", None
            if row["run"] == "done":
                return "done", row["outcome"]
            if row["run"] == "unknown":
                return "unknown", None
            if row["run"] == "started":  # by a resume that is gone (this one started afresh)
                db.execute("UPDATE approvals SET run='unknown' WHERE id=?", (approval_id,))
                return "lost", None
            db.execute("UPDATE approvals SET run='started', run_holder=? WHERE id=?", (holder, approval_id))
        return "start", None

    def ran(self, approval_id: str, holder: str, outcome: str) -> bool:
        cursor = self._db.execute(
            "UPDATE approvals SET run='done', outcome=? WHERE id=? AND run='started' AND run_holder=?",
            (outcome, approval_id, holder),
        )
        return cursor.rowcount == 1

    def finish(
        self, turn_id: str, holder: str, result: dict[str, Any], failed: bool
    ) -> dict[str, Any] | None:
        """Store a resumed turn's outcome; the turn as it is now, or None if ``holder`` lost it."""
        now = self._now()
        with transaction(self._db) as db:
            cursor = db.execute(
                "UPDATE turns SET status=?, result=?, holder=NULL, lease_until=NULL, updated=? "
                "WHERE id=? AND holder=? AND status='resuming'",
                ("failed" if failed else "done", json.dumps(result), now, turn_id, holder),
            )
            if cursor.rowcount != 1:
                return None
            return dict(db.execute("SELECT * FROM turns WHERE id=?", (turn_id,)).fetchone())

    def lapsed(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Turns whose resuming replica stopped renewing, handed back (ready to send again);
        and the approved calls such a replica started and never finished, now marked
        unknown (never run again)."""
        now = self._now()
        lapsed = "SELECT * FROM turns WHERE status='resuming' AND lease_until < ?"
        if self._db.execute(lapsed, (now,)).fetchone() is None:  # the sweep's usual answer: no write
            return [], []
        with transaction(self._db) as db:
            turns = [dict(r) for r in db.execute(lapsed, (now,))]
            lost = []
            for turn in turns:
                lost += [
                    dict(r)
                    for r in db.execute(
                        f"SELECT {_APPROVAL_COLUMNS} FROM approvals WHERE turn=? AND run='started' AND run_holder=?",
                        (turn["id"], turn["holder"]),
                    )
                ]
                db.execute(
                    "UPDATE approvals SET run='unknown' WHERE turn=? AND run='started' AND run_holder=?",
                    (turn["id"], turn["holder"]),
                )
                db.execute(
                    "UPDATE turns SET status='parked', holder=NULL, lease_until=NULL, dispatched=NULL WHERE id=?",
                    (turn["id"],),
                )
        return turns, lost

    def in_flight(self) -> bool:
        """Whether anything waits: a pending approval, or a turn parked or resuming."""
        row = self._db.execute(
            "SELECT 1 WHERE EXISTS (SELECT 1 FROM approvals WHERE decision IS NULL) "
            "OR EXISTS (SELECT 1 FROM turns WHERE status IN ('parked', 'resuming'))"
        ).fetchone()
        return row is not None

    def pending_counts(self) -> dict[str, int]:
        rows = self._db.execute("SELECT agent, count(*) FROM approvals WHERE decision IS NULL GROUP BY agent")
        return {agent: n for agent, n in rows}
