"""The ``approvals`` deployment: the one writer of parked turns and their approvals.

Agents park turns here; people decide through the ingress (``/v1/approvals``) or the CLI
(as the cluster's operator); the service asks the ``approval`` policy point who may
decide, records every step in the audit log, and sends each turn that is ready (every
approval decided, every delegate turn finished) to a replica of its agent's deployment
(``resume``), again if no replica claimed it in time or the one that did was lost. A
sweep each second expires approvals and takes turns back from lost replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
from ray import serve as rayserve
from ray.util.metrics import Counter, Gauge, Histogram

from serve.approvals.config import ApprovalsConfig
from serve.approvals.records import ApprovalStore, Claim, public
from serve.approvals.store import SqliteApprovals
from serve.audit.client import AuditClient
from serve.cards import AgentCard
from serve.context import Context, new_id
from serve.errors import Conflict, Gone, InvalidRequest, NotFound, PolicyDenied, RequestError
from serve.governance.config import GovernanceConfig, build_engines
from serve.governance.governor import Governor
from serve.policy.pii import redact, scan
from serve.policy.schema import INPUT_VERSION, Principal
from serve.steps import ApprovalEvent, ApprovalStep
from serve.telemetry import logs
from serve.telemetry.metrics import EXPORTED, MetricsSink

__all__ = ["OPERATOR", "OPERATOR_ID", "ApprovalsService"]

log = logging.getLogger("fleet.approvals")

# The cluster's operator, as the CLI acts through Ray (whoever holds the cluster's token).
OPERATOR = Principal(tenant="operator", roles=["operator", "approver"], authenticated=True)
OPERATOR_ID = "operator"
SWEEP_S = 1.0
# With nothing pending or resuming, the sweep's full work waits this long.
IDLE_SWEEP_S = 30.0
WEBHOOK_TRIES = 5
DECISION_BUCKETS = [1.0, 10, 60, 300, 900, 3600, 4 * 3600, 86_400, 7 * 86_400]


class ApprovalsService:
    def __init__(
        self,
        path: str,
        config: ApprovalsConfig,
        cards: dict[str, AgentCard],
        governance: GovernanceConfig,
        root: str,
        audit: Any,
        webhooks: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        resume: Callable[[str, str, str], Awaitable[Any]] | None = None,
    ) -> None:
        logs.route_to_serve()
        self._config = config
        self._clock, self._offset = clock, 0.0
        self._store: ApprovalStore = SqliteApprovals(Path(path), self._now)
        self._cards = cards
        self._audit = AuditClient(audit, governance.audit.commit_timeout_s)
        self._engine, _ = build_engines(governance, Path(root))
        self._gov = Governor(self._engine, None, MetricsSink(self._audit, None, "", ()), self._now)
        self._webhooks = dict(webhooks or {})
        self._handles: dict[tuple[str, str], Any] = {}
        self._send = resume or self._call_resume  # (app, deployment, turn id): a test's double
        self._changed: dict[str, asyncio.Event] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._counts: dict[str, int] = {}  # pending approvals by agent, for the gauge
        self._background: set[asyncio.Task[Any]] = set()
        self._pending = Gauge("fleet_approvals_pending", EXPORTED["ray_fleet_approvals_pending"], ("agent",))
        self._decided = Counter(
            "fleet_approvals_decided", EXPORTED["ray_fleet_approvals_decided_total"], ("agent", "outcome")
        )
        self._latency = Histogram(
            "fleet_approval_decision_seconds",
            EXPORTED["ray_fleet_approval_decision_seconds"],
            DECISION_BUCKETS,
            ("agent",),
        )

    # -- what agents call ------------------------------------------------------------------

    async def park(
        self,
        turn: dict[str, Any],
        approvals: list[dict[str, Any]],
        children: dict[str, str],
        holder: str | None = None,
    ) -> list[dict[str, Any]] | None:
        """Store a parked turn and its approvals durably; their public fields (None: the
        resuming ``holder`` lost the turn). Audited, notified; a turn that waits only for
        finished delegates is sent on at once."""
        self._start()
        if not self._store.park(turn, approvals, children, holder):
            return None
        shown = []
        for a in approvals:
            row = self._store.approval(a["id"])
            assert row is not None
            self._step(row, "requested", None, None)
            shown.append(public(row, "pending", None))
            url = self._webhooks.get(row["agent"])
            if url:
                self._spawn(self._notify(url, shown[-1]))
        await self._audit.commit()
        self._gauge()
        self._dispatch_ready()
        return shown

    async def claim(self, turn_id: str, holder: str) -> Claim | None:
        self._start()
        claim = self._store.claim(turn_id, holder, self._config.lease_s)
        if claim is not None:
            for row in self._store.of_turn(turn_id):
                self._step(row, "resumed", None, None)
        return claim

    async def renew(self, turn_id: str, holder: str) -> bool:
        return self._store.renew(turn_id, holder, self._config.lease_s)

    async def start_run(self, approval_id: str, holder: str) -> tuple[str, str | None]:
        """Claim the one run of an approved call (see :meth:`SqliteApprovals.start_run`)."""
        got = self._store.start_run(approval_id, holder)
        if got[0] == "lost":
            row = self._store.approval(approval_id)
            assert row is not None
            self._step(row, "outcome_unknown", None, None)
            await self._audit.commit()
            return "unknown", None
        return got

    async def ran(self, approval_id: str, holder: str, outcome: str, status: str) -> bool:
        recorded = self._store.ran(approval_id, holder, outcome)
        row = self._store.approval(approval_id)
        if recorded and row is not None:
            self._step(row, "ran", None, status)
            await self._audit.commit()
            self._wake(approval_id)
        return recorded

    async def finish(self, turn_id: str, holder: str, result: dict[str, Any], failed: bool = False) -> bool:
        """A resumed turn's outcome: the request's answer at the top of its tree, else the
        delegate's answer, which its caller's turn waits for."""
        turn = self._store.finish(turn_id, holder, result, failed)
        if turn is None:
            return False
        event: ApprovalEvent = "failed" if failed else "completed"
        if not turn["nested"]:
            for row in self._store.of_tree(turn_id):
                self._step(row, event, None, None)
                self._wake(row["id"])
        await self._audit.commit()
        if turn["parent"] is not None and self._store.ready(turn["parent"]):
            self._dispatch_ready()
        return True

    # -- what people call (through the ingress, or the CLI as the operator) ---------------------

    async def inbox(
        self, principal: Principal, principal_id: str, status: str | None = None, agent: str | None = None
    ) -> list[dict[str, Any]]:
        """The approvals this principal may see: its own requests' and those it may decide."""
        self._start()
        self._expire()
        rows = self._store.approvals(status, agent)
        seen = [r for r in rows if await self._may_view(r, principal, principal_id)]
        return [public(r, self._store.status(r), None) for r in seen]

    async def get(
        self, approval_id: str, principal: Principal, principal_id: str, wait_s: float = 0.0
    ) -> dict[str, Any] | RequestError:
        """One approval (its result once the request finished). ``wait_s``: hold the answer
        until the approval is no longer pending or running, up to that long."""
        self._start()
        self._expire()
        row = self._store.approval(approval_id)
        if row is None or not await self._may_view(row, principal, principal_id):
            return NotFound(f"no approval {approval_id!r}", param="approval_id")
        deadline = self._clock() + min(max(wait_s, 0.0), self._config.max_wait_s)
        while self._store.status(row) in ("pending", "approved", "running") and self._clock() < deadline:
            changed = self._changed.setdefault(approval_id, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(deadline - self._clock(), SWEEP_S))
            changed.clear()
            self._expire()
            row = self._store.approval(approval_id) or row
        return public(row, self._store.status(row), self._store.result(row))

    async def decide(
        self,
        approval_id: str,
        approve: bool,
        principal: Principal,
        principal_id: str,
        reason: str | None = None,
    ) -> dict[str, Any] | RequestError:
        """Approve or reject, as the ``approval`` policy lets ``principal``: 404 unknown,
        403 refused (never the requester), 409 decided already, 410 expired."""
        self._start()
        if reason is not None and len(reason) > 2000:
            return InvalidRequest("a reason is at most 2000 characters", param="reason")
        self._expire()
        row = self._store.approval(approval_id)
        if row is None:  # one that exists is refused as the policy says (its id is unguessable)
            return NotFound(f"no approval {approval_id!r}", param="approval_id")
        operation = "approve" if approve else "reject"
        decision = await self._gov.decide(
            "approval",
            self._context(row, principal, principal_id),
            self._cards[row["agent"]].facts(None),
            self._action(row, operation, principal_id),
            f"{operation}:{row['id']}",
        )
        refused: RequestError | None = None
        if principal_id == row["requester"]:  # separation of duties, whatever a policy says
            refused = PolicyDenied(
                "separation of duties: who made the request may not decide on its approval",
                decision_id=decision.id,
            )
        elif not decision.allowed:
            why = "; ".join(decision.reasons) or decision.outcome
            refused = PolicyDenied(
                f"not allowed to {operation} {approval_id!r}: {why}", decision_id=decision.id
            )
        elif row["decision"] == "expired":
            refused = Gone(f"approval {approval_id!r} expired at {row['expires']:.0f}", param="approval_id")
        elif row["decision"] is not None or not self._store.decide(
            approval_id, "approved" if approve else "rejected", principal_id, reason
        ):
            refused = Conflict(f"approval {approval_id!r} was decided already", param="approval_id")
        if refused is not None:
            await self._audit.commit()
            return refused
        row = self._store.approval(approval_id)
        assert row is not None
        self._decided_metrics(row)
        self._step(row, "approved" if approve else "rejected", principal_id, reason)
        await self._audit.commit()
        self._wake(approval_id)
        self._dispatch_ready()
        return public(row, self._store.status(row), None)

    async def advance(self, seconds: float) -> float:
        """Move the service's clock (``approvals.test_clock`` only): expiry tests."""
        if not self._config.test_clock:
            raise InvalidRequest("the approvals clock moves only with approvals.test_clock: true")
        self._offset += seconds
        self._expire()
        return self._now()

    async def check_health(self) -> None:
        self._start()

    # -- inside ------------------------------------------------------------------------------

    def _now(self) -> float:
        return self._clock() + self._offset

    def _start(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        """Each second: the pending gauge (Ray drops a gauge not set within two export
        intervals); while anything waits (or every IDLE_SWEEP_S), expiry, lost leases and
        dispatch too: an idle fleet's approvals replica asks its store one indexed question."""
        full_at = 0.0
        while True:
            try:
                if self._store.in_flight() or time.monotonic() >= full_at:
                    full_at = time.monotonic() + IDLE_SWEEP_S
                    self._expire()
                    turns, lost = self._store.lapsed()
                    for turn in turns:
                        log.warning("turn %s: its replica was lost; sending it again", turn["id"])
                    for row in lost:
                        self._step(row, "outcome_unknown", None, None)
                        self._wake(row["id"])
                    self._dispatch_ready()
                    self._counts = self._store.pending_counts()
                self._publish()
            except Exception as exc:  # the next sweep tries again
                log.error("approvals sweep failed", exc_info=exc)
            await asyncio.sleep(SWEEP_S)

    def _expire(self) -> None:
        """Pending approvals past their expiry are rejected, as if by a person."""
        for row in self._store.expired():
            if self._store.decide(row["id"], "expired", "system", "expired unanswered"):
                fresh = self._store.approval(row["id"]) or row
                self._decided_metrics(fresh)
                self._step(fresh, "expired", "system", "expired unanswered")
                self._wake(row["id"])

    def _dispatch_ready(self) -> None:
        for turn in self._store.to_dispatch(self._config.redispatch_s):
            self._store.dispatched(turn["id"])
            self._spawn(self._resume(turn))

    async def _resume(self, turn: dict[str, Any]) -> None:
        """Ask a replica of the turn's own deployment to resume it (any replica; the claim
        makes it one). Not awaited by the decision: a lost call is sent again by the sweep."""
        try:
            await self._send(turn["app"], turn["deployment"], turn["id"])
        except Exception as exc:
            log.warning(
                "resuming turn %s failed (%s); the sweep sends it again", turn["id"], type(exc).__name__
            )

    async def _call_resume(self, app: str, deployment: str, turn_id: str) -> None:
        handle = self._handles.get((app, deployment))
        if handle is None:
            handle = self._handles[(app, deployment)] = rayserve.get_deployment_handle(deployment, app)
        await handle.resume.remote(turn_id)

    async def _may_view(self, row: dict[str, Any], principal: Principal, principal_id: str) -> bool:
        """The requester sees its own; others as the ``approval`` policy's ``view`` says
        (asked of the engine, not audited: reading is not deciding)."""
        if principal_id == row["requester"]:
            return True
        document = {
            "version": INPUT_VERSION,
            "point": "approval",
            "request": {"id": row["request_id"], "chain": [row["agent"]]},
            "principal": principal.model_dump(mode="json"),
            "agent": self._cards[row["agent"]].facts(None).model_dump(mode="json"),
            "action": self._action(row, "view", principal_id),
        }
        try:
            result = await self._engine.evaluate("approval", document)
        except Exception:  # fail closed
            return False
        return result.outcome == "allow"

    @staticmethod
    def _action(row: dict[str, Any], operation: str, principal_id: str) -> dict[str, Any]:
        return {
            "operation": operation,
            "approval": row["id"],
            "tool": row["tool"],
            "requester": row["requester"],
            "requester_tenant": row["tenant"],
            "decider": principal_id,
        }

    @staticmethod
    def _context(row: dict[str, Any], principal: Principal, principal_id: str) -> Context:
        return Context(
            request_id=row["request_id"],
            chain=(row["agent"],),
            principal=principal,
            principal_id=principal_id,
        )

    def _step(self, row: dict[str, Any], event: ApprovalEvent, by: str | None, detail: str | None) -> None:
        """One step of the approval's story: a record of the hash-chained log (not only a
        step of the explanation), in its request's trail, with the requester's tenant."""
        shown = None if detail is None else redact(detail, scan(detail))
        step = ApprovalStep(row["agent"], row["id"], row["tool"], event, by, shown)
        record = step.record(round(self._now(), 6), row["request_id"], row["tenant"])
        self._audit.append({**record, "record_id": new_id("rec_")})  # written once, as a decision is

    def _decided_metrics(self, row: dict[str, Any]) -> None:
        tags = {"agent": row["agent"]}
        self._decided.inc(1, {**tags, "outcome": row["decision"]})
        if row["decided_at"] is not None:
            self._latency.observe(max(row["decided_at"] - row["created"], 0.0), tags)
        self._gauge()

    def _gauge(self) -> None:
        self._counts = self._store.pending_counts()
        self._publish()

    def _publish(self) -> None:
        for agent in self._cards:
            self._pending.set(self._counts.get(agent, 0), {"agent": agent})

    def _wake(self, approval_id: str) -> None:
        changed = self._changed.pop(approval_id, None)
        if changed is not None:
            changed.set()

    def _spawn(self, job: Any) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _notify(self, url: str, approval: dict[str, Any]) -> None:
        """POST an approval's public fields to the agent's webhook, retried with backoff."""
        delay = 0.5
        async with httpx.AsyncClient(timeout=5.0) as client:
            for attempt in range(1, WEBHOOK_TRIES + 1):
                try:
                    response = await client.post(
                        url, json={"type": "approval.requested", "approval": approval}
                    )
                    if response.status_code < 500:
                        if response.status_code >= 400:
                            log.warning(
                                "webhook %s refused approval %s: %d",
                                url,
                                approval["id"],
                                response.status_code,
                            )
                        return
                except httpx.HTTPError as exc:
                    log.warning("webhook %s failed (%s), attempt %d", url, type(exc).__name__, attempt)
                if attempt < WEBHOOK_TRIES:
                    await asyncio.sleep(delay)
                    delay *= 2
        log.error(
            "webhook %s: approval %s not delivered after %d attempts", url, approval["id"], WEBHOOK_TRIES
        )
