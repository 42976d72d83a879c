"""Tools for the integration tests: plain, LangChain, failing and slow ones."""

from __future__ import annotations

import asyncio

from langchain_core.tools import tool as langchain_tool

from serve.tools import tool


@tool
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@tool
async def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@langchain_tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


@tool
def fail() -> str:
    """Always raises."""
    raise RuntimeError("disk on fire")


@tool
async def slow() -> str:
    """Takes longer than its timeout."""
    await asyncio.sleep(5)
    return "too late"


# A record full of PII, for the redaction tests (the canaries are in the test module).
PROFILE = "Dana Canary, dana.canary@example.org, SSN 219-09-9999, card 4000 0566 5566 5556"


@tool
def profile() -> str:
    """The customer's profile."""
    return PROFILE
