"""A replica's side of the audit log: records queue here and ship in batches, in order.

A request's records are durable before its response leaves: the agent and the ingress
await :meth:`AuditClient.commit` (503 if the log cannot be written in time). Records a
replica hands to another (the ingress's admission to the agent, a delegate's to its
caller) travel as :class:`Carried`, so the request tree ships in one batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Iterator
from typing import Any

from ray.serve.handle import DeploymentHandle

from serve.audit.link import Link
from serve.context import Carried
from serve.errors import AuditUnavailable

__all__ = ["AuditClient"]

log = logging.getLogger("fleet.audit")

CONNECT_TIMEOUT_S = 1.0  # to the writer's port; beyond it, batches are relayed by the service ...
RELAY_S = 60.0  # ... for this long, then the port is tried again


# What a request makes while this is set is carried instead of queued: the ingress hands
# its admission record to the agent, a delegate hands its records and steps back to its
# caller, and the agent the client called ships the whole request's in one batch.
_carry: contextvars.ContextVar[Carried | None] = contextvars.ContextVar("fleet_audit_carry", default=None)


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


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
