"""A replica's view of the approvals service (serve/approvals/service.py): park a turn,
claim a ready one, claim and record the one run of an approved call, finish the turn.
A service that does not answer in time is a 503 (``ApprovalsUnavailable``)."""

from __future__ import annotations

import asyncio
from typing import Any

from serve.approvals.records import Claim
from serve.errors import ApprovalsUnavailable, RequestError
from serve.policy.schema import Principal

__all__ = ["ApprovalsClient", "HeldRuns"]

Answer = dict[str, Any] | RequestError


class ApprovalsClient:
    def __init__(self, handle: Any, timeout_s: float) -> None:
        self._handle = handle
        self._timeout = timeout_s

    async def park(
        self,
        turn: dict[str, Any],
        approvals: list[dict[str, Any]],
        children: dict[str, str],
        holder: str | None = None,
    ) -> list[dict[str, Any]] | None:
        got: list[dict[str, Any]] | None = await self._call("park", turn, approvals, children, holder)
        return got

    async def claim(self, turn_id: str, holder: str) -> Claim | None:
        got: Claim | None = await self._call("claim", turn_id, holder)
        return got

    async def renew(self, turn_id: str, holder: str) -> bool:
        got: bool = await self._call("renew", turn_id, holder)
        return got

    async def start_run(self, approval_id: str, holder: str) -> tuple[str, str | None]:
        got: tuple[str, str | None] = await self._call("start_run", approval_id, holder)
        return got

    async def ran(self, approval_id: str, holder: str, outcome: str, status: str) -> bool:
        got: bool = await self._call("ran", approval_id, holder, outcome, status)
        return got

    async def finish(self, turn_id: str, holder: str, result: dict[str, Any], failed: bool) -> bool:
        got: bool = await self._call("finish", turn_id, holder, result, failed)
        return got

    async def inbox(
        self, principal: Principal, principal_id: str, status: str | None, agent: str | None
    ) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = await self._call("inbox", principal, principal_id, status, agent)
        return got

    async def get(self, approval_id: str, principal: Principal, principal_id: str, wait_s: float) -> Answer:
        """One approval; the service may hold the answer ``wait_s`` (and so does this call)."""
        got: Answer = await self._call("get", approval_id, principal, principal_id, wait_s, waits_s=wait_s)
        return got

    async def decide(
        self, approval_id: str, approve: bool, principal: Principal, principal_id: str, reason: str | None
    ) -> Answer:
        got: Answer = await self._call("decide", approval_id, approve, principal, principal_id, reason)
        return got

    async def _call(self, method: str, *args: Any, waits_s: float = 0.0) -> Any:
        try:
            async with asyncio.timeout(self._timeout + waits_s):
                return await getattr(self._handle, method).remote(*args)
        except (TimeoutError, Exception) as exc:
            raise ApprovalsUnavailable(
                f"the approvals service did not answer ({type(exc).__name__})"
            ) from None


class HeldRuns:
    """The runs of one resumed turn's approved calls, held by its resuming replica
    (:class:`serve.loop.results.Runs`)."""

    def __init__(self, client: ApprovalsClient, holder: str) -> None:
        self._client, self._holder = client, holder

    async def start(self, approval_id: str) -> tuple[str, str | None]:
        return await self._client.start_run(approval_id, self._holder)

    async def ran(self, approval_id: str, outcome: str, status: str) -> None:
        await self._client.ran(approval_id, self._holder, outcome, status)
