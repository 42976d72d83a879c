"""Governance as the loop sees it (:class:`serve.governance.guard.AgentGuard` implements it)."""

from __future__ import annotations

from typing import Any, Protocol

from serve.context import Context
from serve.errors import BudgetExceeded
from serve.governance.decisions import Refusal
from serve.steps import Step

__all__ = ["Guard"]


class Guard(Protocol):
    """Governance as the loop sees it (:class:`serve.governance.guard.AgentGuard`).

    Every decision is awaited (the policy engine may be a server); a step is not a
    decision and is recorded without waiting."""

    holds_output: bool
    halts_on_pii: bool  # the model stops at an answer's first PII (its manifest blocks PII)

    async def model_input(self, ctx: Context, messages: list[dict[str, Any]], turn: int) -> None: ...

    async def model_output(self, ctx: Context, text: str, turn: int) -> str: ...

    async def tool(self, ctx: Context, name: str, arguments: str) -> Refusal | None:
        """None: the call may run; a Refusal: what the model is told. Raises
        :class:`~serve.errors.ApprovalRequired` when the call needs a human's approval."""

    async def delegation(self, ctx: Context, target: str, target_scopes: list[str]) -> Refusal | None:
        """As :meth:`tool`, for a delegation."""

    async def result(self, ctx: Context, name: str, text: str, classes: list[str]) -> str: ...

    async def budget(self, ctx: Context, short: BudgetExceeded) -> bool:
        """Whether a model call may overdraw the budget that cannot cover it."""

    def step(self, ctx: Context, step: Step) -> None: ...
