"""Shared memory on Ray: the ``memory`` deployment, and what an agent's code sees of it.

The ``memory`` deployment (one replica, on the head node, like the audit log) owns a
:class:`~serve.memory.MemoryStore`; agents reach it through its handle, so any replica of
any agent sees the same sessions, request contexts and facts. Large artifacts do not go
through it as bytes: the producing agent puts the object in Ray's object store and the
service keeps only the reference, which the reading agent resolves (zero-copy for
arrays on the same node).

Inside a request, agent code (a tool, the built-in memory tools) calls :func:`memory`
for the request's :class:`RequestMemory`. Every read and write passes the policy's
``memory`` decision point first (scopes ``memory:<namespace>:read|write`` for facts): a
refusal is a tool error the model sees, and an audit record.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import ray
from pydantic import Field
from ray.serve.handle import DeploymentHandle
from ray.util.metrics import Gauge

from serve.errors import ToolDenied, ToolError
from serve.loop import Context, Refusal
from serve.memory import MemoryFull, MemoryLimits, SqliteStore
from serve.metrics import EXPORTED
from serve.tools import Tool, tool

__all__ = ["MEMORY_TOOLS", "MemoryDenied", "MemoryService", "RequestMemory", "memory", "tenant_of"]

log = logging.getLogger("fleet.memory")

NAMESPACE = r"^[a-z][a-z0-9_-]{0,63}$"
KEY = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
STATS_EVERY_S = 5.0

_current: contextvars.ContextVar[RequestMemory] = contextvars.ContextVar("fleet_memory")


class MemoryDenied(ToolDenied):
    """The policy refused a memory read or write."""


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

    def __init__(self, path: str, limits: dict[str, Any]) -> None:
        self._limits = MemoryLimits.model_validate(limits)
        self._store = SqliteStore(Path(path), self._limits)
        self._artifacts: dict[tuple[str, str], _Artifacts] = {}
        self._metrics = _Instruments()
        self._next_report = 0.0
        self._store.expire()
        self._report()

    async def session(self, tenant: str, agent: str, session: str) -> list[dict[str, Any]]:
        return self._store.session(tenant, agent, session)

    async def append_session(
        self, tenant: str, agent: str, session: str, messages: list[dict[str, Any]]
    ) -> None:
        self._store.append_session(tenant, agent, session, messages)
        self._report()

    async def put_context(self, tenant: str, request: str, key: str, value: Any) -> str | None:
        """None when stored; else why not (the value is too large)."""
        return self._stored(self._store.put_context, tenant, request, key, value)

    def _stored(self, put: Callable[..., None], *args: Any) -> str | None:
        try:
            put(*args)
        except MemoryFull as exc:
            return str(exc)
        self._report()
        return None

    async def context(self, tenant: str, request: str) -> dict[str, Any]:
        return self._store.context(tenant, request)

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
        return self._stored(self._store.put_fact, tenant, namespace, key, text)

    async def fact(self, tenant: str, namespace: str, key: str) -> str | None:
        return self._store.fact(tenant, namespace, key)

    async def search_facts(
        self, tenant: str, namespace: str, query: str, limit: int
    ) -> list[tuple[str, str]]:
        return self._store.search_facts(tenant, namespace, query, limit)

    async def stats(self) -> dict[str, Any]:
        self._report(force=True)
        stats = self._store.stats()
        return {"items": stats.items, "bytes": stats.bytes, "evicted": stats.evicted}

    async def check_health(self) -> None:
        """Serve's periodic probe: the store answers; sizes are exported and old items expire.

        Async, so that it runs on the replica's loop like every other call: the store's
        connection and the artifact table are not shared with a thread."""
        self._report()

    def _report(self, force: bool = False) -> None:
        """Expire what is old and export the store's size; at most every few seconds."""
        now = time.monotonic()
        if not force and now < self._next_report:
            return
        self._next_report = now + STATS_EVERY_S
        self._store.expire()
        cutoff = time.time() - self._limits.artifact_ttl_s
        for key in [k for k, held in self._artifacts.items() if held.at < cutoff]:
            del self._artifacts[key]
        stats = self._store.stats()
        stats.items["artifacts"] = sum(len(held.refs) for held in self._artifacts.values())
        stats.bytes["artifacts"] = sum(held.size for held in self._artifacts.values())
        for store, count in stats.items.items():
            self._metrics.items.set(count, {"store": store})
            self._metrics.bytes.set(stats.bytes[store], {"store": store})
        for store, count in stats.evicted.items():
            self._metrics.evictions.set(count, {"store": store})


def tenant_of(ctx: Context) -> str:
    return ctx.principal.tenant if ctx.principal else "anonymous"


MemoryCheck = Callable[[Context, str, str, str | None], Refusal | None]


