"""The built-in memory tools: memory as the model sees it."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from serve.memory.client import memory
from serve.tools import Tool, tool

__all__ = ["KEY", "MEMORY_TOOLS", "NAMESPACE"]

NAMESPACE = r"^[a-z][a-z0-9_-]{0,63}$"
KEY = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"


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
