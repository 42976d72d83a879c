"""The reading side of an artifact passed by reference."""

from __future__ import annotations

import hashlib
import json

from serve.memory.client import memory
from serve.tools import tool


@tool
async def table_digest() -> str:
    """Digest of the table the keeper shared, and whether it was read in place (zero-copy)."""
    data = await memory().artifact("table")
    return json.dumps(
        {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": int(data.nbytes),
            "zero_copy": not data.flags.writeable,  # Ray maps arrays from the object store read-only
        }
    )