class RequestMemory:
    """One agent's view of memory during one request: its tenant, its request tree.

    Every call is decided by the policy first (``check``); a refusal raises
    :class:`MemoryDenied`, which the loop tells the model as the tool's result.
    """

    def __init__(
        self, handle: DeploymentHandle[Any], ctx: Context, check: MemoryCheck, timeout_s: float = 2.0
    ) -> None:
        self._handle = handle
        self._timeout = timeout_s
        self._ctx = ctx
        self._check = check
        self.tenant = tenant_of(ctx)
        self._tree = ctx.tree

    async def _call(self, method: str, *args: Any) -> Any:
        """One call to the memory service; a service that does not answer in time is a tool error."""
        try:
            return await asyncio.wait_for(getattr(self._handle, method).remote(*args), self._timeout)
        except TimeoutError:
            raise ToolError(f"the memory service did not answer within {self._timeout:g}s") from None
        except Exception as exc:  # its replica died or is being replaced
            raise ToolError(f"the memory service is unavailable ({type(exc).__name__})") from None

    def _decide(self, operation: str, store: str, namespace: str | None = None) -> None:
        refusal = self._check(self._ctx, operation, store, namespace)
        if refusal is not None:
            raise MemoryDenied(refusal.message.removeprefix("error: "))

    # -- the request tree's shared context -------------------------------------------

    async def put(self, key: str, value: Any) -> None:
        """Share a small JSON value with the other agents of this request."""
        self._decide("write", "context")
        problem = await self._call("put_context", self.tenant, self._tree, key, value)
        if problem:
            raise ToolError(problem)

    async def get(self, key: str, default: Any = None) -> Any:
        return (await self.items()).get(key, default)

    async def items(self) -> dict[str, Any]:
        self._decide("read", "context")
        found: dict[str, Any] = await self._call("context", self.tenant, self._tree)
        return found

    async def put_artifact(self, name: str, value: Any) -> int:
        """Put ``value`` in Ray's object store and share its reference; returns its size."""
        self._decide("write", "artifacts")
        ref = ray.put(value)
        size = _size_of(value)
        problem = await self._call("put_artifact", self.tenant, self._tree, name, [ref], size)
        if problem:
            raise ToolError(problem)
        return size

    async def artifact(self, name: str) -> Any:
        """The object another agent of this request shared (read-only arrays are zero-copy)."""
        self._decide("read", "artifacts")
        ref = await self._call("artifact", self.tenant, self._tree, name)
        if ref is None:
            names = await self._call("artifacts", self.tenant, self._tree)
            raise ToolError(f"no artifact {name!r} in this request (there are: {', '.join(names) or 'none'})")
        return await ref[0]

    # -- long-term facts ---------------------------------------------------------------

    async def remember(self, namespace: str, key: str, text: str) -> None:
        self._decide("write", "facts", namespace)
        problem = await self._call("put_fact", self.tenant, namespace, key, text)
        if problem:
            raise ToolError(problem)

    async def recall(self, namespace: str, key: str) -> str | None:
        self._decide("read", "facts", namespace)
        found: str | None = await self._call("fact", self.tenant, namespace, key)
        return found

    async def search(self, namespace: str, query: str, limit: int = 5) -> list[tuple[str, str]]:
        self._decide("read", "facts", namespace)
        found: list[tuple[str, str]] = await self._call("search_facts", self.tenant, namespace, query, limit)
        return found


def _size_of(value: Any) -> int:
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, bytes | bytearray | memoryview | str):
        return len(value)
    return len(ray.cloudpickle.dumps(value))  # type: ignore[no-untyped-call]  # the exception, not the rule: artifacts are big arrays or bytes


def bind(memory_: RequestMemory) -> contextvars.Token[RequestMemory]:
    return _current.set(memory_)


def unbind(token: contextvars.Token[RequestMemory]) -> None:
    _current.reset(token)


def memory() -> RequestMemory:
    """The memory of the request being served (call it from a tool)."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("memory() is available only while an agent serves a request") from None


# -- the built-in tools: memory as the model sees it ----------------------------------

Namespace = Annotated[str, Field(pattern=NAMESPACE, description="Memory namespace, e.g. 'hr'.")]
Key = Annotated[str, Field(pattern=KEY, description="Key of the entry.")]


@tool
async def remember(namespace: Namespace, key: Key, text: Annotated[str, Field(min_length=1)]) -> str:
    """Store a fact in long-term memory (kept across requests) under namespace/key."""
    await memory().remember(namespace, key, text)
    return f"remembered {namespace}/{key}"


@tool
async def recall(namespace: Namespace, key: Key) -> str:
    """Read the fact stored under namespace/key in long-term memory."""
    found = await memory().recall(namespace, key)
    return found if found is not None else f"nothing is remembered under {namespace}/{key}"


@tool
async def search_memory(
    namespace: Namespace,
    query: Annotated[str, Field(min_length=1, description="Words to look for.")],
    limit: Annotated[int, Field(ge=1, le=20)] = 5,
) -> str:
    """Find facts in long-term memory that contain the query's words."""
    found = await memory().search(namespace, query, limit)
    if not found:
        return f"no fact in {namespace} matches {query!r}"
    return "\n".join(f"{namespace}/{key}: {text}" for key, text in found)


@tool
async def write_context(key: Key, value: Annotated[str, Field(description="What to share.")]) -> str:
    """Share a finding with the other agents working on this request."""
    await memory().put(key, value)
    return f"shared {key}"


@tool
async def read_context(key: Annotated[str, Field(pattern=KEY)] | None = None) -> str:
    """Read what the agents working on this request shared (one key, or all)."""
    items = await memory().items()
    if key is not None:
        return str(items[key]) if key in items else f"nothing is shared under {key!r}"
    return "\n".join(f"{k}: {v}" for k, v in items.items()) or "nothing is shared yet"


MEMORY_TOOLS: dict[str, Tool] = {
    t.name: t for t in (remember, recall, search_memory, write_context, read_context)
}
