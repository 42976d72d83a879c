"""Tools for the integration tests: plain, LangChain, failing and slow ones.

The doubles are serve.testing's: ``load_tools`` takes every tool among this module's
names, so the ones imported here are this agent's as much as the ones defined here.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from langchain_core.tools import tool as langchain_tool

from serve.testing import CANARY_CARD, CANARY_EMAIL, CANARY_SSN, add, echo, failing_tool, slow
from serve.tools import tool

__all__ = ["PROFILE", "add", "echo", "fail", "multiply", "profile", "slow", "stall_transfer", "transfer"]


@langchain_tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


fail = failing_tool("fail")

# A record full of PII, for the redaction tests (test_governance_http.py lists its canaries).
PROFILE = f"Dana Canary, {CANARY_EMAIL}, SSN {CANARY_SSN}, card {CANARY_CARD}"


@tool
def profile() -> str:
    """The customer's profile."""
    return PROFILE


def _record_run(tool: str, **fields: object) -> None:
    """A gated tool's run, one line in $FLEET_TEST_RUNS: the approvals tests count them."""
    runs = os.environ.get("FLEET_TEST_RUNS")
    if runs:
        line = json.dumps({"tool": tool, "pid": os.getpid(), "time": time.time(), **fields})
        with Path(runs).open("a", encoding="utf-8") as f:
            f.write(line + "\n")


@tool
def transfer(amount: int, note: str = "") -> str:
    """Move money (needs a person's approval each time)."""
    _record_run("transfer", amount=amount, note=note)
    return f"moved {amount}"


@tool
async def stall_transfer(amount: int) -> str:
    """Move money slowly: long enough for its replica to be killed while it runs."""
    _record_run("stall_transfer", amount=amount)
    import asyncio

    await asyncio.sleep(60)
    return f"moved {amount} slowly"
