"""The audit service: the one writer of an application's audit log, and its reader.

The ``audit`` deployment (one replica) owns the log (:mod:`serve.audit.log`); replicas'
:class:`~serve.audit.client.AuditClient` ship batches to its writer over a socket
(:mod:`serve.audit.link`); concurrent batches are group-committed: one write, one fsync.

The service also keeps the recent requests' decisions and steps (model calls, tool
calls, delegations, outcome) for ``GET /v1/requests/{id}/explain``; the steps are kept
in ``<log>.events.jsonl`` beside the log, so explanations survive a restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections import OrderedDict
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serve.audit.link import serve_link
from serve.audit.log import AuditLog, audit_key, digest
from serve.canonical import canonical
from serve.settings import settings
from serve.telemetry import logs

__all__ = ["AuditService", "AuditWriter", "explanation"]

_OUTCOME_WAITS, _OUTCOME_WAIT_S = 4, 0.1  # a report without its outcome waits up to 0.4 s

log = logging.getLogger("fleet.audit")

KEEP_REQUESTS = 10_000
KEEP_DECISION_IDS = 100_000


def explanation(
    request_id: str, decisions: list[dict[str, Any]], events: list[dict[str, Any]]
) -> dict[str, Any]:
    """The explanation report of one request, from its audit records and steps."""
    steps = sorted(events, key=lambda e: e["time"])
    # In the order they were decided: a replica ships a request's records when it ends,
    # so an agent's admission record lands in the log after its delegate's decisions.
    # Approval steps are chained records too (serve/approvals/service.py), not decisions.
    chained = sorted(decisions, key=lambda d: (d["time"], d["seq"]))
    decisions = [d for d in chained if d.get("kind") != "approval"]
    approvals = [d for d in chained if d.get("kind") == "approval"]
    agents: list[str] = []
    for item in [*decisions, *steps]:
        if item.get("agent") and item["agent"] not in agents:
            agents.append(item["agent"])
    model_calls = [_without(e, "kind", "request_id", "tenant") for e in steps if e["kind"] == "model_call"]
    outcome = next(
        (_without(e, "kind", "request_id", "tenant") for e in reversed(steps) if e["kind"] == "outcome"), None
    )
    tenant = next((x["tenant"] for x in [*decisions, *steps] if "tenant" in x), None)
    return {
        "object": "request.explanation",
        "request_id": request_id,
        "tenant": tenant,
        "agents": agents,
        "model_calls": model_calls,
        "usage": {
            "prompt_tokens": sum(e.get("prompt_tokens", 0) for e in model_calls),
            "completion_tokens": sum(e.get("completion_tokens", 0) for e in model_calls),
            # exact: the steps keep each call's cost as a decimal string
            "cost_usd": f"{sum((Decimal(e.get('cost_usd', '0')) for e in model_calls), Decimal(0)):f}",
        },
        "tool_calls": [
            _without(e, "kind", "request_id", "tenant") for e in steps if e["kind"] == "tool_call"
        ],
        "delegations": [
            _without(e, "kind", "request_id", "tenant") for e in steps if e["kind"] == "delegation"
        ],
        "approvals": [
            _without(a, "kind", "request_id", "tenant", "prev", "hash", "seq", "record_id") for a in approvals
        ],
        "decisions": [_without(d, "request_id", "tenant", "prev", "hash") for d in decisions],
        "outcome": outcome,
    }


def _without(item: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in keys}


class AuditService:
    """The ``audit`` deployment: starts the writer on its own node and fronts it.

    Replicas ship records to the writer directly, over a TCP connection to a socket it
    listens on: a Serve handle call costs a few milliseconds more per request than an
    actor call, and an actor call a few more than a socket (measured in DECISIONS.md),
    and every request waits for one. The writer is owned by this replica: if the replica
    goes, so does the writer, and the next replica starts a new one (clients ask again)."""

    def __init__(self, path: str) -> None:
        logs.route_to_serve()
        node = ray.get_runtime_context().get_node_id()
        writer = ray.remote(AuditWriter).options(
            num_cpus=0,
            max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        )
        self._writer: Any = cast(Any, writer).remote(path)  # an ActorHandle[AuditWriter]
        ray.get(self._writer.check_health.remote())  # the log opens (or fails) before traffic

    async def address(self) -> tuple[str, int, str]:
        """Where the writer listens for batches, and the token it expects first."""
        address: tuple[str, int, str] = await self._writer.address.remote()
        return address

    async def append(self, records: list[dict[str, Any]], events: list[dict[str, Any]]) -> int:
        """A batch relayed to the writer, for a replica that cannot reach the writer's port."""
        count: int = await self._writer.append.remote(records, events)
        return count

    async def explain(self, request_id: str, tenant: str | None) -> dict[str, Any] | None:
        report: dict[str, Any] | None = await self._writer.explain.remote(request_id, tenant)
        # An ingress replica ships a request's outcome within its linger (0.1 s) of the
        # answer: a report asked for at once, through another replica, waits that long.
        for _ in range(_OUTCOME_WAITS):
            if report is None or report.get("outcome") is not None:
                break
            await asyncio.sleep(_OUTCOME_WAIT_S)
            report = await self._writer.explain.remote(request_id, tenant)
        return report

    async def check_health(self) -> None:
        await self._writer.check_health.remote()


