"""Governance as the loop sees it (:class:`serve.governance.guard.AgentGuard` implements it)."""

from __future__ import annotations

from typing import Any, Protocol

from serve.context import Context
from serve.governance.decisions import Refusal

__all__ = ["Guard"]


class Guard(Protocol):
    """Governance as the loop sees it (:class:`serve.governance.guard.AgentGuard`)."""

    holds_output: bool

    def model_input(self, ctx: Context, messages: list[dict[str, Any]], turn: int) -> None: ...

    def model_output(self, ctx: Context, text: str, turn: int) -> str: ...

    def tool(self, ctx: Context, name: str, arguments: str) -> Refusal | None: ...

    def delegation(self, ctx: Context, target: str, target_scopes: list[str]) -> Refusal | None: ...

    def result(self, ctx: Context, name: str, text: str, classes: list[str]) -> str: ...

    def event(self, ctx: Context, kind: str, **fields: Any) -> None: ...
