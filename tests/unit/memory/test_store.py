"""serve.memory.SqliteStore: sessions, request contexts and facts, their bounds and their durability.

Time is a fake clock the store is given; the SQLite file lives in ``tmp_path``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serve.errors import MemoryFull
from serve.memory.store import MemoryConfig, MemoryLimits, SqliteStore

START = 1_700_000_000.0


class FakeClock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


StoreFactory = Callable[..., SqliteStore]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "var" / "memory" / "memory.db"  # the folder does not exist yet


@pytest.fixture
def open_store(db_path: Path, clock: FakeClock) -> Iterator[StoreFactory]:
    """Opens a store on ``db_path`` with the given limits; closes every store it opened."""
    opened: list[SqliteStore] = []

    def factory(**limits: Any) -> SqliteStore:
        store = SqliteStore(db_path, MemoryLimits(**limits), clock=clock)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(open_store: StoreFactory) -> SqliteStore:
    return open_store()


def said(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "content": text}


def stored_size(value: Any) -> int:
    """Bytes a value takes in the store: its compact JSON, UTF-8."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


# --- configuration --------------------------------------------------------------------


def test_limits_and_config_defaults_and_validation() -> None:
    config = MemoryConfig()
    assert config.path == "var/memory/memory.db"
    assert config.call_timeout_s == 2.0
    assert config.limits.session_ttl_s == 7 * 86400
    assert config.limits.fact_max_bytes == 16 << 10
    with pytest.raises(ValidationError, match="greater than 0"):
        MemoryLimits(session_max_messages=0)
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        MemoryLimits.model_validate({"session_ttl": 5})  # a typo is an error, not a silent default
    with pytest.raises(ValidationError, match="greater than 0"):
        MemoryConfig(call_timeout_s=0)


# --- sessions -------------------------------------------------------------------------


def test_session_turns_are_read_back_in_order(store: SqliteStore, db_path: Path) -> None:
    assert db_path.exists()  # the store made its folder
    first = [said("user", "hello"), said("assistant", "hi, how can I help?")]
    second = [
        said("user", "Grüße — 你好"),
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "function": {"name": "x"}}]},
    ]
    store.append_session("acme", "clerk", "s1", first)
    store.append_session("acme", "clerk", "s1", second)
    assert store.session("acme", "clerk", "s1") == first + second


def test_unknown_session_is_empty(store: SqliteStore) -> None:
    assert store.session("acme", "clerk", "never-seen") == []


@pytest.mark.parametrize(
    "other",
    [("globex", "clerk", "s1"), ("acme", "auditor", "s1"), ("acme", "clerk", "s2")],
    ids=["other-tenant", "other-agent", "other-session"],
)
def test_session_is_keyed_by_tenant_agent_and_session(
    store: SqliteStore, other: tuple[str, str, str]
) -> None:
    store.append_session("acme", "clerk", "s1", [said("user", "my secret plan")])
    assert store.session(*other) == []
    store.append_session(*other, [said("user", "someone else")])
    assert store.session("acme", "clerk", "s1") == [said("user", "my secret plan")]
    assert store.session(*other) == [said("user", "someone else")]


def test_idle_session_expires_and_the_next_append_starts_afresh(
    open_store: StoreFactory, clock: FakeClock
) -> None:
    store = open_store(session_ttl_s=100)
    store.append_session("acme", "clerk", "s1", [said("user", "one"), said("assistant", "1")])
    clock.advance(60)
    store.append_session("acme", "clerk", "s1", [said("user", "two")])
    clock.advance(60)  # 120 s since the start, 60 s idle: idleness counts from the last turn
    assert len(store.session("acme", "clerk", "s1")) == 3
    clock.advance(101)
    assert store.session("acme", "clerk", "s1") == []
    store.append_session("acme", "clerk", "s1", [said("user", "fresh start")])
    assert store.session("acme", "clerk", "s1") == [said("user", "fresh start")]
    stats = store.stats()
    assert stats.items["sessions"] == 1  # the old turns are gone from disk, not just hidden
    assert stats.evicted["sessions"] == 3


def test_expire_drops_idle_sessions_and_counts_them(open_store: StoreFactory, clock: FakeClock) -> None:
    store = open_store(session_ttl_s=100)
    store.append_session("acme", "clerk", "old", [said("user", "a"), said("assistant", "b")])
    clock.advance(50)
    store.append_session("acme", "clerk", "recent", [said("user", "c")])
    clock.advance(51)  # "old" idle 101 s, "recent" 51 s
    store.expire()
    assert store.session("acme", "clerk", "old") == []
    assert store.session("acme", "clerk", "recent") == [said("user", "c")]
    stats = store.stats()
    assert stats.items["sessions"] == 1
    assert stats.evicted["sessions"] == 2


