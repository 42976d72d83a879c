"""One server-side call of a turn: validate it, decide on it, run the tool or delegate.

Every way a call can go is text for the model, never a failed request: an invalid call
(unknown tool, arguments that fail the schema), a refusal by policy, a tool's failure.
Each call has a status (:data:`serve.steps.ToolStatus`) that the stats, its span and its
``tool_call`` step report.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from opentelemetry import trace as otel

from serve import telemetry
from serve.context import Context
from serve.errors import (
    ApprovalRequired,
    BudgetExceeded,
    InvalidToolArguments,
    RequestError,
    ToolDenied,
    ToolError,
)
from serve.governance.decisions import Refusal
from serve.loop.guard import Guard
from serve.loop.results import AgentResult, DelegateTarget, Gate, Runs, Stats
from serve.manifest import AgentManifest, delegate_tool_name
from serve.policy.pii import redact, scan, scrub_name
from serve.protocol import ChatRequest, ToolCall, Usage, UserMessage
from serve.steps import DelegationStep, ToolCallStep, ToolStatus
from serve.tools import DelegateArgs, Tool

__all__ = ["BUILTIN_TIMEOUT_S", "CallResult", "ServerCalls"]

BUILTIN_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class CallResult:
    """How a call went, and what the model reads as its result; or that it waits (``gate``)."""

    status: ToolStatus
    text: str
    gate: Gate | None = None


@dataclass(frozen=True, slots=True)
class _Checked:
    """A call's arguments as validated: a tool's (as it will get them) or a delegate's task."""

    arguments: dict[str, Any] | None = None
    task: DelegateArgs | None = None


