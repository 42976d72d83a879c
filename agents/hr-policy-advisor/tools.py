"""HR tools: a ranked handbook search and leave balances over bundled data."""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from pathlib import Path
from typing import Annotated

from pydantic import Field

from serve.tools import tool

HERE = Path(__file__).parent
_WORD = re.compile(r"[a-z0-9]+")


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


@tool
def leave_balance(
    employee_id: Annotated[str, Field(pattern=r"^E\d{4}$", description="Employee id, e.g. E1001.")],
) -> dict[str, object]:
    """Annual leave of an employee: entitlement, carried over, taken, pending, remaining."""
    with (HERE / "employees.csv").open(encoding="utf-8") as f:
        row = next((r for r in csv.DictReader(f) if r["employee_id"] == employee_id), None)
    if row is None:
        raise LookupError(f"no employee {employee_id}")
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
