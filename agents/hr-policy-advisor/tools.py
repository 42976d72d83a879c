"""HR tools: a ranked handbook search, leave balances over bundled data, and leave requests
(gated: each waits for a person's approval, as the manifest says)."""

from __future__ import annotations

import csv
import hashlib
import math
import re
from collections import Counter
from datetime import date
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field

from serve.tools import tool

HERE = Path(__file__).parent
_WORD = re.compile(r"[a-z0-9]+")


def _calendar_date(text: str) -> str:
    date.fromisoformat(text)  # 2026-02-30 has the shape of a date but is none
    return text


EmployeeId = Annotated[str, Field(pattern=r"^E\d{4}$", description="Employee id, e.g. E1001.")]


def _sections() -> list[tuple[str, str]]:
    sections: list[tuple[str, str]] = []
    for block in (HERE / "handbook.md").read_text(encoding="utf-8").split("\n# "):
        title, _, body = block.lstrip("# ").partition("\n")
        sections.append((title.strip(), " ".join(body.split())))
    return sections


SECTIONS = _sections()


def _terms(text: str) -> list[str]:
    return [w.rstrip("s") for w in _WORD.findall(text.lower()) if len(w) > 2]


def _bm25(query: str, k1: float = 1.5, b: float = 0.75) -> list[tuple[float, int]]:
    docs = [_terms(title + " " + body) for title, body in SECTIONS]
    avg = sum(map(len, docs)) / len(docs)
    scores = []
    for i, doc in enumerate(docs):
        tf = Counter(doc)
        score = 0.0
        for term in set(_terms(query)):
            df = sum(1 for d in docs if term in d)
            if not tf[term]:
                continue
            idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
            score += idf * tf[term] * (k1 + 1) / (tf[term] + k1 * (1 - b + b * len(doc) / avg))
        scores.append((score, i))
    return sorted(scores, reverse=True)


@tool
def search_handbook(
    query: Annotated[str, Field(min_length=2, description="What to look for.")],
    top_k: Annotated[int, Field(ge=1, le=5, description="How many sections to return.")] = 2,
) -> list[dict[str, object]]:
    """Search the HR handbook; returns the best matching sections, best first."""
    hits = [(s, i) for s, i in _bm25(query) if s > 0][:top_k]
    return [{"section": SECTIONS[i][0], "text": SECTIONS[i][1], "score": round(s, 3)} for s, i in hits]


def _employee(employee_id: str) -> dict[str, str]:
    with (HERE / "employees.csv").open(encoding="utf-8") as f:
        row = next((r for r in csv.DictReader(f) if r["employee_id"] == employee_id), None)
    if row is None:
        raise LookupError(f"no employee {employee_id}")
    return row


@tool
def leave_balance(employee_id: EmployeeId) -> dict[str, object]:
    """Annual leave of an employee: entitlement, carried over, taken, pending, remaining."""
    row = _employee(employee_id)
    entitlement = int(row["annual_leave_days"])
    carried = min(int(row["carried_over_days"]), 5)  # handbook: carry-over is capped at 5
    taken, pending = int(row["taken_days"]), int(row["pending_days"])
    remaining = entitlement + carried - taken - pending
    return {
        "employee_id": employee_id,
        "entitlement_days": entitlement,
        "carried_over_days": carried,
        "taken_days": taken,
        "pending_days": pending,
        "remaining_days": remaining,
        "overdrawn": remaining < 0,
    }


@tool
def request_leave(
    employee_id: EmployeeId,
    days: Annotated[int, Field(ge=1, le=30, description="Working days of annual leave.")],
    start_date: Annotated[
        str,
        Field(pattern=r"^\d{4}-\d{2}-\d{2}$", description="First day of leave, YYYY-MM-DD."),
        AfterValidator(_calendar_date),
    ],
) -> str:
    """File an annual leave request for an employee; the employee's manager signs it off."""
    _employee(employee_id)
    # The same request gets the same number: a demo's answers do not change between runs.
    digest = hashlib.sha256(f"{employee_id}:{days}:{start_date}".encode()).digest()
    number = int.from_bytes(digest[:4], "big") % 10_000
    plural = "day" if days == 1 else "days"
    return (
        f"leave request LR-{number:04d} filed: {employee_id}, {days} {plural} from {start_date}; "
        "pending the manager's sign-off"
    )
