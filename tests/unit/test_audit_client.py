"""The replica side of the audit log: nothing queued is lost, commit waits for durability."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve.audit_service import AuditClient, AuditUnavailable
from tests.unit.conftest import run


class FlakyService:
    """Stands in for the audit deployment's handle: fails the first ``failures`` calls."""

    def __init__(self, failures: int = 0, delay: float = 0.0) -> None:
        self.failures, self.delay = failures, delay
        self.stored: list[dict[str, Any]] = []
        self.append = self  # handle.append.remote(...)

    async def remote(self, records: list[dict[str, Any]], events: list[dict[str, Any]]) -> int:
        await asyncio.sleep(self.delay)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("replica restarting")
        self.stored += records + events
        return len(records)


def test_commit_waits_until_records_are_stored_even_through_failures() -> None:
    service = FlakyService(failures=2)

    async def scenario() -> None:
        client = AuditClient(service, commit_timeout_s=5)  # type: ignore[arg-type]
        for i in range(5):
            client.append({"n": i})
        client.event({"kind": "outcome"})
        await client.commit()
        assert [x.get("n") for x in service.stored] == [0, 1, 2, 3, 4, None]  # in order

    run(scenario())


def test_a_cancelled_shipper_loses_nothing() -> None:
    service = FlakyService(delay=0.05)

    async def scenario() -> None:
        client = AuditClient(service, commit_timeout_s=5)  # type: ignore[arg-type]
        client.append({"n": 1})
        client.ship()
        await asyncio.sleep(0.01)
        assert client._task is not None
        client._task.cancel()  # e.g. the replica's loop tears a task down mid-call
        await asyncio.sleep(0.01)
        client.append({"n": 2})
        await client.commit()
        assert [x["n"] for x in service.stored] == [1, 2]

    run(scenario())


def test_commit_gives_up_with_503_when_the_log_cannot_be_written() -> None:
    service = FlakyService(failures=10**6)

    async def scenario() -> None:
        client = AuditClient(service, commit_timeout_s=0.2)  # type: ignore[arg-type]
        client.append({"n": 1})
        with pytest.raises(AuditUnavailable) as err:
            await client.commit()
        assert err.value.status == 503

    run(scenario())


def test_stragglers_ship_on_their_own_within_the_linger_time() -> None:
    service = FlakyService()

    async def scenario() -> None:
        client = AuditClient(service, commit_timeout_s=5, linger_s=0.02)  # type: ignore[arg-type]
        client.event({"kind": "outcome"})  # queued after the request's commit: nobody waits for it
        assert service.stored == []
        await asyncio.sleep(0.2)
        assert service.stored == [{"kind": "outcome"}]

    run(scenario())
