"""What an agent's code sees of shared memory during one request: :func:`memory`.

Inside a request, agent code (a tool, the built-in memory tools) calls :func:`memory`
for the request's :class:`RequestMemory`. Every read and write passes the policy's
``memory`` decision point first (scopes ``memory:<namespace>:read|write`` for facts): a
refusal is a tool error the model sees, and an audit record.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from serve.errors import MemoryDenied, ToolError

# Ray is imported where it is used, and the rest only for types: `from serve import
# memory` (an agent's tools.py) must not import Ray Serve.
if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from serve.context import Context
    from serve.governance.decisions import Refusal

__all__ = ["RequestMemory", "bind", "memory", "session_of", "tenant_of", "unbind"]


_current: contextvars.ContextVar[RequestMemory] = contextvars.ContextVar("fleet_memory")


def tenant_of(ctx: Context) -> str:
    return ctx.principal.tenant if ctx.principal else "anonymous"


def session_of(ctx: Context) -> str:
    """The store's id of the client's session: its principal's id, then the client's name.

    A session is readable only by the principal that wrote it: another key of the same
    tenant names a different session. (``/`` is in neither part: session ids and tenant
    names exclude it, so no two pairs give one id.)"""
    assert ctx.session is not None
    return f"{ctx.principal_id}/{ctx.session}"


MemoryCheck: TypeAlias = "Callable[[Context, str, str, str | None], Awaitable[Refusal | None]]"


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

    async def _decide(self, operation: str, store: str, namespace: str | None = None) -> None:
        refusal = await self._check(self._ctx, operation, store, namespace)
        if refusal is not None:
            raise MemoryDenied(refusal.message.removeprefix("error: "))

    # -- the request tree's shared context -------------------------------------------

    async def put(self, key: str, value: Any) -> None:
        """Share a small JSON value with the other agents of this request."""
        await self._decide("write", "context")
        problem = await self._call("put_context", self.tenant, self._tree, key, value)
        if problem:
            raise ToolError(problem)

    async def get(self, key: str, default: Any = None) -> Any:
        return (await self.items()).get(key, default)

    async def items(self) -> dict[str, Any]:
        await self._decide("read", "context")
        found: dict[str, Any] = await self._call("context", self.tenant, self._tree)
        return found

    async def put_artifact(self, name: str, value: Any) -> int:
        """Put ``value`` in Ray's object store and share its reference; returns its size."""
        await self._decide("write", "artifacts")
        import ray

        ref = ray.put(value)
        size = _size_of(value)
        problem = await self._call("put_artifact", self.tenant, self._tree, name, [ref], size)
        if problem:
            raise ToolError(problem)
        return size

    async def artifact(self, name: str) -> Any:
        """The object another agent of this request shared (read-only arrays are zero-copy)."""
        await self._decide("read", "artifacts")
        ref = await self._call("artifact", self.tenant, self._tree, name)
        if ref is None:
            names = await self._call("artifacts", self.tenant, self._tree)
            raise ToolError(f"no artifact {name!r} in this request (there are: {', '.join(names) or 'none'})")
        return await ref[0]

    # -- long-term facts ---------------------------------------------------------------

    async def remember(self, namespace: str, key: str, text: str) -> None:
        await self._decide("write", "facts", namespace)
        problem = await self._call("put_fact", self.tenant, namespace, key, text)
        if problem:
            raise ToolError(problem)

    async def recall(self, namespace: str, key: str) -> str | None:
        await self._decide("read", "facts", namespace)
        found: str | None = await self._call("fact", self.tenant, namespace, key)
        return found

    async def search(self, namespace: str, query: str, limit: int = 5) -> list[tuple[str, str]]:
        await self._decide("read", "facts", namespace)
        found: list[tuple[str, str]] = await self._call("search_facts", self.tenant, namespace, query, limit)
        return found


def _size_of(value: Any) -> int:
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, bytes | bytearray | memoryview | str):
        return len(value)
    import ray

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
