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
