"""Shared memory's durable state: sessions, request contexts and long-term facts.

Three stores, every key starting with the tenant (one tenant never reaches another's):

- **sessions**: the turns of a conversation, per (tenant, agent, session id); the id
  starts with the id of the principal that wrote it (:func:`serve.memory.client.session_of`),
  so another key of the tenant does not read it;
- **request contexts**: small values the agents of one request tree share, per
  (tenant, request tree id); large artifacts travel as Ray object references beside them
  (:mod:`serve.memory.service`), never through this store;
- **facts**: long-term memory per (tenant, namespace, key), found by key or by words
  (SQLite's FTS5 index of each fact's key and text: about 1 ms at 10 000 facts).

:class:`SqliteStore` is the embedded default: one SQLite file in WAL mode on the head
node's disk, written through on every change, so a restarted memory service finds its
state. :class:`MemoryStore` is the interface another store (one shared by a multi-node
cluster) implements. Bounds (:class:`MemoryLimits`): a time to live and a size per
session, per request context and per tenant, evicting the oldest first.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from serve.errors import MemoryFull
from serve.sqlite import transaction

__all__ = ["MemoryConfig", "MemoryLimits", "MemoryStats", "MemoryStore", "SqliteStore"]

Clock = Callable[[], float]
_WORDS = re.compile(r"\w+")


class MemoryLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    session_ttl_s: float = Field(default=7 * 86400, gt=0, description="A session idle this long is dropped.")
    session_max_messages: int = Field(default=200, gt=0, description="Turns kept per session (oldest go).")
    session_max_bytes: int = Field(default=256 << 10, gt=0, description="Bytes kept per session (oldest go).")
    sessions_per_tenant: int = Field(
        default=10_000, gt=0, description="Sessions kept per tenant (least recently used go)."
    )
    context_ttl_s: float = Field(
        default=3600, gt=0, description="A request's shared context lives this long."
    )
    context_max_bytes: int = Field(
        default=1 << 20, gt=0, description="Bytes of small values per request context."
    )
    artifact_max_bytes: int = Field(
        default=1 << 30, gt=0, description="Bytes of artifacts per request tree (in Ray's object store)."
    )
    artifact_ttl_s: float = Field(
        default=600, gt=0, description="A request tree's artifacts are released this long after the first."
    )
    artifacts_total_max_bytes: int = Field(
        default=4 << 30,
        gt=0,
        description="Bytes of artifacts held for all requests (the oldest request trees' go first).",
    )
    facts_per_tenant: int = Field(default=10_000, gt=0, description="Facts kept per tenant (oldest go).")
    fact_max_bytes: int = Field(default=16 << 10, gt=0, description="Largest fact.")
    tenant_max_bytes: int = Field(
        default=16 << 20, gt=0, description="Bytes of facts per tenant (oldest go)."
    )


class MemoryConfig(BaseModel):
    """The deploy config's ``memory`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(
        default="var/memory/memory.db",
        description="SQLite file of the embedded store (relative: project root).",
    )
    limits: MemoryLimits = Field(default_factory=MemoryLimits, description="Sizes and lifetimes.")
    call_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="How long an agent waits for the memory service (then: a tool error, or 503 for sessions).",
    )


@dataclass
class MemoryStats:
    """What the store holds, for metrics: items and bytes per store, evictions so far."""

    items: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    evicted: dict[str, int] = field(default_factory=dict)


