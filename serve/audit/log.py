"""The audit log: one append-only, hash-chained JSON line per policy decision.

Each record carries ``seq`` (its index), ``prev`` (the previous record's hash) and
``hash`` = HMAC-SHA256 (audit key) over the canonical JSON of everything else. Editing,
deleting, reordering or inserting a record breaks the chain at that index, and without
the key nobody can re-chain a forged record. Deleting the tail
leaves a valid chain, so each commit also rewrites a checkpoint (record count and last
hash, HMAC'd with the audit key): ``verify`` finds a truncated tail against it.

Writers serialise through an exclusive ``flock`` and re-read the tail when another
writer moved it, so two processes appending to one file still form one chain. Each
batch is fsync'ed before ``append`` returns (group commit).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.canonical import canonical
from serve.errors import ConfigError

__all__ = ["GENESIS", "AuditLog", "Verification", "audit_key", "digest", "verify"]

GENESIS = "0" * 64
CHAIN_FIELDS = ("seq", "prev", "hash")


def record_hash(key: bytes, record: dict[str, Any]) -> str:
    """HMAC-SHA256 with the audit key: without the key, a forged record cannot be chained."""
    body = canonical({k: v for k, v in record.items() if k != "hash"})
    return hmac.new(key, body, hashlib.sha256).hexdigest()


def digest(key: bytes, sha256_hex: str) -> str:
    """The stored digest of a policy input: keyed, so a guessable input cannot be confirmed."""
    return hmac.new(key, sha256_hex.encode(), hashlib.sha256).hexdigest()


def _checkpoint_mac(key: bytes, count: int, last: str) -> str:
    return hmac.new(key, f"{count}:{last}".encode(), hashlib.sha256).hexdigest()


def audit_key(path: Path, explicit: str | None = None, *, create: bool = True) -> bytes:
    """The log's key: ``FLEET_AUDIT_KEY`` if set, else ``<log>.key`` (made on first use)."""
    if explicit:
        return explicit.encode()
    key_file = path.with_name(path.name + ".key")
    if key_file.exists() or not create:
        try:
            key = key_file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the audit key: {exc.strerror}", file=str(key_file)) from None
        if not key:
            raise ConfigError("the audit key is empty", file=str(key_file))
        return key
    key_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = key_file.with_name(f"{key_file.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_hex(32).encode())
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, key_file)  # atomic, and never replaces a key another writer made first
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return key_file.read_bytes()


class AuditLog:
    """Appends records to one chained file; safe across threads and processes."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self.checkpoint = path.with_name(path.name + ".checkpoint")
        self._key = key
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
        self._size = -1
        self._seq = 0
        self._last = GENESIS

    def close(self) -> None:
        os.close(self._fd)

    def append(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chain, write and fsync ``records``, then the checkpoint; returns them chained."""
        chained = self.write(records)
        self.seal()
        return chained

    def write(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chain, write and fsync ``records``; returns them with seq, prev and hash.

        The log stays locked until :meth:`seal` rewrites the checkpoint (a verifier waits
        for both): a writer can acknowledge the records in between."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            self._sync_tail()
            seq, last, chained, lines = self._seq, self._last, [], []
            for record in records:
                body = {k: v for k, v in record.items() if k not in CHAIN_FIELDS}
                body.update(seq=seq, prev=last)
                body["hash"] = last = record_hash(self._key, body)
                seq += 1
                chained.append(body)
                lines.append(canonical(body) + b"\n")
            data = memoryview(b"".join(lines))
            try:
                while data:  # a short write (disk nearly full) goes on where it stopped
                    data = data[os.write(self._fd, data) :]
                os.fdatasync(self._fd)  # the data and the size that reaches it
            except OSError:
                self._size = -1  # the next write re-reads the tail (and drops a torn line)
                raise
            self._size, self._seq, self._last = os.fstat(self._fd).st_size, seq, last
            return chained
        except BaseException:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # nothing new is on disk: the checkpoint stands
            raise

    def seal(self) -> None:
        """Rewrite the checkpoint for what is on disk and unlock the log."""
        try:
            self._write_checkpoint()
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _sync_tail(self) -> None:
        size = os.fstat(self._fd).st_size
        if size == self._size:
            return
        last_line, end = _last_line(self._fd, size)
        if end != size:  # a writer died mid-line: that record was never acknowledged
            os.ftruncate(self._fd, end)
        self._size = end
        if last_line is None:
            self._seq, self._last = 0, GENESIS
        else:
            record = json.loads(last_line)
            self._seq, self._last = record["seq"] + 1, record["hash"]

    def _write_checkpoint(self) -> None:
        body = {
            "count": self._seq,
            "hash": self._last,
            "mac": _checkpoint_mac(self._key, self._seq, self._last),
        }
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        with tmp.open("wb") as f:
            f.write(canonical(body))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.checkpoint)


