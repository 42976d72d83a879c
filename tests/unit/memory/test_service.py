"""serve.memory.service.MemoryService without Ray: its store works on a thread of its own."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from serve.memory.service import MemoryService
from serve.memory.store import MemoryLimits
from tests.unit.conftest import run


class Blocking:
    """The service's store, whose ``put_fact`` waits for :attr:`release` (a slow disk)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.release = threading.Event()
        self.threads: set[str] = set()

    def put_fact(self, *args: Any) -> None:
        self.threads.add(threading.current_thread().name)
        if not self.release.wait(timeout=30):
            raise TimeoutError("never released")
        self._store.put_fact(*args)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._store, name)

        def called(*args: Any) -> Any:
            self.threads.add(threading.current_thread().name)
            return method(*args)

        return called


def test_a_slow_store_write_does_not_hold_up_the_replicas_loop(tmp_path: Path) -> None:
    service = MemoryService(str(tmp_path / "memory.db"), MemoryLimits())
    store = Blocking(service._store)
    service._store = store  # type: ignore[assignment]

    async def scenario() -> None:
        write = asyncio.create_task(service.put_fact("acme", "kb", "k", "the release is on Friday"))
        await asyncio.sleep(0)
        # The loop answers (what it holds itself, and the store's next call is queued
        # behind the write on the store's thread, in order) while the write waits.
        assert await service.artifacts("acme", "req_1") == {}
        search = asyncio.create_task(service.search_facts("acme", "kb", "friday", 5))
        await asyncio.sleep(0.05)
        assert not write.done() and not search.done()
        store.release.set()
        assert await write is None
        assert await search == [("k", "the release is on Friday")]  # after the write: in order

    run(asyncio.wait_for(scenario(), timeout=20))
    assert store.threads and all(name.startswith("fleet-memory-store") for name in store.threads)