class ServerCalls:
    """The calls an agent runs itself: its tools, its built-in tools and its delegates."""

    def __init__(
        self,
        manifest: AgentManifest,
        tools: Mapping[str, Tool],
        builtin: Mapping[str, Tool],
        delegates: Mapping[str, DelegateTarget],
        guard: Guard,
        parking: bool = False,
    ) -> None:
        self._agent = manifest.name
        self._guard = guard
        # Whether a gated call parks the turn (an approvals service keeps it) or, without
        # one, is refused: the model is told it needs an approval nobody can give.
        self._parking = parking
        self._ttl = manifest.approval_ttl_s
        # Built-in tools (memory) decide at their own policy point, not at ``tool``.
        self._builtin = dict(builtin)
        self._tools = {**self._builtin, **tools}
        self._grants = {g.name: g for g in manifest.tools}
        self._delegates = {delegate_tool_name(n): (n, t) for n, t in delegates.items()}
        self.schemas = [t.openai_schema() for t in self._tools.values()] + [
            _delegate_schema(name, target.description) for name, target in delegates.items()
        ]

    def delegations(self, calls: list[ToolCall]) -> int:
        """How many of ``calls`` are delegations (each is handed a share of the budget)."""
        return sum(c.function.name in self._delegates for c in calls)

    def reserves(self, name: str) -> bool:
        """Whether ``name`` is one of this agent's calls (a client tool may not take it)."""
        return name in self._tools or name in self._delegates

    async def run_all(
        self, calls: list[ToolCall], ctx: Context, stats: Stats, usage: Usage, agent_span: otel.Span
    ) -> list[CallResult]:
        """The results of a turn's calls, in their order; several run at once."""
        if len(calls) == 1:  # the common case: no task to run it in
            return [await self.run(calls[0], ctx, stats, usage, agent_span)]
        return list(await asyncio.gather(*(self.run(c, ctx, stats, usage, agent_span) for c in calls)))

    async def run(
        self, call: ToolCall, ctx: Context, stats: Stats, usage: Usage, agent_span: otel.Span
    ) -> CallResult:
        """Run one server-side call; every failure becomes text for the model."""
        stats.tool_calls += 1

        def attempt(traced: Context) -> Awaitable[CallResult]:
            return self._attempt(call, traced, stats, usage)

        return await self._traced(call, ctx, agent_span, attempt)

    async def resume(
        self,
        call: ToolCall,
        resolution: dict[str, Any],
        ctx: Context,
        stats: Stats,
        usage: Usage,
        agent_span: otel.Span,
        runs: Runs,
    ) -> CallResult:
        """A gated call of a parked turn, now that it is resolved: an approved call runs
        (once: ``runs`` claims it first), a rejected or expired one is told to the model,
        a delegate's finished turn gives its answer."""

        def attempt(traced: Context) -> Awaitable[CallResult]:
            return self._resolved(call, resolution, traced, stats, usage, runs)

        return await self._traced(call, ctx, agent_span, attempt)

    async def _traced(
        self,
        call: ToolCall,
        ctx: Context,
        agent_span: otel.Span,
        attempt: Callable[[Context], Awaitable[CallResult]],
    ) -> CallResult:
        """A call's span and ``tool_call`` step around ``attempt``; an ``ok`` result's data
        is decided on before the model sees it."""
        name, started = call.function.name, time.monotonic()
        shown = name if self.reserves(name) else scrub_name(name)
        span = telemetry.tracer().start_span(
            f"execute_tool {shown}",
            context=otel.set_span_in_context(agent_span),
            attributes=telemetry.attributes(
                gen_ai__operation__name="execute_tool",
                gen_ai__tool__name=shown,
                gen_ai__tool__call__id=call.id,
                gen_ai__tool__type="agent" if name in self._delegates else "function",
            ),
        )
        try:
            result = await attempt(ctx.traced(span))
            if result.status == "ok" and result.gate is None:
                text = await self._guard.result(ctx, name, result.text, self._classes(name))
                result = CallResult("ok", text)
        except BaseException:
            span.set_status(otel.StatusCode.ERROR)
            span.end()
            raise
        span.set_attribute("fleet.tool.status", result.status)
        if result.gate is not None:
            span.set_attribute("fleet.approval.waits", True)
        elif result.status != "ok":
            span.set_status(otel.StatusCode.ERROR)
            span.set_attribute("error.type", result.status)
        span.end()
        duration = round(time.monotonic() - started, 4)
        step = ToolCallStep(
            self._agent, shown, result.status, duration, shown_arguments(call.function.arguments)
        )
        self._guard.step(ctx, step)
        return result

    def _classes(self, name: str) -> list[str]:
        """The data classes a call's result may hold, as its grant (or delegate) declares them."""
        if name in self._delegates:
            return list(self._delegates[name][1].data)
        grant = self._grants.get(name)
        return list(grant.data) if grant else []

    async def _attempt(self, call: ToolCall, ctx: Context, stats: Stats, usage: Usage) -> CallResult:
        name, arguments = call.function.name, call.function.arguments
        checked = self._validate(name, arguments)
        if isinstance(checked, CallResult):
            stats.invalid_tool_calls += 1
            return checked
        known = self.reserves(name)
        decided = arguments if checked.arguments is None else json.dumps(checked.arguments)
        try:
            refusal = await self._decide(name, decided, ctx)
        except ApprovalRequired as needed:
            # The one place a call meets a human's approval: the turn parks (the agent
            # stores it), or, with no approvals service, the model is told it was not run.
            if self._parking and known:
                stats.escalations += 1
                return CallResult("escalated", "", gate=self._gate(call, checked, needed.decision_id))
            refusal = Refusal("escalate", str(needed))
        if not known:
            stats.invalid_tool_calls += 1
        if refusal is not None:
            return self._refused(refusal, known, stats)
        if not known:  # a policy that lets unknown tools through cannot make them exist
            return CallResult("invalid", f"error: unknown tool {name!r}")
        return await self._execute(call, checked, ctx, stats, usage)

    async def _execute(
        self, call: ToolCall, checked: _Checked, ctx: Context, stats: Stats, usage: Usage
    ) -> CallResult:
        """Run a call that may run: its tool, or its delegate (whose turn may park)."""
        name = call.function.name
        try:
            if checked.arguments is not None:
                grant = self._grants.get(name)
                timeout = grant.timeout_s if grant else BUILTIN_TIMEOUT_S
                return CallResult("ok", await self._tools[name].run(checked.arguments, timeout))
            if checked.task is not None:
                result = await self._delegate(name, checked.task, ctx, stats)
                if result.parked is not None:  # the delegate waits for people: so does this call
                    gate = replace(
                        self._gate(call, checked, None),
                        child=result.parked,
                        approvals=tuple(result.approvals),
                    )
                    return CallResult("escalated", "", gate=gate)
                usage.add(result.usage)
                return CallResult("ok", result.content or "")
            raise AssertionError(f"{name!r} is known but neither a tool nor a delegate")  # pragma: no cover
        except ToolDenied as exc:  # a tool's own policy decision (memory) refused what it asked
            stats.denials += 1
            return CallResult("denied", f"error: {exc}")
        except ToolError as exc:
            stats.tool_failures += 1
            return CallResult("error", f"error: {exc}")

    def _gate(self, call: ToolCall, checked: _Checked, decision_id: str | None) -> Gate:
        name = call.function.name
        grant = self._grants.get(name)
        ttl = grant.approval_ttl_s if grant and grant.approval_ttl_s else self._ttl
        arguments = checked.arguments if checked.arguments is not None else {}
        if checked.task is not None:
            arguments = checked.task.model_dump(mode="json")
        return Gate(call.id, name, arguments, ttl, decision_id)

    async def _resolved(
        self,
        call: ToolCall,
        resolution: dict[str, Any],
        ctx: Context,
        stats: Stats,
        usage: Usage,
        runs: Runs,
    ) -> CallResult:
        name = call.function.name
        if resolution["kind"] == "child":  # a delegate's turn that waited for people finished
            agent = self._delegates[name][0] if name in self._delegates else name
            result = resolution["result"]
            if "error" in result:
                stats.tool_failures += 1
                return CallResult("error", f"error: agent {agent!r} failed: {result['error']['message']}")
            usage.add(Usage.model_validate(result["usage"]))
            return CallResult("ok", result["content"] or "")
        decision, approval = resolution["decision"], resolution["id"]
        if decision != "approved":
            stats.denials += 1
            why = f": {resolution['reason']}" if resolution.get("reason") else ""
            by = "" if decision == "expired" else f" by {resolution['by']}"
            return CallResult(
                "denied", f"error: the call to {name!r} was {decision}{by}{why}; it was not run"
            )
        checked = self._validate(name, call.function.arguments)
        if isinstance(checked, CallResult):  # validated at parking: only a changed tool fails here
            stats.invalid_tool_calls += 1
            return checked
        got, outcome = await runs.start(approval)
        if got == "done":  # it ran, and the replica that ran it was lost after: not again
            return CallResult("ok", outcome or "")
        if got == "unknown":
            stats.tool_failures += 1
            return CallResult(
                "error",
                f"error: the approved call to {name!r} started and its outcome is unknown "
                "(the replica running it was lost); it was not run again",
            )
        if got != "start":
            stats.denials += 1
            return CallResult("denied", f"error: the call to {name!r} has no approval to run; it was not run")
        result = await self._execute(call, checked, ctx, stats, usage)
        await runs.ran(approval, result.text, result.status)
        return result

    def _validate(self, name: str, arguments: str) -> _Checked | CallResult:
        """The arguments as the call would get them (what the policy judges), or why they are invalid."""
        try:
            if name in self._tools:
                return _Checked(arguments=self._tools[name].validate(arguments).model_dump(mode="json"))
            if name in self._delegates:
                return _Checked(task=DelegateArgs.model_validate_json(arguments or "{}"))
        except (InvalidToolArguments, ValueError) as exc:
            detail = exc if isinstance(exc, InvalidToolArguments) else f"invalid arguments for {name}: {exc}"
            return CallResult("invalid", f"error: {detail}")
        return _Checked()  # unknown: the policy still decides on it, as it was asked

    def _refused(self, refusal: Refusal, known: bool, stats: Stats) -> CallResult:
        escalated = refusal.outcome == "escalate"
        stats.escalations += escalated
        stats.denials += not escalated
        message = refusal.message
        if not known:
            message += f"; available tools: {', '.join(sorted([*self._tools, *self._delegates])) or 'none'}"
        return CallResult("escalated" if escalated else "denied", message)

    async def _decide(self, name: str, arguments: str, ctx: Context) -> Refusal | None:
        """The policy decision on one call: a delegation, or a tool (known or not)."""
        if name in self._delegates:
            agent, target = self._delegates[name]
            return await self._guard.delegation(ctx, agent, list(target.scopes))
        if name.startswith("delegate_to_") and name not in self._tools:
            return await self._guard.delegation(ctx, name.removeprefix("delegate_to_"), [])
        if name in self._builtin:
            return None  # each memory read or write is decided at the ``memory`` point
        return await self._guard.tool(ctx, name, arguments)

    async def _delegate(self, tool_name: str, args: DelegateArgs, ctx: Context, stats: Stats) -> AgentResult:
        agent, delegate = self._delegates[tool_name]
        stats.delegations.append(agent)
        self._guard.step(ctx, DelegationStep(self._agent, agent))
        request = ChatRequest(model=agent, messages=[UserMessage(role="user", content=args.task)])
        try:
            return await delegate.call(request, ctx)
        except BudgetExceeded:  # the request's budget is spent: the request ends, not the call
            raise
        except RequestError as exc:
            raise ToolError(f"agent {agent!r} failed: {exc.message}") from None


def _delegate_schema(agent: str, description: str) -> dict[str, Any]:
    params = DelegateArgs.model_json_schema()
    params.pop("title", None)
    params.pop("description", None)
    return {
        "type": "function",
        "function": {
            "name": delegate_tool_name(agent),
            "description": f"Delegate a task to the {agent} agent and get its answer. {description}",
            "parameters": params,
        },
    }


ARGUMENTS_SHOWN = 4096  # characters of a call's arguments kept in its step


def shown_arguments(arguments: str) -> str:
    """A call's arguments as its step keeps them: PII redacted, at most :data:`ARGUMENTS_SHOWN`."""
    text = redact(arguments, scan(arguments))
    return text if len(text) <= ARGUMENTS_SHOWN else text[:ARGUMENTS_SHOWN] + "…"
