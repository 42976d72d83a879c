"""Doubles of the ledger's Ray handle for unit tests: a real :class:`BudgetService` behind
methods whose ``.remote(...)`` returns an awaitable, as a deployment handle's do."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from serve.budget.service import BudgetService


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class _Method:
    def __init__(self, handle: FakeHandle, name: str) -> None:
        self._handle, self._name = handle, name

    def remote(self, *args: Any) -> Awaitable[Any]:
        self._handle.calls.append((self._name, args))
        return self._handle.answer(self._name, args)


class FakeHandle:
    """``handle.reserve.remote(...)`` and so on, answered by ``service`` (or by ``fail``:
    an exception to raise, or ``hang``: never answer)."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail: dict[str, BaseException] = {}
        self.hang: set[str] = set()

    def __getattr__(self, name: str) -> _Method:
        return _Method(self, name)

    async def answer(self, name: str, args: tuple[Any, ...]) -> Any:
        if name in self.hang:
            await asyncio.Event().wait()
        if name in self.fail:
            raise self.fail[name]
        method: Callable[..., Awaitable[Any]] = getattr(self.service, name)
        return await method(*args)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def service(tmp_path: Path, clock: Clock, lease_s: float = 60.0, test_clock: bool = False) -> BudgetService:
    return BudgetService(str(tmp_path / "ledger.db"), lease_s, test_clock, clock)