def test_session_keeps_its_newest_max_messages(open_store: StoreFactory) -> None:
    store = open_store(session_max_messages=3)
    store.append_session("acme", "clerk", "s1", [said("user", f"m{i}") for i in range(2)])
    store.append_session("acme", "clerk", "s1", [said("user", f"m{i}") for i in range(2, 5)])
    assert [m["content"] for m in store.session("acme", "clerk", "s1")] == ["m2", "m3", "m4"]
    assert store.stats().evicted["sessions"] == 2


def test_session_keeps_its_newest_max_bytes(open_store: StoreFactory) -> None:
    turns = [said("user", f"{i}" + "x" * 100) for i in range(4)]
    size = stored_size(turns[0])
    store = open_store(session_max_bytes=2 * size + size // 2)  # room for two turns and a half
    store.append_session("acme", "clerk", "s1", turns[:3])
    assert store.session("acme", "clerk", "s1") == turns[1:3]
    store.append_session("acme", "clerk", "s1", turns[3:])
    assert store.session("acme", "clerk", "s1") == turns[2:4]
    stats = store.stats()
    assert stats.bytes["sessions"] == 2 * size
    assert stats.evicted["sessions"] == 2


def test_sessions_per_tenant_evicts_the_least_recently_used_of_that_tenant_only(
    open_store: StoreFactory, clock: FakeClock
) -> None:
    store = open_store(sessions_per_tenant=2)
    store.append_session("globex", "clerk", "g1", [said("user", "globex 1")])
    store.append_session("globex", "clerk", "g2", [said("user", "globex 2")])
    clock.advance(1)
    store.append_session("acme", "clerk", "a", [said("user", "a1"), said("assistant", "a2")])
    clock.advance(1)
    store.append_session("acme", "auditor", "b", [said("user", "b1")])
    clock.advance(1)
    store.append_session("acme", "clerk", "a", [said("user", "a3")])  # "a" is used again: "b" is older
    clock.advance(1)
    store.append_session("acme", "clerk", "c", [said("user", "c1")])
    assert store.session("acme", "auditor", "b") == []
    assert [m["content"] for m in store.session("acme", "clerk", "a")] == ["a1", "a2", "a3"]
    assert store.session("acme", "clerk", "c") == [said("user", "c1")]
    # The other tenant, at its own limit, lost nothing.
    assert store.session("globex", "clerk", "g1") == [said("user", "globex 1")]
    assert store.session("globex", "clerk", "g2") == [said("user", "globex 2")]
    assert store.stats().evicted["sessions"] == 1  # b's one turn


# --- request contexts -----------------------------------------------------------------


def test_context_values_per_tenant_and_request(store: SqliteStore) -> None:
    store.put_context("acme", "req_1", "plan", {"steps": ["a", "b"], "done": False})
    store.put_context("acme", "req_1", "count", 3)
    store.put_context("acme", "req_1", "count", 4)  # a key written again keeps its latest value
    store.put_context("acme", "req_2", "plan", "another request's plan")
    assert store.context("acme", "req_1") == {"plan": {"steps": ["a", "b"], "done": False}, "count": 4}
    assert store.context("acme", "req_2") == {"plan": "another request's plan"}
    assert store.context("globex", "req_1") == {}  # same request id, other tenant: nothing
    assert store.context("acme", "req_unknown") == {}


def test_context_value_larger_than_the_limit_is_refused(open_store: StoreFactory) -> None:
    store = open_store(context_max_bytes=10)
    store.put_context("acme", "req_1", "small", "ok")
    with pytest.raises(MemoryFull, match="a request context holds 10"):
        store.put_context("acme", "req_1", "big", "x" * 20)
    with pytest.raises(MemoryFull):  # bytes, not characters: 5 x 2 bytes plus the quotes
        store.put_context("acme", "req_1", "accents", "ééééé")
    assert store.context("acme", "req_1") == {"small": "ok"}  # what was there stays


def test_context_over_its_total_evicts_the_oldest_keys(open_store: StoreFactory, clock: FakeClock) -> None:
    value = "v" * 20  # 22 bytes as stored
    store = open_store(context_max_bytes=3 * stored_size(value))
    for key in ("k1", "k2", "k3"):
        store.put_context("acme", "req_1", key, value)
        clock.advance(1)
    store.put_context("globex", "req_1", "theirs", value)
    store.put_context("acme", "req_1", "k4", value)
    assert list(store.context("acme", "req_1")) == ["k2", "k3", "k4"]
    store.put_context("acme", "req_1", "k5", "w" * 40)  # takes the room of two
    assert list(store.context("acme", "req_1")) == ["k4", "k5"]
    assert store.context("globex", "req_1") == {"theirs": value}
    assert store.stats().evicted["context"] == 3


def test_context_older_than_its_ttl_is_gone(open_store: StoreFactory, clock: FakeClock) -> None:
    store = open_store(context_ttl_s=60)
    store.put_context("acme", "req_1", "early", 1)
    clock.advance(40)
    store.put_context("acme", "req_1", "late", 2)
    clock.advance(30)  # "early" is 70 s old, "late" 30 s
    assert store.context("acme", "req_1") == {"late": 2}
    assert store.stats().items["context"] == 2  # hidden, still on disk until expire()
    store.expire()
    stats = store.stats()
    assert stats.items["context"] == 1
    assert stats.evicted["context"] == 1
    clock.advance(31)
    store.expire()
    assert store.context("acme", "req_1") == {}
    assert store.stats().items["context"] == 0


# --- long-term facts ------------------------------------------------------------------


def test_fact_put_get_and_overwrite(store: SqliteStore) -> None:
    assert store.fact("acme", "hr", "leave-policy") is None
    store.put_fact("acme", "hr", "leave-policy", "25 days a year")
    assert store.fact("acme", "hr", "leave-policy") == "25 days a year"
    store.put_fact("acme", "hr", "leave-policy", "30 days a year")
    assert store.fact("acme", "hr", "leave-policy") == "30 days a year"
    assert store.stats().items["facts"] == 1


def test_facts_are_isolated_by_tenant_and_namespace(store: SqliteStore) -> None:
    store.put_fact("acme", "hr", "k", "acme hr")
    store.put_fact("acme", "finance", "k", "acme finance")
    store.put_fact("globex", "hr", "k", "globex hr")
    assert store.fact("acme", "hr", "k") == "acme hr"
    assert store.fact("acme", "finance", "k") == "acme finance"
    assert store.fact("globex", "hr", "k") == "globex hr"
    assert store.fact("globex", "finance", "k") is None
    assert store.search_facts("globex", "hr", "acme", 10) == []
    assert store.search_facts("acme", "hr", "finance", 10) == []
    assert store.search_facts("acme", "hr", "hr", 10) == [("k", "acme hr")]


def test_search_ranks_by_query_words_matched(store: SqliteStore, clock: FakeClock) -> None:
    store.put_fact("acme", "kb", "cats", "The cat sat on the MAT")
    clock.advance(1)
    store.put_fact("acme", "kb", "one-cat", "a cat, alone")
    clock.advance(1)
    store.put_fact("acme", "kb", "dogs", "dogs bark at night")
    clock.advance(1)
    store.put_fact("acme", "kb", "mat-supplier", "Rugs Ltd sells them")  # "mat" only in its key
    found = store.search_facts("acme", "kb", "CAT mat", 10)
    assert found == [
        ("cats", "The cat sat on the MAT"),  # two words
        ("mat-supplier", "Rugs Ltd sells them"),  # one word each, newest first
        ("one-cat", "a cat, alone"),
    ]


def test_search_puts_the_newest_first_among_equals_and_respects_limit(
    store: SqliteStore, clock: FakeClock
) -> None:
    for key in ("first", "second", "third"):
        store.put_fact("acme", "kb", key, "blue sky")
        clock.advance(1)
    assert [k for k, _ in store.search_facts("acme", "kb", "blue", 10)] == ["third", "second", "first"]
    store.put_fact("acme", "kb", "first", "blue sea")  # rewritten: now the newest
    assert [k for k, _ in store.search_facts("acme", "kb", "blue", 10)] == ["first", "third", "second"]
    assert store.search_facts("acme", "kb", "blue", 2) == [("first", "blue sea"), ("third", "blue sky")]


def test_search_without_words_finds_nothing(store: SqliteStore) -> None:
    store.put_fact("acme", "kb", "k", "anything at all")
    assert store.search_facts("acme", "kb", "", 5) == []
    assert store.search_facts("acme", "kb", " ?! -- ", 5) == []
    assert store.search_facts("acme", "kb", "nothing-here", 5) == []


def test_fact_larger_than_the_limit_is_refused(open_store: StoreFactory) -> None:
    store = open_store(fact_max_bytes=20)
    store.put_fact("acme", "kb", "k", "x" * 19)  # key and text together: 20 bytes
    with pytest.raises(MemoryFull, match="at most 20 are kept"):
        store.put_fact("acme", "kb", "k2", "x" * 19)
    with pytest.raises(MemoryFull):
        store.put_fact("acme", "kb", "k3", "é" * 10)  # 12 characters with its key, but 22 bytes
    assert store.fact("acme", "kb", "k") == "x" * 19
    assert store.fact("acme", "kb", "k2") is None


def test_facts_per_tenant_evicts_that_tenants_oldest(open_store: StoreFactory, clock: FakeClock) -> None:
    store = open_store(facts_per_tenant=2)
    store.put_fact("globex", "kb", "g1", "theirs")
    store.put_fact("globex", "kb", "g2", "theirs too")
    clock.advance(1)
    store.put_fact("acme", "hr", "a1", "oldest")
    clock.advance(1)
    store.put_fact("acme", "finance", "a2", "middle")  # the limit spans namespaces
    clock.advance(1)
    store.put_fact("acme", "hr", "a3", "newest")
    assert store.fact("acme", "hr", "a1") is None
    assert store.fact("acme", "finance", "a2") == "middle"
    assert store.fact("acme", "hr", "a3") == "newest"
    assert store.fact("globex", "kb", "g1") == "theirs"
    assert store.fact("globex", "kb", "g2") == "theirs too"
    assert store.stats().evicted["facts"] == 1


def test_tenant_max_bytes_evicts_that_tenants_oldest(open_store: StoreFactory, clock: FakeClock) -> None:
    store = open_store(tenant_max_bytes=100)
    store.put_fact("globex", "kb", "g", "y" * 90)  # another tenant, near its own limit
    clock.advance(1)
    store.put_fact("acme", "kb", "small", "s" * 5)  # 10 bytes with its key
    clock.advance(1)
    store.put_fact("acme", "kb", "big", "b" * 47)  # 50
    clock.advance(1)
    store.put_fact("acme", "kb", "mid", "m" * 57)  # 60: the tenant is over by 20
    # Oldest first: "big" goes, and "small", older still, goes with it (not kept for fitting).
    assert store.fact("acme", "kb", "mid") == "m" * 57
    assert store.fact("acme", "kb", "big") is None
    assert store.fact("acme", "kb", "small") is None
    assert store.fact("globex", "kb", "g") == "y" * 90
    stats = store.stats()
    assert stats.bytes["facts"] == 60 + 91
    assert stats.evicted["facts"] == 2


def test_the_word_index_follows_every_put_rewrite_and_eviction(
    open_store: StoreFactory, clock: FakeClock, db_path: Path
) -> None:
    store = open_store(facts_per_tenant=3)
    for n in range(6):
        store.put_fact("acme", "kb", f"k{n}", f"shared word{n}")
        clock.advance(1)
    store.put_fact("acme", "kb", "k5", "rewritten")  # a REPLACE: its old words leave the index
    assert [k for k, _ in store.search_facts("acme", "kb", "shared", 10)] == ["k4", "k3"]
    assert store.search_facts("acme", "kb", "word5", 10) == []
    assert store.search_facts("acme", "kb", "word1", 10) == []  # evicted, and gone from the index
    assert store.search_facts("acme", "kb", "REWRITTEN", 10) == [("k5", "rewritten")]
    db = sqlite3.connect(db_path)
    assert db.execute("SELECT count(*) FROM fact_words").fetchone() == (3,)
    assert (
        db.execute("SELECT count, size FROM fact_totals WHERE tenant='acme'").fetchone()
        == db.execute("SELECT count(*), sum(size) FROM facts WHERE tenant='acme'").fetchone()
    )


def test_words_are_found_across_scripts_and_underscores_but_never_across_namespaces(
    store: SqliteStore,
) -> None:
    store.put_fact("acme", "kb", "crème", "café_au_lait Größe")
    store.put_fact("acme", "kb2", "other", "café_au_lait")
    store.put_fact("acme b", "kb", "spaced", "café_au_lait")  # scope tokens cannot run together
    assert store.search_facts("acme", "kb", "CAFÉ_AU_LAIT größe", 10) == [("crème", "café_au_lait Größe")]
    assert store.search_facts("acme", "kb", "cafe", 10) == []  # an accent is part of the word
    assert store.search_facts("acme", "kb", 'or "AND" NOT * crème', 10) == [("crème", "café_au_lait Größe")]


def test_a_store_written_before_the_word_index_is_indexed_when_opened(
    db_path: Path, open_store: StoreFactory
) -> None:
    db_path.parent.mkdir(parents=True)
    old = sqlite3.connect(db_path)
    old.executescript(
        "CREATE TABLE facts (tenant TEXT NOT NULL, namespace TEXT NOT NULL, key TEXT NOT NULL, "
        "text TEXT NOT NULL, size INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (tenant, namespace, key));"
        "INSERT INTO facts VALUES ('acme', 'hr', 'leave', '25 days a year', 19, 1.0);"
    )
    old.commit()
    old.close()
    store = open_store(facts_per_tenant=1)
    assert store.search_facts("acme", "hr", "days", 5) == [("leave", "25 days a year")]
    store.put_fact("acme", "hr", "sick", "10 days")  # the backfilled totals count the old fact
    assert store.search_facts("acme", "hr", "days", 5) == [("sick", "10 days")]


# --- durability and stats -------------------------------------------------------------


def test_everything_survives_a_restart(open_store: StoreFactory, clock: FakeClock) -> None:
    first = open_store()
    first.append_session("acme", "clerk", "s1", [said("user", "remember me"), said("assistant", "ok")])
    first.put_context("acme", "req_1", "finding", {"widgets": 42})
    first.put_fact("acme", "hr", "leave", "25 days a year")
    first.close()
    clock.advance(10)
    second = open_store()  # what a restarted memory service does
    assert second.session("acme", "clerk", "s1") == [said("user", "remember me"), said("assistant", "ok")]
    assert second.context("acme", "req_1") == {"finding": {"widgets": 42}}
    assert second.fact("acme", "hr", "leave") == "25 days a year"
    assert second.search_facts("acme", "hr", "leave", 5) == [("leave", "25 days a year")]
    stats = second.stats()
    assert stats.items == {"sessions": 2, "context": 1, "facts": 1}
    assert stats.evicted == {"sessions": 0, "context": 0, "facts": 0}


def test_stats_reports_items_and_bytes_per_store(store: SqliteStore) -> None:
    empty = store.stats()
    assert empty.items == {"sessions": 0, "context": 0, "facts": 0}
    assert empty.bytes == {"sessions": 0, "context": 0, "facts": 0}
    assert empty.evicted == {"sessions": 0, "context": 0, "facts": 0}
    turns = [said("user", "hello"), said("assistant", "héllo back")]
    store.append_session("acme", "clerk", "s1", turns)
    store.append_session("globex", "clerk", "s1", [said("user", "x")])
    store.put_context("acme", "req_1", "a", [1, 2, 3])
    store.put_fact("acme", "kb", "key", "text")
    store.put_fact("globex", "kb", "other", "more text")
    stats = store.stats()
    assert stats.items == {"sessions": 3, "context": 1, "facts": 2}
    assert stats.bytes == {
        "sessions": sum(stored_size(t) for t in [*turns, said("user", "x")]),
        "context": len("[1,2,3]"),
        "facts": len("keytext") + len("othermore text"),
    }


def test_history_read_back_starts_at_a_question(open_store: StoreFactory) -> None:
    store = open_store(session_max_messages=3)
    turn = [said("user", "q1"), {"role": "assistant", "content": None, "tool_calls": []}]
    store.append_session("acme", "clerk", "s1", [*turn, said("tool", "result"), said("assistant", "a1")])
    # Eviction kept [tool, assistant]: no question before them, so nothing is replayed.
    assert store.session("acme", "clerk", "s1") == []
    store.append_session("acme", "clerk", "s1", [said("user", "q2"), said("assistant", "a2")])
    assert store.session("acme", "clerk", "s1") == [said("user", "q2"), said("assistant", "a2")]


def test_artifacts_over_the_total_cap_release_the_oldest_request_trees() -> None:
    from serve.memory.service import MemoryService
    from tests.unit.conftest import run

    service = MemoryService.__new__(MemoryService)  # its artifact table only: no store, no Ray
    service._limits = MemoryLimits(artifact_max_bytes=60, artifacts_total_max_bytes=100)
    service._artifacts = {}

    async def scenario() -> None:
        assert await service.put_artifact("acme", "tree_1", "a", [], 50) is None
        assert await service.put_artifact("acme", "tree_2", "b", [], 40) is None
        assert "exceed 60 bytes" in (await service.put_artifact("acme", "tree_2", "c", [], 30) or "")
        assert await service.put_artifact("beta", "tree_3", "c", [], 30) is None  # 120 > 100: tree_1 goes
        assert await service.artifacts("acme", "tree_1") == {}
        assert await service.artifacts("acme", "tree_2") == {"b": 40}
        assert await service.artifacts("beta", "tree_3") == {"c": 30}

    run(scenario())
