"""Tools for the integration tests: plain, LangChain, failing and slow ones.

The doubles are serve.testing's: ``load_tools`` takes every tool among this module's
names, so the ones imported here are this agent's as much as the ones defined here.
"""

from __future__ import annotations

from langchain_core.tools import tool as langchain_tool

from serve.testing import CANARY_CARD, CANARY_EMAIL, CANARY_SSN, add, echo, failing_tool, slow
from serve.tools import tool

__all__ = ["PROFILE", "add", "echo", "fail", "multiply", "profile", "slow"]


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
