"""The audit service: the one writer of an application's audit log, and its reader.

Replicas hand records to an :class:`AuditClient`, which ships them in batches to the
writer of the ``audit`` deployment (one replica) over a socket; concurrent batches are
group-committed: one write, one fsync. A request's records are durable before its
response leaves: the agent and the ingress await :meth:`AuditClient.commit` (503 if the
log cannot be written in time).

The service also keeps the recent requests' decisions and steps (model calls, tool
calls, delegations, outcome) for ``GET /v1/requests/{id}/explain``; the steps are kept
in ``<log>.events.jsonl`` beside the log, so explanations survive a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import msgpack  # type: ignore[import-untyped]
import ray
from ray.serve.handle import DeploymentHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from serve.audit import AuditLog, Carried, audit_key, canonical, digest
from serve.errors import Overloaded
from serve.settings import settings

__all__ = ["AuditClient", "AuditService", "AuditWriter", "explanation"]

log = logging.getLogger("fleet.audit")

KEEP_REQUESTS = 10_000
CONNECT_TIMEOUT_S = 1.0  # to the writer's port; beyond it, batches are relayed by the service ...
RELAY_S = 60.0  # ... for this long, then the port is tried again
KEEP_DECISION_IDS = 100_000

# What a request makes while this is set is carried instead of queued: the ingress hands
# its admission record to the agent, a delegate hands its records and steps back to its
# caller, and the agent the client called ships the whole request's in one batch.
_carry: contextvars.ContextVar[Carried | None] = contextvars.ContextVar("fleet_audit_carry", default=None)


class AuditUnavailable(Overloaded):
    code = "audit_unavailable"


def explanation(
    request_id: str, decisions: list[dict[str, Any]], events: list[dict[str, Any]]
) -> dict[str, Any]:
    """The explanation report of one request, from its audit records and steps."""
    steps = sorted(events, key=lambda e: e["time"])
    # In the order they were decided: a replica ships a request's records when it ends,
    # so an agent's admission record lands in the log after its delegate's decisions.
    decisions = sorted(decisions, key=lambda d: (d["time"], d["seq"]))
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
        },
        "tool_calls": [
            _without(e, "kind", "request_id", "tenant") for e in steps if e["kind"] == "tool_call"
        ],
        "delegations": [
            _without(e, "kind", "request_id", "tenant") for e in steps if e["kind"] == "delegation"
        ],
        "decisions": [_without(d, "request_id", "tenant", "prev", "hash") for d in decisions],
        "outcome": outcome,
    }


def _without(item: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in item.items() if k not in keys}


MAX_FRAME = 256 << 20  # one batch: far more than a replica queues between two ships


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> Any:
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > limit:
        raise ValueError(f"frame of {size} bytes over the limit of {limit}")
    return msgpack.unpackb(await reader.readexactly(size))


def write_frame(writer: asyncio.StreamWriter, item: Any) -> None:
    payload = msgpack.packb(item)
    writer.write(len(payload).to_bytes(4, "big") + payload)


Append = Callable[[list[dict[str, Any]], list[dict[str, Any]]], Awaitable[int]]


async def serve_link(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str, append: Append
) -> None:
    """One replica's connection: its token, then batches in turn, each answered with the
    count written once durable (or the error that kept it from the disk)."""
    try:
        first = await read_frame(reader, limit=1024)
        if not isinstance(first, str) or not secrets.compare_digest(first, token):
            log.warning("audit link refused: wrong token")
            return
        while True:
            records, events = await read_frame(reader)
            try:
                write_frame(writer, {"count": await append(records, events)})
            except Exception as exc:
                write_frame(writer, {"error": f"{type(exc).__name__}: {exc}"})
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the replica went away or gave up on this connection; it re-sends elsewhere
    except Exception as exc:  # not a replica speaking this protocol
        log.warning("audit link closed: %s", exc)
    finally:
        writer.close()


class Link:
    """A replica's connection to the writer: one batch out, its acknowledgement back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, host: str, port: int, token: str) -> Link:
        reader, writer = await asyncio.open_connection(host, port)
        write_frame(writer, token)
        return cls(reader, writer)

    async def send(self, records: list[dict[str, Any]], events: list[dict[str, Any]]) -> int:
        write_frame(self._writer, [records, events])
        await self._writer.drain()
        reply = await read_frame(self._reader)
        if "error" in reply:
            raise OSError(f"the audit writer could not write: {reply['error']}")
        count: int = reply["count"]
        return count

    def close(self) -> None:
        """Safe from any thread: a link is its own loop's."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._writer.close)


class AuditService:
    """The ``audit`` deployment: starts the writer on its own node and fronts it.

    Replicas ship records to the writer directly, over a TCP connection to a socket it
    listens on: a Serve handle call costs a few milliseconds more per request than an
    actor call, and an actor call a few more than a socket (measured in DECISIONS.md),
    and every request waits for one. The writer is owned by this replica: if the replica
    goes, so does the writer, and the next replica starts a new one (clients ask again)."""

    def __init__(self, path: str) -> None:
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
            record["input_digest"] = digest(self._key, record.pop("input_sha256", ""))
        chained = self._log.write(records) if records else []
        try:
            for record in records:  # only once on disk: a failed write is retried, not skipped
                self._remember(record.get("decision_id"))
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
            key = record.get("decision_id")
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
                self._remember(item.get("decision_id"))


class AuditClient:
    """A replica's side: records queue here and ship in batches, in order.

    Shipping is driven by :meth:`commit` (a request's records go in one round trip when
    it ends) and :meth:`ship` (start now, do not wait); a timer ships stragglers within
    ``linger_s``. ``commit`` waits for a count of shipped items, so nothing may be lost:
    a batch that fails (or whose task is cancelled) goes back to the front of the queue.
    """

    def __init__(self, handle: DeploymentHandle[Any], commit_timeout_s: float, linger_s: float = 0.1) -> None:
        self._handle = handle
        self._link: Link | None = None  # to the writer, asked of the service on first use
        self._relay_until = 0.0  # while the writer's port is out of reach: through the service
        self._timeout = commit_timeout_s
        self._linger = linger_s
        self._records: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._queued = 0
        self._shipped = 0
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiters: list[tuple[int, asyncio.Future[None], asyncio.AbstractEventLoop]] = []

    def append(self, record: dict[str, Any]) -> None:
        carried = _carry.get()
        if carried is not None:
            carried.records.append(record)
            return
        self._records.append(record)
        self._queued += 1
        self._arm()

    def event(self, event: dict[str, Any]) -> None:
        carried = _carry.get()
        if carried is not None:
            carried.events.append(event)
            return
        self._events.append(event)
        self._queued += 1
        self._arm()

    @contextlib.contextmanager
    def carrying(self) -> Iterator[Carried]:
        """Collect what is recorded inside (this task, and tasks it starts) instead of queueing it."""
        carried = Carried()
        token = _carry.set(carried)
        try:
            yield carried
        finally:
            _carry.reset(token)

    def adopt(self, carried: Carried | None) -> None:
        """Take over what another replica (or a finished carry) recorded, as if recorded here."""
        if carried:
            for record in carried.records:
                self.append(record)
            for event in carried.events:
                self.event(event)

    @property
    def pending(self) -> bool:
        """Whether anything queued is not durable yet."""
        return self._shipped < self._queued

    def ship(self) -> None:
        """Start shipping what is queued, without waiting for it."""
        if (self._task is None or self._task.done()) and (self._records or self._events):
            self._task = asyncio.get_running_loop().create_task(self._ship())

    async def commit(self) -> None:
        """Wait until everything queued so far is durable (503 after the timeout)."""
        target, loop = self._queued, asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        while self._shipped < target:
            self.ship()  # also restarts a shipper that died: the queue is never stranded
            if loop.time() > deadline:
                log.error(
                    "audit records not durable after %.1fs (%d queued)", self._timeout, target - self._shipped
                )
                raise AuditUnavailable("the audit log cannot be written; retry later")
            landed: asyncio.Future[None] = loop.create_future()
            self._waiters.append((target, landed, loop))
            with contextlib.suppress(TimeoutError):  # woken when its batch lands; re-checked each second
                await asyncio.wait_for(landed, min(1.0, max(deadline - loop.time(), 0.001)))

    def _arm(self) -> None:
        if self._timer is None or self._timer.cancelled():
            self._timer = asyncio.get_running_loop().call_later(self._linger, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self.ship()

    async def _ship(self) -> None:
        delay = 0.05
        while self._records or self._events:
            records, events = self._records, self._events
            self._records, self._events = [], []
            try:
                await self._send(records, events)
            except BaseException as exc:  # the service restarts, or this task is cancelled: keep them
                self._records, self._events = records + self._records, events + self._events
                self._drop_link()  # its state is unknown; a restarted service has a new writer
                if not isinstance(exc, Exception):
                    raise
                log.warning("audit service unavailable (%s); retrying", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            delay = 0.05
            self._shipped += len(records) + len(events)
            self._wake()

    async def _send(self, records: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
        """One batch to the writer: over the link, or relayed by the ``audit`` deployment
        while the writer's port cannot be reached (a firewall between nodes, say)."""
        loop = asyncio.get_running_loop()
        if self._link is not None and self._link.loop is not loop:
            self._drop_link()
        if self._link is None and loop.time() >= self._relay_until:
            host, port, token = await asyncio.wait_for(self._handle.address.remote(), self._timeout)
            try:
                self._link = await asyncio.wait_for(Link.open(host, port, token), CONNECT_TIMEOUT_S)
            except (OSError, TimeoutError) as exc:
                log.warning(
                    "audit writer at %s:%d out of reach (%s); relaying through the audit deployment",
                    host, port, type(exc).__name__,
                )  # fmt: skip
                self._relay_until = loop.time() + RELAY_S
        if self._link is None:
            await asyncio.wait_for(self._handle.append.remote(records, events), self._timeout)
        else:
            await asyncio.wait_for(self._link.send(records, events), self._timeout)

    def _drop_link(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None

    def _wake(self) -> None:
        """Resolve the commits whose records have all landed (on their own loops)."""
        done = [w for w in self._waiters if w[0] <= self._shipped]
        self._waiters = [w for w in self._waiters if w[0] > self._shipped]
        for _, landed, loop in done:
            loop.call_soon_threadsafe(_resolve, landed)


def _settle(batch: list[Any], count: int, error: Exception | None) -> None:
    for _, _, done in batch:
        if done.done():  # a caller that was cancelled no longer waits; one answered stays so
            continue
        if error is None:
            done.set_result(count)
        else:
            done.set_exception(error)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