class MemoryStore(Protocol):
    """The state behind the memory service; every call names its tenant."""

    def session(self, tenant: str, agent: str, session: str) -> list[dict[str, Any]]: ...

    def append_session(
        self, tenant: str, agent: str, session: str, messages: list[dict[str, Any]]
    ) -> None: ...

    def put_context(self, tenant: str, request: str, key: str, value: Any) -> None: ...

    def context(self, tenant: str, request: str) -> dict[str, Any]: ...

    def put_fact(self, tenant: str, namespace: str, key: str, text: str) -> None: ...

    def fact(self, tenant: str, namespace: str, key: str) -> str | None: ...

    def search_facts(self, tenant: str, namespace: str, query: str, limit: int) -> list[tuple[str, str]]: ...

    def expire(self) -> None: ...

    def stats(self) -> MemoryStats: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS turns (
    tenant TEXT NOT NULL, agent TEXT NOT NULL, session TEXT NOT NULL,
    seq INTEGER PRIMARY KEY AUTOINCREMENT, message TEXT NOT NULL, size INTEGER NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS turns_by_session ON turns (tenant, agent, session, seq);
CREATE TABLE IF NOT EXISTS sessions (
    tenant TEXT NOT NULL, agent TEXT NOT NULL, session TEXT NOT NULL, used REAL NOT NULL,
    PRIMARY KEY (tenant, agent, session));
CREATE INDEX IF NOT EXISTS sessions_by_use ON sessions (used);
CREATE TABLE IF NOT EXISTS context (
    tenant TEXT NOT NULL, request TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    size INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (tenant, request, key));
CREATE INDEX IF NOT EXISTS context_by_age ON context (at);
CREATE TABLE IF NOT EXISTS facts (
    tenant TEXT NOT NULL, namespace TEXT NOT NULL, key TEXT NOT NULL, text TEXT NOT NULL,
    size INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (tenant, namespace, key));
CREATE INDEX IF NOT EXISTS facts_by_age ON facts (tenant, at);
CREATE TABLE IF NOT EXISTS fact_totals (
    tenant TEXT PRIMARY KEY, count INTEGER NOT NULL, size INTEGER NOT NULL);
-- The words of each fact (its key and text), indexed by SQLite's FTS5 under its facts
-- row's rowid; ``scope`` is one token per (tenant, namespace) (``_scope``). Kept by the
-- triggers, as ``fact_totals`` is (a REPLACE fires the delete: recursive_triggers).
CREATE VIRTUAL TABLE IF NOT EXISTS fact_words USING fts5(
    scope, words, tokenize = "unicode61 remove_diacritics 0 tokenchars '_'");
CREATE TRIGGER IF NOT EXISTS fact_added AFTER INSERT ON facts BEGIN
    INSERT INTO fact_words (rowid, scope, words)
        VALUES (new.rowid, 's' || hex(new.tenant || char(31) || new.namespace), new.key || ' ' || new.text);
    INSERT INTO fact_totals VALUES (new.tenant, 1, new.size)
        ON CONFLICT (tenant) DO UPDATE SET count = count + 1, size = size + new.size;
END;
CREATE TRIGGER IF NOT EXISTS fact_removed AFTER DELETE ON facts BEGIN
    DELETE FROM fact_words WHERE rowid = old.rowid;
    UPDATE fact_totals SET count = count - 1, size = size - old.size WHERE tenant = old.tenant;
END;
"""
# A store written before the word index existed: index what it holds, once.
_BACKFILL = """
INSERT INTO fact_words (rowid, scope, words)
    SELECT rowid, 's' || hex(tenant || char(31) || namespace), key || ' ' || text FROM facts;
INSERT INTO fact_totals SELECT tenant, count(*), sum(size) FROM facts GROUP BY tenant;
"""
# Words of a query looked up, at most (each is one lookup in the index).
MAX_QUERY_WORDS = 32


class SqliteStore:
    """The embedded store: write-through SQLite (WAL), bounded by :class:`MemoryLimits`.

    WAL with ``synchronous=NORMAL`` keeps every committed change across a crash of the
    process (the case of a killed replica); a power cut may lose the last ones.
    """

    def __init__(self, path: Path, limits: MemoryLimits, clock: Clock = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA recursive_triggers=ON")
        with transaction(self._db) as db:
            fresh = db.execute("SELECT 1 FROM sqlite_master WHERE name='fact_words'").fetchone() is None
            for statement in _statements(_SCHEMA):
                db.execute(statement)
            if fresh:
                for statement in _statements(_BACKFILL):
                    db.execute(statement)
        self.limits = limits
        self._clock = clock
        self._evicted: dict[str, int] = {"sessions": 0, "context": 0, "facts": 0}

    def close(self) -> None:
        self._db.close()

    def _count_evicted(self, store: str, cursor: sqlite3.Cursor) -> None:
        self._evicted[store] += max(cursor.rowcount, 0)

    # -- sessions --------------------------------------------------------------------

    def session(self, tenant: str, agent: str, session: str) -> list[dict[str, Any]]:
        used = self._db.execute(
            "SELECT used FROM sessions WHERE tenant=? AND agent=? AND session=?", (tenant, agent, session)
        ).fetchone()
        if used is None or used[0] < self._clock() - self.limits.session_ttl_s:
            return []
        rows = self._db.execute(
            "SELECT message FROM turns WHERE tenant=? AND agent=? AND session=? ORDER BY seq",
            (tenant, agent, session),
        ).fetchall()
        turns = [json.loads(row[0]) for row in rows]
        # Eviction cuts by message: history starts at a user message, never at a tool
        # result or an answer whose question is gone (models reject such a conversation).
        first = next((i for i, m in enumerate(turns) if m.get("role") == "user"), len(turns))
        return turns[first:]

    def append_session(self, tenant: str, agent: str, session: str, messages: list[dict[str, Any]]) -> None:
        now, key = self._clock(), (tenant, agent, session)
        texts = [json.dumps(m, separators=(",", ":"), ensure_ascii=False) for m in messages]
        with transaction(self._db) as db:
            stale = db.execute(
                "SELECT used FROM sessions WHERE tenant=? AND agent=? AND session=?", key
            ).fetchone()
            if stale is not None and stale[0] < now - self.limits.session_ttl_s:
                cursor = db.execute("DELETE FROM turns WHERE tenant=? AND agent=? AND session=?", key)
                self._count_evicted("sessions", cursor)
            db.execute("INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)", (*key, now))
            db.executemany(
                "INSERT INTO turns (tenant, agent, session, message, size, at) VALUES (?, ?, ?, ?, ?, ?)",
                [(*key, text, len(text.encode()), now) for text in texts],
            )
            self._trim_session(db, key)
            self._trim_sessions(db, tenant)

    def _trim_session(self, db: sqlite3.Connection, key: tuple[str, str, str]) -> None:
        """Oldest turns out until the session is within its message and byte limits."""
        rows = db.execute(
            "SELECT seq, size FROM turns WHERE tenant=? AND agent=? AND session=? ORDER BY seq DESC", key
        ).fetchall()
        kept, total = 0, 0
        for seq, size in rows:
            if kept + 1 > self.limits.session_max_messages or total + size > self.limits.session_max_bytes:
                cursor = db.execute(
                    "DELETE FROM turns WHERE tenant=? AND agent=? AND session=? AND seq<=?", (*key, seq)
                )
                self._count_evicted("sessions", cursor)
                return
            kept, total = kept + 1, total + size

    def _trim_sessions(self, db: sqlite3.Connection, tenant: str) -> None:
        (count,) = db.execute("SELECT count(*) FROM sessions WHERE tenant=?", (tenant,)).fetchone()
        excess = count - self.limits.sessions_per_tenant
        if excess <= 0:
            return
        oldest = db.execute(
            "SELECT agent, session FROM sessions WHERE tenant=? ORDER BY used LIMIT ?", (tenant, excess)
        ).fetchall()
        for agent, session in oldest:
            self._drop_session(db, tenant, agent, session)

    def _drop_session(self, db: sqlite3.Connection, tenant: str, agent: str, session: str) -> None:
        db.execute("DELETE FROM sessions WHERE tenant=? AND agent=? AND session=?", (tenant, agent, session))
        cursor = db.execute(
            "DELETE FROM turns WHERE tenant=? AND agent=? AND session=?", (tenant, agent, session)
        )
        self._count_evicted("sessions", cursor)

    # -- request contexts ------------------------------------------------------------

    def put_context(self, tenant: str, request: str, key: str, value: Any) -> None:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        size = len(text.encode())
        if size > self.limits.context_max_bytes:
            raise MemoryFull(
                f"the value is {size} bytes; a request context holds {self.limits.context_max_bytes}"
            )
        with transaction(self._db) as db:
            db.execute(
                "INSERT OR REPLACE INTO context VALUES (?, ?, ?, ?, ?, ?)",
                (tenant, request, key, text, size, self._clock()),
            )
            rows = db.execute(
                "SELECT key, size FROM context WHERE tenant=? AND request=? ORDER BY at DESC, rowid DESC",
                (tenant, request),
            ).fetchall()
            total = 0
            for other, other_size in rows:
                total += other_size
                if total > self.limits.context_max_bytes:
                    cursor = db.execute(
                        "DELETE FROM context WHERE tenant=? AND request=? AND key=?", (tenant, request, other)
                    )
                    self._count_evicted("context", cursor)

    def context(self, tenant: str, request: str) -> dict[str, Any]:
        oldest = self._clock() - self.limits.context_ttl_s
        rows = self._db.execute(
            "SELECT key, value FROM context WHERE tenant=? AND request=? AND at>=? ORDER BY at, rowid",
            (tenant, request, oldest),
        ).fetchall()
        return {key: json.loads(value) for key, value in rows}

    # -- long-term facts -------------------------------------------------------------

    def put_fact(self, tenant: str, namespace: str, key: str, text: str) -> None:
        size = len(text.encode()) + len(key.encode())
        if size > self.limits.fact_max_bytes:
            raise MemoryFull(f"the fact is {size} bytes; at most {self.limits.fact_max_bytes} are kept")
        with transaction(self._db) as db:
            db.execute(
                "INSERT OR REPLACE INTO facts VALUES (?, ?, ?, ?, ?, ?)",
                (tenant, namespace, key, text, size, self._clock()),
            )
            self._trim_facts(db, tenant)

    def _trim_facts(self, db: sqlite3.Connection, tenant: str) -> None:
        """The oldest facts out until the tenant is within its count and byte limits (its
        totals are kept by the triggers: a put within them reads one row)."""
        count, total = db.execute("SELECT count, size FROM fact_totals WHERE tenant=?", (tenant,)).fetchone()
        doomed = []
        oldest = db.execute("SELECT rowid, size FROM facts WHERE tenant=? ORDER BY at, rowid", (tenant,))
        while count > self.limits.facts_per_tenant or total > self.limits.tenant_max_bytes:
            rowid, size = oldest.fetchone()
            doomed.append((rowid,))
            count, total = count - 1, total - size
        oldest.close()
        if doomed:
            cursor = db.executemany("DELETE FROM facts WHERE rowid=?", doomed)
            self._count_evicted("facts", cursor)

    def fact(self, tenant: str, namespace: str, key: str) -> str | None:
        row = self._db.execute(
            "SELECT text FROM facts WHERE tenant=? AND namespace=? AND key=?", (tenant, namespace, key)
        ).fetchone()
        return None if row is None else str(row[0])

    def search_facts(self, tenant: str, namespace: str, query: str, limit: int) -> list[tuple[str, str]]:
        """Facts holding the most of the query's words (its first :data:`MAX_QUERY_WORDS`
        different ones, case-insensitive, in the key or the text), newest first on ties.

        Each word is one lookup in the FTS5 index, within the namespace's scope token; the
        facts found are counted by words matched in SQL (no fact is read that matches none)."""
        words = list(dict.fromkeys(w.lower() for w in _WORDS.findall(query)))[:MAX_QUERY_WORDS]
        if not words:
            return []
        scope = _scope(tenant, namespace)
        lookups = " UNION ALL ".join(["SELECT rowid FROM fact_words WHERE fact_words MATCH ?"] * len(words))
        # Newest first: a put gives its row the highest rowid, so only the facts returned are read.
        rows = self._db.execute(
            f"SELECT f.key, f.text FROM (SELECT rowid AS id, count(*) AS hits FROM ({lookups}) GROUP BY rowid "
            "ORDER BY hits DESC, id DESC LIMIT ?) JOIN facts AS f ON f.rowid = id "
            "WHERE f.tenant=? AND f.namespace=? ORDER BY hits DESC, id DESC",
            [*(f'scope:{scope} AND words:"{w}"' for w in words), limit, tenant, namespace],
        ).fetchall()
        return [(str(key), str(text)) for key, text in rows]

    # -- housekeeping ----------------------------------------------------------------

    def expire(self) -> None:
        """Drop idle sessions and old request contexts."""
        now = self._clock()
        with transaction(self._db) as db:
            stale = db.execute(
                "SELECT tenant, agent, session FROM sessions WHERE used<?", (now - self.limits.session_ttl_s,)
            ).fetchall()
            for tenant, agent, session in stale:
                self._drop_session(db, tenant, agent, session)
            cursor = db.execute("DELETE FROM context WHERE at<?", (now - self.limits.context_ttl_s,))
            self._count_evicted("context", cursor)

    def stats(self) -> MemoryStats:
        out = MemoryStats(evicted=dict(self._evicted))
        for store, table in (("sessions", "turns"), ("context", "context"), ("facts", "facts")):
            items, size = self._db.execute(f"SELECT count(*), coalesce(sum(size), 0) FROM {table}").fetchone()
            out.items[store], out.bytes[store] = int(items), int(size)
        return out


def _scope(tenant: str, namespace: str) -> str:
    """The one index token of a (tenant, namespace): as the triggers write it (SQLite's
    ``hex`` of the UTF-8 text, upper case)."""
    return "s" + (tenant + "\x1f" + namespace).encode().hex().upper()


def _statements(script: str) -> list[str]:
    """A script's statements, for one transaction (``executescript`` would commit first)."""
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    return out
