"""The audit log: the chain verifies, and every kind of tampering is found at its index."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from serve.audit.log import AuditLog, audit_key, verify
from serve.errors import ConfigError

KEY = b"k" * 32


def write(path: Path, n: int) -> None:
    log = AuditLog(path, KEY)
    for i in range(0, n, 3):
        log.append([{"request_id": f"r{j}", "outcome": "allow"} for j in range(i, min(i + 3, n))])
    log.close()


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def rewrite(path: Path, new: list[bytes]) -> None:
    path.write_bytes(b"".join(new))


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    write(path, 10)
    return path


def test_an_untouched_log_verifies(log: Path) -> None:
    report = verify(log, KEY)
    assert (report.ok, report.records, report.first_bad) == (True, 10, None)


def test_modified_record(log: Path) -> None:
    rows = lines(log)
    rows[4] = rows[4].replace(b'"allow"', b'"deny"')
    rewrite(log, rows)
    report = verify(log, KEY)
    assert (report.ok, report.first_bad) == (False, 4)
    assert "modified" in report.problem


def test_modified_record_rehashed_without_the_key(log: Path) -> None:
    import hashlib

    rows = lines(log)
    record = json.loads(rows[4])
    record["outcome"] = "deny"
    body = json.dumps({k: v for k, v in record.items() if k != "hash"}, sort_keys=True, separators=(",", ":"))
    record["hash"] = hashlib.sha256(body.encode()).hexdigest()
    rows[4] = json.dumps(record).encode() + b"\n"
    rewrite(log, rows)
    assert verify(log, KEY).first_bad == 4


def test_deleted_record(log: Path) -> None:
    rows = lines(log)
    del rows[6]
    rewrite(log, rows)
    assert verify(log, KEY).first_bad == 6


def test_reordered_records(log: Path) -> None:
    rows = lines(log)
    rows[2], rows[3] = rows[3], rows[2]
    rewrite(log, rows)
    assert verify(log, KEY).first_bad == 2


def test_inserted_record(log: Path) -> None:
    rows = lines(log)
    rows.insert(5, rows[2])  # a genuine record, replayed at another place
    rewrite(log, rows)
    assert verify(log, KEY).first_bad == 5


def test_truncated_tail_is_found_against_the_checkpoint(log: Path) -> None:
    rewrite(log, lines(log)[:7])
    report = verify(log, KEY)
    assert (report.ok, report.first_bad) == (False, 7)
    assert "truncated" in report.problem


def test_forged_checkpoint_is_found(log: Path) -> None:
    rewrite(log, lines(log)[:7])
    checkpoint = log.with_name(log.name + ".checkpoint")
    mark = json.loads(checkpoint.read_bytes())
    mark["count"] = 7
    checkpoint.write_text(json.dumps(mark))
    assert "signature" in verify(log, KEY).problem


def test_wrong_key_does_not_verify(log: Path) -> None:
    assert not verify(log, b"other").ok


def test_a_torn_last_line_is_dropped_by_the_next_writer(log: Path) -> None:
    with log.open("ab") as f:
        f.write(b'{"request_id": "half')  # a writer died mid-record; it was never acknowledged
    assert verify(log, KEY).first_bad == 10
    AuditLog(log, KEY).append([{"request_id": "after"}])
    report = verify(log, KEY)
    assert (report.ok, report.records) == (True, 11)


def _writer(path: str, worker: int) -> None:
    log = AuditLog(Path(path), KEY)
    for i in range(25):
        log.append([{"request_id": f"w{worker}-{i}-{j}"} for j in range(4)])


def test_concurrent_writers_in_several_processes_form_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    report = verify(path, KEY)
    assert (report.ok, report.records) == (True, 4 * 25 * 4)
    ids = [json.loads(line)["request_id"] for line in lines(path)]
    assert len(set(ids)) == len(ids)


def test_audit_key_is_made_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "a" / "audit.jsonl"
    key = audit_key(path)
    assert audit_key(path) == key and len(key) == 64
    assert (path.with_name("audit.jsonl.key").stat().st_mode & 0o777) == 0o600
    assert audit_key(path, "from-env") == b"from-env"


def test_verifying_a_missing_log_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no audit log"):
        verify(tmp_path / "none.jsonl", KEY)