def _last_line(fd: int, size: int) -> tuple[bytes | None, int]:
    """The last complete line and the offset just after it."""
    block, pos, tail = 1 << 16, size, b""
    while pos > 0:
        step = min(block, pos)
        pos -= step
        tail = os.pread(fd, step, pos) + tail
        end = tail.rfind(b"\n")
        if end < 0:
            continue
        start = tail.rfind(b"\n", 0, end)
        if start >= 0 or pos == 0:
            return tail[start + 1 : end], pos + end + 1
    return None, 0


@dataclass(frozen=True)
class Verification:
    ok: bool
    records: int
    first_bad: int | None = None
    problem: str = ""


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        yield from f


def verify(path: Path, key: bytes) -> Verification:
    """Walk the chain; report the first record where it breaks, or a truncated tail."""
    if not path.exists():
        raise ConfigError("no audit log here", file=str(path))
    with path.open("rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)  # a live writer finishes its batch (and checkpoint) first
        prev, count = GENESIS, 0
        for index, line in enumerate(_lines(path)):
            problem = _check(line, index, prev, key)
            if problem:
                return Verification(False, index, index, problem)
            record = json.loads(line)
            prev, count = record["hash"], index + 1
        return _check_checkpoint(path, key, count, prev)


def _check(line: bytes, index: int, prev: str, key: bytes) -> str:
    if not line.endswith(b"\n"):
        return "incomplete record (no line end)"
    try:
        record = json.loads(line)
    except ValueError:
        return "not a JSON record"
    if not isinstance(record, dict) or any(k not in record for k in CHAIN_FIELDS):
        return "not an audit record"
    if record["seq"] != index:
        return f"sequence number {record['seq']} where {index} belongs (deleted, inserted or reordered)"
    if record["prev"] != prev:
        return "does not follow the previous record (deleted, inserted or reordered)"
    if not hmac.compare_digest(record_hash(key, record), str(record["hash"])):
        return "contents do not match the record's hash (modified)"
    return ""


def _check_checkpoint(path: Path, key: bytes, count: int, last: str) -> Verification:
    checkpoint = path.with_name(path.name + ".checkpoint")
    try:
        mark = json.loads(checkpoint.read_bytes())
    except (OSError, ValueError):
        return Verification(False, count, count, "checkpoint missing or unreadable")
    if not hmac.compare_digest(
        str(mark.get("mac", "")), _checkpoint_mac(key, mark.get("count", -1), mark.get("hash", ""))
    ):
        return Verification(
            False, count, None, "checkpoint signature is wrong (checkpoint modified or wrong key)"
        )
    if mark["count"] > count:
        return Verification(False, count, count, f"log truncated: the checkpoint has {mark['count']} records")
    if mark["count"] < count:
        return Verification(
            False, count, mark["count"], "records after the last checkpoint (appended outside the writer)"
        )
    if mark["hash"] != last:
        return Verification(False, count, count - 1, "last record differs from the checkpoint")
    return Verification(True, count)
