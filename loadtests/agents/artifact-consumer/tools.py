"""The reading side of the artifact benchmark."""

from __future__ import annotations

from serve.memory.client import memory
from serve.tools import tool


@tool
async def read_artifact() -> str:
    """Size of the table the producer shared."""
    data = await memory().artifact("table")
    return f"read {data.nbytes} bytes"
