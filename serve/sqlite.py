"""The embedded stores' SQLite: one atomic change at a time, on the service's one connection."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

__all__ = ["transaction"]


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One atomic change (the write lock taken at once): committed when the block ends,
    rolled back if it raises. ``db`` is opened with ``isolation_level=None``."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
