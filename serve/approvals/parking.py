"""An agent replica's side of parked turns: what it stores when a turn parks at gated calls,
the answer the client gets then, and the outcome it stores when a resumed turn finishes
(the request's completion at the top of its tree, a delegate's answer below it)."""

from __future__ import annotations

from typing import Any

from ray import serve as rayserve

from serve.approvals.client import ApprovalsClient
from serve.context import Context, new_id
from serve.errors import RequestError, TurnParked
from serve.loop.results import AgentResult, Gate
from serve.loop.state import LoopState
from serve.manifest import AgentManifest
from serve.policy.pii import redact, scan
from serve.protocol import ChatRequest, completion, completion_id, extension

__all__ = ["Parking"]


class Parking:
    def __init__(self, client: ApprovalsClient, agent: str, manifest: AgentManifest) -> None:
        self.client = client
        self._agent, self._manifest = agent, manifest

    async def park(
        self, request: ChatRequest, ctx: Context, parked: TurnParked
    ) -> AgentResult | RequestError:
        """Store a turn that waits for people, durably; the answer says what it waits for."""
        state: LoopState = parked.state  # type: ignore[attr-defined]
        turn = self.turn(new_id("turn_"), request, ctx, state)
        shown = await self.store(turn, parked.gates, None)
        assert shown is not None, "a new turn has no holder to lose"
        said = state.text()
        tools = ", ".join(sorted({a["tool"] for a in shown}))
        ids = ", ".join(a["id"] for a in shown)
        sentence = (
            f"The action ({tools}) awaits approval; its approval id is {ids}."
            if len(shown) == 1
            else f"{len(shown)} actions ({tools}) await approval; their ids are {ids}."
        )
        content = f"{said} {sentence}" if said else sentence
        transcript = [*state.asked, {"role": "assistant", "content": content}]
        return AgentResult(
            content, [], "stop", state.usage, state.stats, transcript, parked=turn["id"], approvals=shown
        )

    async def store(
        self, turn: dict[str, Any], gates: list[Gate], holder: str | None
    ) -> list[dict[str, Any]] | None:
        """The turn and its gates in the approvals store (``holder``: the replica resuming
        it parks it again); the approvals it and its delegates wait for, or None if that
        replica no longer holds it."""
        redacting = self._manifest.policies.pii != "allow"
        own = [
            {
                "id": new_id("apr_"),
                "call_id": g.call_id,
                "tool": g.tool,
                "arguments": g.arguments,
                "shown": redacted(g.arguments) if redacting else g.arguments,
                "decision_id": g.decision_id,
                "ttl_s": g.ttl_s,
            }
            for g in gates
            if g.child is None
        ]
        children = {g.call_id: g.child for g in gates if g.child is not None}
        shown = await self.client.park(turn, own, children, holder)
        if shown is None:
            return None
        return [*shown, *(a for g in gates for a in g.approvals)]

    def turn(self, turn_id: str, request: ChatRequest, ctx: Context, state: LoopState) -> dict[str, Any]:
        """A parked turn as stored: its state, request and context, and where it resumes
        (this agent's deployment and application: its own version, whatever serves later)."""
        principal = ctx.principal
        return {
            "id": turn_id,
            "agent": self._agent,
            "version": self._manifest.version,
            "deployment": self._agent,
            "app": rayserve.get_replica_context().app_name,
            "request_id": ctx.request_id,
            "tenant": principal.tenant if principal is not None else "anonymous",
            "requester": ctx.principal_id,
            "nested": len(ctx.chain) > 1,
            "parked": {
                "state": state.to_json().decode(),
                "request": request.model_dump_json(),
                "context": ctx.to_dict(),
            },
        }

    def outcome(self, ctx: Context, request: ChatRequest, result: AgentResult) -> dict[str, Any]:
        """A resumed turn's outcome as stored: a delegate's answer, or the request's completion."""
        if len(ctx.chain) > 1:
            return {"content": result.content, "usage": result.usage.model_dump(mode="json")}
        trace = ctx.trace.get("traceparent", "")
        body = completion(
            completion_id=completion_id(ctx.request_id),
            model=request.model,
            content=result.content,
            tool_calls=result.tool_calls,
            finish_reason=result.finish_reason,
            usage=result.usage,
            extension=extension(
                request_id=ctx.request_id,
                correlation_id=ctx.correlation_id,
                trace_id=trace.split("-")[1] if trace.count("-") == 3 else None,
                session_id=ctx.session,
                agent=self._agent,
                agent_version=self._manifest.version,
                stats=result.stats,
                cost_usd=result.usage.cost_usd,
            ),
        )
        return {"completion": body}


def redacted(arguments: dict[str, Any]) -> dict[str, Any]:
    """Arguments as approvers see them: PII in their strings redacted."""

    def scrub(value: Any) -> Any:
        if isinstance(value, str):
            return redact(value, scan(value))
        if isinstance(value, dict):
            return {k: scrub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return value

    return {k: scrub(v) for k, v in arguments.items()}
