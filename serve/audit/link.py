"""The wire between a replica's audit client and the writer: length-prefixed msgpack frames."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack  # type: ignore[import-untyped]

__all__ = ["Link", "read_frame", "serve_link", "write_frame"]

log = logging.getLogger("fleet.audit")

MAX_FRAME = 256 << 20  # one batch: far more than a replica queues between two ships


async def read_frame(reader: asyncio.StreamReader, limit: int = MAX_FRAME) -> Any:
    size = int.from_bytes(await reader.readexactly(4), "big")
    if size > limit:
        raise ValueError(f"frame of {size} bytes over the limit of {limit}")
    return msgpack.unpackb(await reader.readexactly(size))


def write_frame(writer: asyncio.StreamWriter, item: Any) -> None:
    payload = msgpack.packb(item)
    writer.write(len(payload).to_bytes(4, "big") + payload)


Append = Callable[[list[dict[str, Any]], list[dict[str, Any]]], Awaitable[int]]


async def serve_link(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str, append: Append
) -> None:
    """One replica's connection: its token, then batches in turn, each answered with the
    count written once durable (or the error that kept it from the disk)."""
    try:
        first = await read_frame(reader, limit=1024)
        if not isinstance(first, str) or not secrets.compare_digest(first, token):
            log.warning("audit link refused: wrong token")
            return
        while True:
            records, events = await read_frame(reader)
            try:
                write_frame(writer, {"count": await append(records, events)})
            except Exception as exc:
                write_frame(writer, {"error": f"{type(exc).__name__}: {exc}"})
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the replica went away or gave up on this connection; it re-sends elsewhere
    except Exception as exc:  # not a replica speaking this protocol
        log.warning("audit link closed: %s", exc)
    finally:
        writer.close()


class Link:
    """A replica's connection to the writer: one batch out, its acknowledgement back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self.loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, host: str, port: int, token: str) -> Link:
        reader, writer = await asyncio.open_connection(host, port)
        write_frame(writer, token)
        return cls(reader, writer)

    async def send(self, records: list[dict[str, Any]], events: list[dict[str, Any]]) -> int:
        write_frame(self._writer, [records, events])
        await self._writer.drain()
        reply = await read_frame(self._reader)
        if "error" in reply:
            raise OSError(f"the audit writer could not write: {reply['error']}")
        count: int = reply["count"]
        return count

    def close(self) -> None:
        """Safe from any thread: a link is its own loop's."""
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._writer.close)