class AuditWriter:
    """The one writer of an application's audit log (a Ray actor), and its explain index."""

    def __init__(self, path: str) -> None:
        self._path = Path(path)
        self._key = audit_key(self._path, settings().audit_key)
        self._log = AuditLog(self._path, self._key)
        self._events_path = self._path.with_name(self._path.name + ".events.jsonl")
        self._events_fd = os.open(self._events_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self._recent: OrderedDict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = OrderedDict()
        self._pending: list[tuple[list[dict[str, Any]], list[dict[str, Any]], asyncio.Future[int]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._sealing: asyncio.Future[None] | None = None  # the last batch's checkpoint
        # A record may arrive twice (an ingress re-sends what it handed an agent that
        # did not answer): each decision is written once.
        self._written: OrderedDict[str, None] = OrderedDict()
        self._load_recent()
        self._token = secrets.token_hex(16)  # only replicas that asked the service know it
        self._listening: asyncio.Future[tuple[str, int]] | None = None

    async def address(self) -> tuple[str, int, str]:
        """The socket replicas send batches to (opened on first use), and its token."""
        if self._listening is None:
            self._listening = asyncio.ensure_future(self._listen())
        host, port = await asyncio.shield(self._listening)
        return host, port, self._token

    async def _listen(self) -> tuple[str, int]:
        host: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call]
        server = await asyncio.start_server(lambda r, w: serve_link(r, w, self._token, self.append), host, 0)
        self._server = server  # kept: the server lives as long as the writer
        return host, server.sockets[0].getsockname()[1]

    async def append(self, records: list[dict[str, Any]], events: list[dict[str, Any]]) -> int:
        """Durably append; returns once the batch holding these records is fsync'ed."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((records, events, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain())
        return await done

    async def explain(self, request_id: str, tenant: str | None) -> dict[str, Any] | None:
        """The report of ``request_id``, of ``tenant``'s records only (None: all, for admins).

        Request ids may come from clients, so two tenants can use the same one."""
        found = self._recent.get(request_id)
        if not found:
            return None
        decisions, events = ([x for x in xs if tenant is None or x.get("tenant") == tenant] for xs in found)
        return explanation(request_id, decisions, events) if decisions or events else None

    def check_health(self) -> None:
        os.fstat(self._events_fd)

    async def _drain(self) -> None:
        # On this loop, not in a thread: a batch is a few records and one fdatasync, and a
        # thread hand-off cost more than the write. The checkpoint is rewritten in a
        # thread after the callers have their answer; the next batch waits for it.
        while self._pending:
            batch, self._pending = self._pending, []
            records = [r for rs, _, _ in batch for r in rs]
            events = [e for _, es, _ in batch for e in es]
            if self._sealing is not None:
                await self._sealing
            try:
                count = self._write(records, events)
            except Exception as exc:  # the disk failed: every caller of this batch hears it
                log.error("audit write failed", exc_info=exc)
                _settle(batch, 0, exc)
                continue
            _settle(batch, count, None)
            if count:  # only a write locks the log; a batch of duplicates wrote nothing to seal
                self._sealing = asyncio.ensure_future(self._seal())

    async def _seal(self) -> None:
        # Once a batch is written, its checkpoint must follow and the lock go, even if this
        # task is cancelled (the loop closing) before a thread picks the job up: a cancelled
        # to_thread() would drop the job, leaving the log locked. The shielded executor
        # future is not a task, so a closing loop waits for it instead of cancelling it.
        job = asyncio.get_running_loop().run_in_executor(None, self._log.seal)
        try:
            await asyncio.shield(job)
        except Exception as exc:  # verification reports the stale checkpoint; the next batch retries
            log.error("audit checkpoint write failed", exc_info=exc)

    def _write(self, records: list[dict[str, Any]], events: list[dict[str, Any]]) -> int:
        """Writes a batch (the log stays locked until it is sealed); returns the records written."""
        records = self._first_time(records)
        for record in records:
            if "input_sha256" in record:  # a decision's (a step chained as a record has none)
                record["input_digest"] = digest(self._key, record.pop("input_sha256"))
        chained = self._log.write(records) if records else []
        try:
            for record in records:  # only once on disk: a failed write is retried, not skipped
                self._remember(record_key(record))
            if events:
                os.write(self._events_fd, b"".join(canonical(e) + b"\n" for e in events))
            self._index(chained, events)
        except BaseException:
            if records:
                self._log.seal()
            raise
        return len(chained)

    def _first_time(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        fresh, seen = [], set()
        for record in records:
            key = record_key(record)
            if key is None or (key not in self._written and key not in seen):
                fresh.append(record)
                seen.add(key)
        return fresh

    def _remember(self, decision_id: str | None) -> None:
        if decision_id is None:
            return
        self._written[decision_id] = None
        if len(self._written) > KEEP_DECISION_IDS:
            self._written.popitem(last=False)

    def _index(self, records: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
        for kind, items in ((0, records), (1, events)):
            for item in items:
                entry = self._recent.setdefault(item["request_id"], ([], []))
                entry[kind].append(item)
                self._recent.move_to_end(item["request_id"])
        while len(self._recent) > KEEP_REQUESTS:
            self._recent.popitem(last=False)

    def _load_recent(self) -> None:
        for kind, path in ((0, self._path), (1, self._events_path)):
            with path.open("rb") as f:
                items = [json.loads(line) for line in f if line.endswith(b"\n")]
            self._index(items, []) if kind == 0 else self._index([], items)
            for item in items[-KEEP_DECISION_IDS:] if kind == 0 else []:
                self._remember(record_key(item))


def record_key(record: dict[str, Any]) -> str | None:
    """What makes a record one: a decision's id, or another record's own (an approval
    step's): a batch sent again after a lost answer is not written twice."""
    key = record.get("decision_id") or record.get("record_id")
    return None if key is None else str(key)


def _settle(batch: list[Any], count: int, error: Exception | None) -> None:
    for _, _, done in batch:
        if done.done():  # a caller that was cancelled no longer waits; one answered stays so
            continue
        if error is None:
            done.set_result(count)
        else:
            done.set_exception(error)
