"""Tools of the memory tests: which replica answers, and a large artifact to share."""

from __future__ import annotations

import hashlib

import numpy as np
from ray import serve as rayserve

from serve.memory.client import memory
from serve.tools import tool


def table(megabytes: int) -> np.ndarray:
    """The test's artifact: deterministic bytes, so a test can compute its digest."""
    return (np.arange(megabytes << 20, dtype=np.uint64) % 251).astype(np.uint8)


@tool
def whoami() -> str:
    """The id of the replica running this tool."""
    return rayserve.get_replica_context().replica_id.unique_id


@tool
async def make_table(megabytes: int) -> str:
    """Build a table of the given size and share it with the other agents of this request."""
    data = table(megabytes)
    size = await memory().put_artifact("table", data)
    return f"shared table of {size} bytes, sha256 {hashlib.sha256(data).hexdigest()}"
