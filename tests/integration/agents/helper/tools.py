"""The helper's one tool: gated, so that a delegate's turn parks (test_approvals_http)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from serve.tools import tool

__all__ = ["file_ticket"]


@tool
def file_ticket(title: str) -> str:
    """File a ticket (needs a person's approval)."""
    runs = os.environ.get("FLEET_TEST_RUNS")
    if runs:
        line = json.dumps({"tool": "file_ticket", "pid": os.getpid(), "time": time.time(), "title": title})
        with Path(runs).open("a", encoding="utf-8") as f:
            f.write(line + "\n")
    return f"ticket filed: {title}"
