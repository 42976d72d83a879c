"""The producing side of the artifact benchmark: the same bytes, by reference or as text."""

from __future__ import annotations

import functools

import numpy as np

from serve.memory.client import memory
from serve.tools import tool


@functools.cache  # made once per size: the benchmark measures passing it on, not making it
def payload(megabytes: int) -> np.ndarray:
    """Printable bytes without PII (lowercase letters), so both paths carry the same data."""
    return (np.arange(megabytes << 20, dtype=np.uint64) % 26 + ord("a")).astype(np.uint8)


@tool
async def make_artifact(megabytes: int) -> str:
    """Share a table of the given size with the other agents of this request, by reference."""
    size = await memory().put_artifact("table", payload(megabytes))
    return f"shared {size} bytes"


@tool
def make_payload(megabytes: int) -> str:
    """The same table, as text (to be passed on in a message body)."""
    return text(megabytes)


@functools.cache
def text(megabytes: int) -> str:
    return payload(megabytes).tobytes().decode("ascii")
