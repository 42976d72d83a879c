"""The ``memory`` deployment: one replica owning the store, reached by every agent's handle.

Any replica of any agent sees the same sessions, request contexts and facts. Large
artifacts do not go through it as bytes: the producing agent puts the object in Ray's
object store and the service keeps only the reference, which the reading agent resolves
(zero-copy for arrays on the same node).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import ray
from ray.util.metrics import Gauge

from serve.errors import MemoryFull
from serve.memory.store import MemoryLimits, MemoryStats, SqliteStore
from serve.telemetry import logs
from serve.telemetry.metrics import EXPORTED

__all__ = ["MemoryService"]


STATS_EVERY_S = 5.0
T = TypeVar("T")


@dataclass
class _Artifacts:
    refs: dict[str, tuple[list[ray.ObjectRef[Any]], int]] = field(default_factory=dict)
    at: float = field(default_factory=time.time)

    @property
    def size(self) -> int:
        return sum(size for _, size in self.refs.values())


class _Instruments:
    def __init__(self) -> None:
        self.items = Gauge("fleet_memory_items", EXPORTED["ray_fleet_memory_items"], ("store",))
        self.bytes = Gauge("fleet_memory_bytes", EXPORTED["ray_fleet_memory_bytes"], ("store",))
        # A cumulative count, set as a gauge: Ray exports a counter only once it has moved,
        # and "no eviction yet" is worth seeing as 0.
        self.evictions = Gauge(
            "fleet_memory_evictions_total", EXPORTED["ray_fleet_memory_evictions_total"], ("store",)
        )


class MemoryService:
    """The memory deployment: one writer of the store, holder of artifact references."""

    def __init__(self, path: str, limits: MemoryLimits) -> None:
        logs.route_to_serve()
        self._limits = limits
        self._store = SqliteStore(Path(path), self._limits)
        # Every store call runs on this one thread, in order: SQLite (a write, a checkpoint,
        # a search) never holds up the replica's loop, and the connection has one user.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-memory-store")
        self._artifacts: dict[tuple[str, str], _Artifacts] = {}
        self._metrics = _Instruments()
        self._next_report = time.monotonic() + STATS_EVERY_S
        self._export(self._expired_stats())

    async def _io(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)

    async def session(self, tenant: str, agent: str, session: str) -> list[dict[str, Any]]:
        return await self._io(self._store.session, tenant, agent, session)

    async def append_session(
        self, tenant: str, agent: str, session: str, messages: list[dict[str, Any]]
    ) -> None:
        await self._io(self._store.append_session, tenant, agent, session, messages)
        await self._report()

    async def put_context(self, tenant: str, request: str, key: str, value: Any) -> str | None:
        """None when stored; else why not (the value is too large)."""
        return await self._stored(self._store.put_context, tenant, request, key, value)

    async def _stored(self, put: Callable[..., None], *args: Any) -> str | None:
        try:
            await self._io(put, *args)
        except MemoryFull as exc:
            return str(exc)
        await self._report()
        return None

    async def context(self, tenant: str, request: str) -> dict[str, Any]:
        return await self._io(self._store.context, tenant, request)

    async def put_artifact(
        self, tenant: str, request: str, name: str, ref: list[ray.ObjectRef[Any]], size: int
    ) -> str | None:
        """Keep a reference (wrapped in a list, so Ray does not resolve it on the way)."""
        held = self._artifacts.setdefault((tenant, request), _Artifacts())
        old = held.refs.get(name, ([], 0))[1]
        if held.size - old + size > self._limits.artifact_max_bytes:
            return f"the request's artifacts would exceed {self._limits.artifact_max_bytes} bytes"
        held.refs[name] = (ref, size)
        self._release_oldest(keep=(tenant, request))
        return None

    def _release_oldest(self, keep: tuple[str, str]) -> None:
        """Within the cap on all artifacts: the oldest request trees' references go."""
        total = sum(held.size for held in self._artifacts.values())
        for key in sorted(self._artifacts, key=lambda k: self._artifacts[k].at):
            if total <= self._limits.artifacts_total_max_bytes:
                return
            if key != keep:
                total -= self._artifacts.pop(key).size

    async def artifact(self, tenant: str, request: str, name: str) -> list[ray.ObjectRef[Any]] | None:
        held = self._artifacts.get((tenant, request))
        found = held.refs.get(name) if held else None
        return found[0] if found else None

    async def artifacts(self, tenant: str, request: str) -> dict[str, int]:
        held = self._artifacts.get((tenant, request))
        return {name: size for name, (_, size) in held.refs.items()} if held else {}

    async def put_fact(self, tenant: str, namespace: str, key: str, text: str) -> str | None:
        return await self._stored(self._store.put_fact, tenant, namespace, key, text)

    async def fact(self, tenant: str, namespace: str, key: str) -> str | None:
        return await self._io(self._store.fact, tenant, namespace, key)

    async def search_facts(
        self, tenant: str, namespace: str, query: str, limit: int
    ) -> list[tuple[str, str]]:
        return await self._io(self._store.search_facts, tenant, namespace, query, limit)

    async def stats(self) -> dict[str, Any]:
        stats = await self._report(force=True)
        return {"items": stats.items, "bytes": stats.bytes, "evicted": stats.evicted}

    async def check_health(self) -> None:
        """Serve's periodic probe: the store answers; sizes are exported and old items expire."""
        await self._report()

    async def _report(self, force: bool = False) -> MemoryStats:
        """Expire what is old and export the store's size; at most every few seconds."""
        now = time.monotonic()
        if not force and now < self._next_report:
            return self._last
        self._next_report = now + STATS_EVERY_S
        return self._export(await self._io(self._expired_stats))

    def _expired_stats(self) -> MemoryStats:
        self._store.expire()
        return self._store.stats()

    def _export(self, stats: MemoryStats) -> MemoryStats:
        cutoff = time.time() - self._limits.artifact_ttl_s
        for key in [k for k, held in self._artifacts.items() if held.at < cutoff]:
            del self._artifacts[key]
        stats.items["artifacts"] = sum(len(held.refs) for held in self._artifacts.values())
        stats.bytes["artifacts"] = sum(held.size for held in self._artifacts.values())
        for store, count in stats.items.items():
            self._metrics.items.set(count, {"store": store})
            self._metrics.bytes.set(stats.bytes[store], {"store": store})
        for store, count in stats.evicted.items():
            self._metrics.evictions.set(count, {"store": store})
        self._last = stats
        return stats
