"""The replica side of the audit log: nothing queued is lost, commit waits for durability."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from serve.audit.client import AuditClient
from serve.audit.link import serve_link
from serve.errors import AuditUnavailable
from serve.testing import wait_until_async
from tests.unit.conftest import run


class FlakyService:
    """Stands in for the audit deployment: a real link server whose writes fail the first
    ``failures`` times. Like the writer, it stores each record once (a re-sent batch is
    not a duplicate). ``hold``: writes wait for :attr:`release` (:attr:`entered` is set
    when one arrives)."""

    def __init__(self, failures: int = 0, hold: bool = False) -> None:
        self.failures = failures
        self.entered, self.release = asyncio.Event(), asyncio.Event()
        if not hold:
            self.release.set()
        self.stored: list[dict[str, Any]] = []
        self.address = self  # handle.address.remote()
        self.append = SimpleNamespace(remote=self.relay)  # handle.append.remote(): the service relays
        self.relayed = 0
        self._server: asyncio.Server | None = None
        self._connections: list[asyncio.StreamWriter] = []

    async def remote(self) -> tuple[str, int, str]:
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return "127.0.0.1", self._server.sockets[0].getsockname()[1], "secret"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.append(writer)
        await serve_link(reader, writer, "secret", self.store)

    def restart(self) -> None:
        """The writer dies with its connections; the next one listens elsewhere."""
        assert self._server is not None
        self._server.close()
        for writer in self._connections:
            writer.close()
        self._server, self._connections = None, []

    async def relay(self, records: list[dict[str, Any]], events: list[dict[str, Any]]) -> int:
        self.relayed += len(records) + len(events)
        return await self.store(records, events)

    async def store(self, records: list[dict[str, Any]], events: list[dict[str, Any]]) -> int:
        self.entered.set()
        await self.release.wait()
        if self.failures:
            self.failures -= 1
            raise OSError("disk full")
        self.stored += [r for r in records if r not in self.stored] + events
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
    service = FlakyService(hold=True)

    async def scenario() -> None:
        client = AuditClient(service, commit_timeout_s=5)  # type: ignore[arg-type]
        client.append({"n": 1})
        client.ship()
        await wait_until_async(service.entered.is_set)  # the batch is at the writer, unanswered
        assert client._task is not None
        client._task.cancel()  # e.g. the replica's loop tears a task down mid-call
        await wait_until_async(client._task.done)
        service.release.set()  # the writer stores the batch the cancelled shipper sent
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
        await wait_until_async(lambda: service.stored == [{"kind": "outcome"}], timeout_s=0.2)

    run(scenario())


def test_records_made_while_carrying_are_handed_over_not_queued() -> None:
    service = FlakyService()

    async def scenario() -> None:
        ingress = AuditClient(service, commit_timeout_s=5)  # type: ignore[arg-type]
        agent = AuditClient(service, commit_timeout_s=5)  # type: ignore[arg-type]
        with ingress.carrying() as carried:
            ingress.append({"n": "admission"})
        ingress.event({"kind": "outcome"})  # after the carry: queued as usual
        assert carried.records == [{"n": "admission"}] and not ingress._records
        agent.adopt(carried)  # the agent ships them first, with its own
        with agent.carrying() as delegate:  # a delegate hands its records and steps back
            agent.append({"n": "delegate decision"})
            agent.event({"kind": "model_call"})
        assert agent._records == [{"n": "admission"}] and not agent._events  # nothing of the carry queued
        agent.append({"n": "model_input"})
        agent.adopt(delegate)
        await agent.commit()
        assert [x.get("n", x.get("kind")) for x in service.stored] == [
            "admission", "model_input", "delegate decision", "model_call",
        ]  # fmt: skip
        await ingress.commit()
        assert service.stored[-1] == {"kind": "outcome"}

    run(scenario())


def _record(decision_id: str) -> dict[str, Any]:
    """A decision as a replica ships it."""
    return {"request_id": "req_1", "decision_id": decision_id, "input_sha256": "00"}


def test_the_service_writes_each_decision_once_even_after_a_restart(tmp_path: Path) -> None:
    from serve.audit.log import audit_key, verify
    from serve.audit.service import AuditWriter

    log = tmp_path / "audit.jsonl"

    async def scenario() -> None:
        service = AuditWriter(str(log))
        # An ingress re-sends what it handed an agent that did not answer; the agent had it.
        await service.append([_record("dec_a"), _record("dec_b")], [])
        await service.append([_record("dec_a")], [])
        restarted = AuditWriter(str(log))
        await restarted.append([_record("dec_b"), _record("dec_c")], [])

    run(scenario())
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["decision_id"] for r in lines] == ["dec_a", "dec_b", "dec_c"]
    assert verify(log, audit_key(log, None)).ok


def test_a_record_that_is_not_a_decision_is_written_once_by_its_own_id(tmp_path: Path) -> None:
    """An approval step (serve/approvals/service.py) is chained as a record with a record_id."""
    from serve.audit.log import audit_key, verify
    from serve.audit.service import AuditWriter

    log = tmp_path / "audit.jsonl"
    step = {"request_id": "req_1", "kind": "approval", "event": "requested", "record_id": "rec_1"}

    async def scenario() -> None:
        writer = AuditWriter(str(log))
        await writer.append([dict(step), _record("dec_a")], [])
        await writer.append([dict(step)], [])  # sent again after a lost answer
        restarted = AuditWriter(str(log))
        await restarted.append([dict(step), {**step, "record_id": "rec_2"}], [])

    run(scenario())
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r.get("record_id") or r["decision_id"] for r in lines] == ["rec_1", "dec_a", "rec_2"]
    assert "input_digest" not in lines[0] and "input_digest" in lines[1]
    assert verify(log, audit_key(log, None)).ok


def test_a_failed_write_is_written_when_retried(tmp_path: Path) -> None:
    from serve.audit.service import AuditWriter

    log = tmp_path / "audit.jsonl"

    async def scenario() -> None:
        writer = AuditWriter(str(log))
        real = writer._log.write

        def full_disk(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
            raise OSError(28, "No space left on device")

        writer._log.write = full_disk  # type: ignore[method-assign]
        with pytest.raises(OSError):
            await writer.append([_record("dec_a")], [])
        writer._log.write = real  # type: ignore[method-assign]
        assert await writer.append([_record("dec_a")], []) == 1  # the client's retry is not a duplicate

    run(scenario())
    assert [json.loads(line)["decision_id"] for line in log.read_text().splitlines()] == ["dec_a"]


def test_a_restarted_writer_is_found_again() -> None:
    service = FlakyService()

    async def scenario() -> None:
        client = AuditClient(service, commit_timeout_s=5)  # type: ignore[arg-type]
        client.append({"n": 1})
        await client.commit()
        service.restart()
        client.append({"n": 2})
        await client.commit()  # the link is dead: the client asks the service again
        assert [x["n"] for x in service.stored] == [1, 2]

    run(scenario())


def test_the_writer_takes_batches_over_its_socket_only_with_its_token(tmp_path: Path) -> None:
    from serve.audit.link import write_frame
    from serve.audit.log import audit_key, verify
    from serve.audit.service import AuditWriter

    log = tmp_path / "audit.jsonl"

    async def scenario() -> None:
        writer = AuditWriter(str(log))
        service = SimpleNamespace(address=SimpleNamespace(remote=writer.address))  # the deployment's handle
        client = AuditClient(service, commit_timeout_s=5)  # type: ignore[arg-type]
        client.append(_record("dec_a"))
        await client.commit()
        host, port, token = await writer.address()
        reader, stranger = await asyncio.open_connection(host, port)
        write_frame(stranger, token[::-1])
        write_frame(stranger, [[_record("dec_forged")], []])
        await stranger.drain()
        assert await reader.read() == b""  # hung up on, unanswered
        reader, stranger = await asyncio.open_connection(host, port)
        stranger.write((1 << 31).to_bytes(4, "big"))  # "here come 2 GiB": not read, not kept
        await stranger.drain()
        assert await reader.read() == b""

    run(scenario())
    assert [json.loads(line)["decision_id"] for line in log.read_text().splitlines()] == ["dec_a"]
    assert verify(log, audit_key(log, None)).ok


def test_a_writer_port_out_of_reach_is_relayed_through_the_service() -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    service = FlakyService()

    async def unreachable() -> tuple[str, int, str]:
        return "127.0.0.1", closed, "secret"

    service.address = SimpleNamespace(remote=unreachable)  # type: ignore[assignment]

    async def scenario() -> None:
        client = AuditClient(service, commit_timeout_s=5)  # type: ignore[arg-type]
        client.append({"n": 1})
        client.event({"kind": "outcome"})
        await client.commit()
        assert service.stored == [{"n": 1}, {"kind": "outcome"}] and service.relayed == 2
        client.append({"n": 2})
        await client.commit()  # no new attempt on the port for a while
        assert service.relayed == 3 and client._link is None

    run(scenario())


def test_a_batch_written_as_the_loop_closes_is_still_sealed_and_unlocked(tmp_path: Path) -> None:
    """The checkpoint follows every write, even when its task is cancelled before it ran
    (before: about one loop in eight left the log locked), and a batch of duplicates
    rewrites no checkpoint (before: it raced the next writer's, without the lock)."""
    import fcntl

    from serve.audit.log import audit_key, verify
    from serve.audit.service import AuditWriter

    for attempt in range(30):
        log = tmp_path / f"audit-{attempt}.jsonl"

        async def scenario(path: Path = log) -> None:
            first = AuditWriter(str(path))
            await first.append([_record("dec_a"), _record("dec_b")], [])
            await first.append([_record("dec_a")], [])
            await AuditWriter(str(path)).append([_record("dec_c")], [])  # the loop ends right after

        run(scenario())
        with log.open("rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)  # BlockingIOError if still locked
        assert verify(log, audit_key(log, None)).ok
