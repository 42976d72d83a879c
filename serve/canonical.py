"""Canonical JSON: the one byte form that records are chained by and decisions digested by."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["canonical"]

# json.dumps with options builds an encoder per call: a third of a small value's cost.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical(value: Any) -> bytes:
    """Sorted keys, no spaces, ASCII only: the bytes records are chained and digested by."""
    return _CANONICAL.encode(value).encode()
