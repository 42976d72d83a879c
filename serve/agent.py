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
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from serve import telemetry
from serve.approvals.client import ApprovalsClient, HeldRuns
from serve.approvals.parking import Parking
from serve.approvals.records import Claim
from serve.audit.client import AuditClient
from serve.auth import key_budgets
from serve.budget import Price
from serve.budget.client import LedgerClient
from serve.budget.config import BudgetsConfig
from serve.budget.slices import AgentLedger, Slices
from serve.context import Context, new_id
from serve.errors import MemoryUnavailable, RequestError, TurnParked
from serve.governance.config import GovernanceConfig, build_engines
from serve.governance.governor import Governor
from serve.governance.guard import AgentGuard
from serve.handles import Transport, handle_error, over
from serve.loop.results import AgentResult, ContentDelta, DelegateTarget, Event, Finished, ModelCaller
from serve.loop.runner import AgentLoop, Resumed
from serve.loop.state import LoopState
from serve.manifest import delegate_tool_name, load_agent
from serve.memory.client import RequestMemory, bind, session_of, tenant_of, unbind
from serve.memory.tools import MEMORY_TOOLS
from serve.models import BackendConfig, make_backend
from serve.models.base import ModelChunk, ModelRequest
from serve.models.deployment import raise_errors, stream_model
from serve.protocol import ChatRequest
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
        self._parking = (
            None
            if approvals is None
            else Parking(ApprovalsClient(approvals, approvals_timeout_s), name, spec.manifest)
        )
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
        if self._parking is None:  # pragma: no cover - the loop parks only with a service
            raise AssertionError("a turn parked without an approvals service")
        return await self._parking.park(request, ctx, parked)

    async def resume(self, turn_id: str) -> None:
        """Go on with a parked turn whose waits are resolved (the approvals service asks any
        replica; the claim lets one have it). The outcome goes to the store: the request's
        answer, or a delegate's answer for its caller's turn."""
        if self._parking is None:
            return
        holder = new_id("run_")
        claim = await self._parking.client.claim(turn_id, holder)
        if claim is None:  # another replica has it, it is done, or it still waits
            return
        renewing = asyncio.get_running_loop().create_task(self._renew(turn_id, holder))
        try:
            await self._resume(claim, holder)
        finally:
            renewing.cancel()

    async def _resume(self, claim: Claim, holder: str) -> None:
        assert self._parking is not None
        parking, parked = self._parking, claim.parked
        ctx = Context.from_dict(parked["context"])
        request = ChatRequest.model_validate_json(parked["request"])
        state = LoopState.from_json(parked["state"])
        token = bind(RequestMemory(self._memory, ctx, self._guard.memory, self._memory_timeout))
        nested = len(ctx.chain) > 1
        failed = False
        try:
            resumed = Resumed(state, claim.resolutions, HeldRuns(parking.client, holder))
            try:
                result = await self._loop.run(request, ctx, None, resumed)
            except TurnParked as again:  # it waits anew (an approved delegate's turn parked)
                await self._audit.commit()
                turn = parking.turn(claim.turn, request, ctx, again.state)  # type: ignore[attr-defined]
                await parking.store(turn, again.gates, holder)
                return
            if not nested:
                await self._remember(ctx, result)
            outcome = parking.outcome(ctx, request, result)
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
        await parking.client.finish(claim.turn, holder, outcome, failed)

    async def _renew(self, turn_id: str, holder: str) -> None:
        assert self._parking is not None
        while True:
            await asyncio.sleep(self._lease_s / 3)
            with contextlib.suppress(RequestError):
                await self._parking.client.renew(turn_id, holder)

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


def _status(outcome: object, otherwise: int) -> int:
    """The status a call ended with, for the agent's own request metrics."""
    return outcome.status if isinstance(outcome, RequestError) else otherwise
