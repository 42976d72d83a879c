"""Helpers for testing agents and policies without a cluster."""

from __future__ import annotations

from typing import Any

__all__ = ["MemorySink"]


class MemorySink:
    """An audit sink that keeps what it is given (replicas ship to the audit service)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
