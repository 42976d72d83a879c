"""One agent as a Ray Serve deployment (one deployment per agent, autoscaled).

The replica loads its manifest, prompt and tools from the agent's folder, then runs
:class:`~serve.loop.AgentLoop` for each request. It reaches its model through the
model deployment's handle (or an inline backend) and its delegates through their
handles. Errors cross handles as ``RequestError`` values, never as stack traces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel
from ray import serve as rayserve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from serve import telemetry
from serve.approvals.client import ApprovalsClient, HeldRuns
from serve.approvals.store import Claim
from serve.audit.client import AuditClient
from serve.auth import key_budgets
from serve.budget import Price
from serve.budget.client import LedgerClient
from serve.budget.config import BudgetsConfig
from serve.budget.slices import AgentLedger, Slices
from serve.context import Context, new_id
from serve.errors import ApprovalsUnavailable, MemoryUnavailable, RequestError, TurnParked
from serve.governance.config import GovernanceConfig, build_engines
from serve.governance.governor import Governor
from serve.governance.guard import AgentGuard
from serve.handles import Transport, handle_error, over
from serve.loop.results import AgentResult, ContentDelta, DelegateTarget, Event, Finished, Gate, ModelCaller
from serve.loop.runner import AgentLoop, Resumed
from serve.loop.state import LoopState
from serve.manifest import delegate_tool_name, load_agent
from serve.memory.client import RequestMemory, bind, session_of, tenant_of, unbind
from serve.memory.tools import MEMORY_TOOLS
from serve.models import BackendConfig, make_backend
from serve.models.base import ModelChunk, ModelRequest
from serve.models.deployment import raise_errors, stream_model
from serve.policy.pii import redact, scan
from serve.protocol import ChatRequest, completion, completion_id, extension
from serve.telemetry import logs
from serve.telemetry.metrics import MetricsSink, RequestMetrics
from serve.tools import load_tools

__all__ = ["AgentDeployment"]

log = logging.getLogger("fleet.agent")

AgentOutcome = AgentResult | RequestError
StreamItem = Event | RequestError


def model_caller(model: DeploymentHandle[Any] | BackendConfig, transport: Transport = "actor") -> ModelCaller:
    """Calls a model deployment through its handle, or an inline backend from its config."""
    if isinstance(model, BaseModel):  # a backend config: the backend runs in this replica
        backend = make_backend(model)

        def inline(request: ModelRequest) -> AsyncIterator[ModelChunk]:
            return raise_errors(stream_model(backend, request))

        return inline

    model = over(model, transport)
    streaming = model.options(stream=True)

    async def remote(request: ModelRequest) -> AsyncIterator[ModelChunk]:
        try:
            if request.stream:
                items = cast(DeploymentResponseGenerator[Any], streaming.stream.remote(request))
                async for item in raise_errors(items):
                    yield item
                return
            reply = await model.complete.remote(request)  # one unary call: far cheaper than a stream
        except RequestError:  # the model's own answer
            raise
        except Exception as exc:  # its replica died or restarts (a 503), or the call failed
            raise handle_error(exc, model.deployment_name, "model") from None
        if isinstance(reply, RequestError):
            raise reply
        yield ModelChunk(content=reply.content)
        yield ModelChunk(tool_calls=reply.tool_calls, finish_reason=reply.finish_reason, usage=reply.usage)

    return remote


def _shipping_first(audit: AuditClient, call: ModelCaller) -> ModelCaller:
    """``call``, which first starts shipping the audit records queued before it.

    A streamed answer's first token waits until the decisions made before it are durable;
    shipped as the model call starts, their round trip overlaps the engine's prefill
    instead of following the first token. (A carried request's records are not queued,
    so nothing ships early for them: they go with the caller's commit.)
    """

    def call_after_shipping(request: ModelRequest) -> AsyncIterator[ModelChunk]:
        audit.ship()
        return call(request)

    return call_after_shipping


def delegate_target(
    handle: DeploymentHandle[Any], description: str, scopes: list[str], data: list[str], audit: AuditClient
) -> DelegateTarget:
    async def call(request: ChatRequest, ctx: Context) -> AgentResult:
        try:
            outcome: AgentOutcome = await handle.chat.remote(request, ctx)
        except Exception as exc:  # the delegate's replica died or is unavailable
            # A RequestError becomes a tool error the model is told about.
            raise handle_error(exc, request.model, "delegate") from None
        if isinstance(outcome, RequestError):
            raise outcome
        audit.adopt(outcome.audit)  # the delegate's records, shipped with this request's
        outcome.audit = None
        return outcome

    return DelegateTarget(description=description, call=call, scopes=tuple(scopes), data=tuple(data))


class AgentDeployment:
    def __init__(
        self,
        agents_dir: str,
        name: str,
        model: DeploymentHandle[Any] | BackendConfig,
        delegates: dict[str, tuple[DeploymentHandle[Any], str, list[str], list[str]]],
        config: GovernanceConfig,
        root: str,
        audit: DeploymentHandle[Any],
        memory: DeploymentHandle[Any],
        memory_timeout_s: float = 2.0,
        transport: Transport = "actor",
        price: Price | None = None,
        ledger: DeploymentHandle[Any] | None = None,
        budgets: BudgetsConfig | None = None,
        approvals: DeploymentHandle[Any] | None = None,
        approvals_timeout_s: float = 5.0,
        approvals_lease_s: float = 30.0,
    ) -> None:
        spec = load_agent(Path(agents_dir) / name)
        tools = load_tools(spec.folder, [t.name for t in spec.manifest.tools])
        engine, shadow = build_engines(config, Path(root), spec.manifest.policies.files)
        self._audit = AuditClient(audit, config.audit.commit_timeout_s)
        targets = {
            n: delegate_target(over(handle, transport), description, scopes, data, self._audit)
            for n, (handle, description, scopes, data) in delegates.items()
        }
        telemetry.setup_tracing()
        logs.route_to_serve()
        builtin = MEMORY_TOOLS if spec.manifest.memory.tools else {}
        tool_names = [*tools, *builtin, *(delegate_tool_name(d) for d in delegates)]
        sink = MetricsSink(self._audit, name, spec.manifest.version, tool_names)
        # Every call this agent serves, its delegated ones too: its own SLA's numbers.
        self._metrics = RequestMetrics({name: spec.manifest.version}, hop="agent")
        self._guard = AgentGuard(Governor(engine, shadow, sink), spec)
        self.name = name
        self._memory = memory
        self._memory_timeout = memory_timeout_s
        self._sessions = spec.manifest.memory.session
        limits = budgets or BudgetsConfig()
        self._ledger = (
            None
            if ledger is None
            else AgentLedger(
                Slices(LedgerClient(ledger, limits.call_timeout_s), limits.slice_fraction),
                name,
                spec.manifest.policies.cost.per_day_usd,
                limits,
                key_budgets(config.tenants),
            )
        )
        self._loop = AgentLoop(
            spec,
            tools,
            _shipping_first(self._audit, model_caller(model, transport)),
            targets,
            self._guard,
            builtin,
            price,
            self._ledger,
            parking=approvals is not None,
        )
        self._manifest = spec.manifest
        self._approvals = None if approvals is None else ApprovalsClient(approvals, approvals_timeout_s)
        self._lease_s = approvals_lease_s

    async def __del__(self) -> None:
        """The replica is shutting down (a redeploy, a scale-down): what it spent of its
        budget slices is reported and the rest given back, not left to its lease."""
        if self._ledger is not None:
            with contextlib.suppress(Exception):
                await self._ledger.slices.drain()

    def _enter(self, ctx: Context) -> Context:
        """This agent's context; records handed over with it are now this replica's to ship."""
        self._audit.adopt(ctx.audit)
        return self._guard.enter(replace(ctx, audit=None))

    async def chat(self, request: ChatRequest, ctx: Context) -> AgentOutcome:
        timed = self._metrics.timed(self.name)
        try:
            outcome = await self._chat(request, ctx)
            timed.end(_status(outcome, 200))
            return outcome
        except Exception as exc:
            timed.end(_status(exc, 500))
            raise
        finally:
            timed.record()

    async def _chat(self, request: ChatRequest, ctx: Context) -> AgentOutcome:
        # Everything this request records here (and its delegates hand back) is carried:
        # a delegate returns it to its caller; the agent the client called commits the
        # whole request tree's records at once, before it answers.
        try:
            with self._audit.carrying() as carried:
                ctx = self._enter(ctx)
                outcome = await self._run(request, ctx)
        except BaseException:  # cancelled (a timeout, a client gone): what was decided still ships
            self._audit.adopt(carried)
            raise
        if len(ctx.chain) > 1 and isinstance(outcome, AgentResult):
            outcome.audit = carried  # durable with its caller's, before the client hears anything
            return outcome
        self._audit.adopt(carried)
        try:
            await self._audit.commit()  # no answer leaves before its audit records are durable
        except RequestError as exc:
            return exc
        return outcome

    async def _run(self, request: ChatRequest, ctx: Context) -> AgentOutcome:
        token = bind(RequestMemory(self._memory, ctx, self._guard.memory, self._memory_timeout))
        try:
            result = await self._loop.run(request, ctx, await self._history(ctx))
            await self._remember(ctx, result)
            return result
        except TurnParked as parked:
            try:
                return await self._park(request, ctx, parked)
            except RequestError as exc:  # the approvals service did not answer: nothing parked
                return exc
        except RequestError as exc:
            return exc
        except Exception as exc:
            return self._internal(exc, ctx)
        finally:
            unbind(token)

    async def stream(self, request: ChatRequest, ctx: Context) -> AsyncIterator[StreamItem]:
        timed = self._metrics.timed(self.name)
        try:
            async with contextlib.aclosing(self._stream(request, ctx)) as items:
                async for item in items:
                    if isinstance(item, Finished | RequestError):
                        timed.end(_status(item, 200))
                    yield item
        except Exception as exc:
            timed.end(_status(exc, 500))
            raise
        finally:
            timed.record()

    async def _stream(self, request: ChatRequest, ctx: Context) -> AsyncGenerator[StreamItem, None]:
        ctx = self._enter(ctx)
        bind(
            RequestMemory(self._memory, ctx, self._guard.memory, self._memory_timeout)
        )  # this request's own task context
        failure: RequestError
        try:
            try:
                async for event in self._loop.events(request, ctx, await self._history(ctx)):
                    if isinstance(event, Finished):
                        await self._remember(ctx, event.result)
                    if isinstance(event, Finished) or self._audit.pending:
                        await self._audit.commit()  # nothing reaches the client ahead of its decisions
                    yield event
                return
            except TurnParked as parked:
                streamed = len(parked.state.text())  # type: ignore[attr-defined]
                outcome = await self._park(request, ctx, parked)
            if isinstance(outcome, RequestError):
                raise outcome
            await self._audit.commit()
            yield ContentDelta((outcome.content or "")[streamed:])  # the sentence: what was said went out
            yield Finished(outcome)
            return
        except RequestError as exc:
            failure = exc
        except Exception as exc:
            failure = self._internal(exc, ctx)
        try:
            await self._audit.commit()
        except RequestError as exc:
            failure = exc
        yield failure

    async def _park(self, request: ChatRequest, ctx: Context, parked: TurnParked) -> AgentOutcome:
        """Store a turn that waits for people, durably; the answer says what it waits for."""
        if self._approvals is None:  # pragma: no cover - the loop parks only with a service
            raise AssertionError("a turn parked without an approvals service")
        state: LoopState = parked.state  # type: ignore[attr-defined]
        turn = self._turn(new_id("turn_"), request, ctx, state)
        shown = await self._store_park(turn, parked.gates, None)
        if shown is None:
            return ApprovalsUnavailable("the approvals service lost the parked turn; retry later")
        said = state.text()
        tools = ", ".join(sorted({a["tool"] for a in shown}))
        sentence = (
            f"The action ({tools}) awaits approval; its approval id is {shown[0]['id']}."
            if len(shown) == 1
            else f"{len(shown)} actions ({tools}) await approval; their ids are {', '.join(a['id'] for a in shown)}."
        )
        content = f"{said} {sentence}" if said else sentence
        transcript = [*state.asked, {"role": "assistant", "content": content}]
        return AgentResult(
            content, [], "stop", state.usage, state.stats, transcript, parked=turn["id"], approvals=shown
        )

    async def _store_park(
        self, turn: dict[str, Any], gates: list[Gate], holder: str | None
    ) -> list[dict[str, Any]] | None:
        """The turn and its gates in the approvals store; the approvals it (and its delegates) wait for."""
        assert self._approvals is not None
        redacting = self._manifest.policies.pii != "allow"
        own = [
            {
                "id": new_id("apr_"),
                "call_id": g.call_id,
                "tool": g.tool,
                "arguments": g.arguments,
                "shown": _redacted(g.arguments) if redacting else g.arguments,
                "decision_id": g.decision_id,
                "ttl_s": g.ttl_s,
            }
            for g in gates
            if g.child is None
        ]
        children = {g.call_id: g.child for g in gates if g.child is not None}
        shown = await self._approvals.park(turn, own, children, holder)
        if shown is None:
            return None
        return [*shown, *(a for g in gates for a in g.approvals)]

    def _turn(self, turn_id: str, request: ChatRequest, ctx: Context, state: LoopState) -> dict[str, Any]:
        principal = ctx.principal
        return {
            "id": turn_id,
            "agent": self.name,
            "version": self._manifest.version,
            "deployment": self.name,
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

    async def resume(self, turn_id: str) -> None:
        """Go on with a parked turn whose waits are resolved (the approvals service asks any
        replica; the claim lets one have it). The outcome goes to the store: the request's
        answer, or a delegate's answer for its caller's turn."""
        if self._approvals is None:
            return
        holder = new_id("run_")
        claim = await self._approvals.claim(turn_id, holder)
        if claim is None:  # another replica has it, it is done, or it still waits
            return
        renewing = asyncio.get_running_loop().create_task(self._renew(turn_id, holder))
        try:
            await self._resume(claim, holder)
        finally:
            renewing.cancel()

    async def _resume(self, claim: Claim, holder: str) -> None:
        assert self._approvals is not None
        parked = claim.parked
        ctx = Context.from_dict(parked["context"])
        request = ChatRequest.model_validate_json(parked["request"])
        state = LoopState.from_json(parked["state"])
        token = bind(RequestMemory(self._memory, ctx, self._guard.memory, self._memory_timeout))
        nested = len(ctx.chain) > 1
        failed = False
        try:
            resumed = Resumed(state, claim.resolutions, HeldRuns(self._approvals, holder))
            try:
                result = await self._loop.run(request, ctx, None, resumed)
            except TurnParked as again:  # it waits anew (an approved delegate's turn parked)
                await self._audit.commit()
                turn = self._turn(claim.turn, request, ctx, again.state)  # type: ignore[attr-defined]
                await self._store_park(turn, again.gates, holder)
                return
            if not nested:
                await self._remember(ctx, result)
            outcome = self._finished(ctx, request, result, nested)
        except RequestError as exc:
            failed, outcome = True, {"error": exc.to_dict()}
        except Exception as exc:
            failed, outcome = True, {"error": self._internal(exc, ctx).to_dict()}
        finally:
            unbind(token)
        try:
            await self._audit.commit()
        except RequestError as exc:
            log.error("resumed turn %s: audit not durable (%s)", claim.turn, exc.message)
            return  # not finished: the lease lapses and the turn goes on elsewhere, its runs kept
        await self._approvals.finish(claim.turn, holder, outcome, failed)

    def _finished(
        self, ctx: Context, request: ChatRequest, result: AgentResult, nested: bool
    ) -> dict[str, Any]:
        """A resumed turn's outcome as stored: a delegate's answer, or the request's completion."""
        if nested:
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
                agent=self.name,
                agent_version=self._manifest.version,
                stats=result.stats,
                cost_usd=result.usage.cost_usd,
            ),
        )
        return {"completion": body}

    async def _renew(self, turn_id: str, holder: str) -> None:
        assert self._approvals is not None
        while True:
            await asyncio.sleep(self._lease_s / 3)
            with contextlib.suppress(RequestError):
                await self._approvals.renew(turn_id, holder)

    def _session(self, ctx: Context) -> tuple[str, str, str] | None:
        """The session this call continues: only the agent the client called keeps one."""
        if not (self._sessions and ctx.session and len(ctx.chain) == 1):
            return None
        return tenant_of(ctx), self.name, session_of(ctx)  # the principal's own, not its tenant's

    async def _history(self, ctx: Context) -> list[dict[str, Any]]:
        key = self._session(ctx)
        if key is None:
            return []
        turns: list[dict[str, Any]] = await self._session_call(ctx, "session", *key)
        return turns

    async def _remember(self, ctx: Context, outcome: AgentOutcome) -> None:
        key = self._session(ctx)
        if key is not None and isinstance(outcome, AgentResult):
            await self._session_call(ctx, "append_session", *key, outcome.transcript)

    async def _session_call(self, ctx: Context, method: str, *args: Any) -> Any:
        """A session load or save; failing it fails the request (503): an answer without
        its conversation, or a turn missing from it, would silently change meaning."""
        try:
            return await asyncio.wait_for(getattr(self._memory, method).remote(*args), self._memory_timeout)
        except Exception as exc:
            log.error("session %s of %s failed", method, ctx.request_id, exc_info=exc)
            raise MemoryUnavailable("the session memory is unavailable; retry later") from None

    def _internal(self, exc: Exception, ctx: Context) -> RequestError:
        return handle_error(exc, self.name, "behind", ctx.request_id)


def _redacted(arguments: dict[str, Any]) -> dict[str, Any]:
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


def _status(outcome: object, otherwise: int) -> int:
    """The status a call ended with, for the agent's own request metrics."""
    return outcome.status if isinstance(outcome, RequestError) else otherwise
