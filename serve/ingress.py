"""The HTTP front door: an OpenAI-compatible FastAPI app on Ray Serve.

``POST /v1/chat/completions`` (JSON or SSE), ``GET /v1/models`` (and one by id), agent cards under
``/v1/agents``, ``GET /v1/health``. Every error leaves as the OpenAI envelope, built by
:func:`serve.protocol.error_response`; no stack trace ever reaches a client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from opentelemetry import trace as otel
from pydantic import BaseModel, ConfigDict, Field
from ray import serve as rayserve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from serve import telemetry
from serve.approvals.client import ApprovalsClient
from serve.approvals.config import ApprovalsConfig
from serve.approvals.inbox import render_inbox
from serve.audit.client import AuditClient
from serve.auth import authenticate, identify, key_budgets
from serve.budget.admissions import Admissions
from serve.budget.client import LedgerClient, rate_lines
from serve.budget.config import BudgetsConfig
from serve.budget.rates import RateLimited, RateLine, RateState, duration
from serve.budget.usage import budget_limits, with_remaining
from serve.cards import AgentCard
from serve.context import Carried, Context
from serve.errors import (
    AgentError,
    AuditUnavailable,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    PolicyDenied,
    RateLimitExceeded,
    RequestError,
    Timeout,
)
from serve.explain import render_html
from serve.governance.config import GovernanceConfig, build_engines
from serve.governance.governor import Governor
from serve.handles import Transport, handle_error, over
from serve.loop.results import AgentResult, ContentDelta, Finished
from serve.policy.schema import Principal
from serve.protocol import (
    DONE,
    ChatRequest,
    ChunkStream,
    completion,
    completion_id,
    error_response,
    extension,
    parse_chat_request,
)
from serve.steps import OutcomeStep
from serve.telemetry import logs
from serve.telemetry.metrics import MetricsSink, RequestMetrics

__all__ = ["Ingress", "IngressOptions"]

log = logging.getLogger("fleet.ingress")

# The schema and its page are the ingress's own routes (below), so that they ask for a
# key like every endpoint but health; FastAPI's built-in ones would not.
app = FastAPI(title="Fleet", version="1", openapi_url=None, docs_url=None, redoc_url=None)
OPENAPI_PATH = "/v1/openapi.json"


class IngressOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(default=1 << 20, gt=0, description="Largest request body (413 above).")
    request_timeout_s: float = Field(default=300.0, gt=0, description="Deadline per request (504 after).")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After sent with 503.")
    num_replicas: int = Field(
        default=1, ge=1, description="Ingress replicas (each node's proxy spreads requests among them)."
    )
    max_ongoing_requests: int = Field(
        default=512, gt=0, description="Requests one ingress replica holds at once (streams included)."
    )
    max_queued_requests: int | None = Field(
        default=None,
        ge=1,
        description="Requests each Ray Serve proxy queues while every ingress replica is full; one "
        "more gets Ray's own 503 (plain text, with Retry-After). Unset: max_ongoing_requests.",
    )


@dataclass
class Exchange:
    """One chat completion in flight at the ingress: its span, clock and what is known."""

    span: otel.Span
    started: float = field(default_factory=time.monotonic)
    ctx: Context | None = None
    agent: str | None = None
    first_token: bool = False
    done: bool = False
    # The ingress's audit records, handed to the agent with the call; kept until the
    # agent is known to have them (then it ships them with its own).
    carried: Carried = field(default_factory=Carried)
    rated: tuple[RateLine, ...] = ()  # the rate limits it counts toward (its tokens too, once known)
    rate_headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-*

    @property
    def trace_id(self) -> str | None:
        return telemetry.trace_id(self.span)

    def headers(self) -> dict[str, str]:
        tid = self.trace_id
        ids = {"x-fleet-request-id": self.ctx.request_id} if self.ctx is not None else {}
        ids |= self.rate_headers
        return {**ids, "x-fleet-trace-id": tid} if tid else ids

    def extension(self, card: AgentCard, result: AgentResult) -> dict[str, Any]:
        assert self.ctx is not None
        fields = extension(
            request_id=self.ctx.request_id,
            correlation_id=self.ctx.correlation_id,
            trace_id=self.trace_id,
            session_id=self.ctx.session,
            agent=card.name,
            agent_version=card.version,
            stats=result.stats,
            cost_usd=result.usage.cost_usd,
        )
        if result.approvals:  # the turn parked: what it waits for
            keys = ("id", "status", "agent", "tool", "expires_at")
            shown = [{k: a[k] for k in keys} for a in result.approvals]
            fields["approval"] = shown[0]
            if len(shown) > 1:
                fields["approvals"] = shown
        return fields


SESSION_HEADER = "x-fleet-session-id"
SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")


def session_id(request: Request, chat: ChatRequest) -> str | None:
    """The session a request continues: the header, else ``metadata.session_id``."""
    header = request.headers.get(SESSION_HEADER)
    value, param = (
        (header, SESSION_HEADER)
        if header is not None
        else (
            (chat.metadata or {}).get("session_id"),
            "metadata.session_id",
        )
    )
    if value is None:
        return None
    if not SESSION_ID.match(value):
        raise InvalidRequest(
            "a session id is 1-128 letters, digits and . _ : - (starting with a letter or digit)", param=param
        )
    return value


APPROVAL_HEADER = "x-fleet-approval-id"
INBOX_HEADERS = {"x-frame-options": "DENY", "content-security-policy": "frame-ancestors 'none'"}
APPROVAL_STATUSES = (
    "pending", "approved", "rejected", "expired", "running", "completed", "outcome_unknown", "failed"
)  # fmt: skip


def decision_reason(body: bytes) -> str | None:
    """The optional ``reason`` of an approve or reject body (none, or ``{"reason": "..."}``)."""
    if not body.strip():
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        raise InvalidRequest('the body is not JSON: send {} or {"reason": "..."}') from None
    if not isinstance(doc, dict) or set(doc) - {"reason"}:
        raise InvalidRequest("the body takes one field, reason", param="reason")
    reason = doc.get("reason")
    if reason is not None and not isinstance(reason, str):
        raise InvalidRequest("reason is a string", param="reason")
    return reason


def wants_html(request: Request) -> bool:
    return request.query_params.get("format") == "html" or (
        "text/html" in request.headers.get("accept", "") and request.query_params.get("format") != "json"
    )


@app.exception_handler(RequestError)
async def _fleet_error(_: Request, exc: RequestError) -> JSONResponse:
    return error_response(exc)


@app.exception_handler(HTTPException)
async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    kind = NotFound if exc.status_code == 404 else InvalidRequest
    err = kind(str(exc.detail))
    err.status = exc.status_code
    return error_response(err)


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error in ingress", exc_info=exc)
    return error_response(AgentError("internal error", code="internal_error"))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes without reading them all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise PayloadTooLarge(f"request body exceeds {limit} bytes")
    return bytes(body)


def _final_chunks(
    out: ChunkStream, chat: ChatRequest, card: AgentCard, ex: Exchange, result: AgentResult
) -> list[str]:
    return out.final(
        tool_calls=result.tool_calls,
        finish_reason=result.finish_reason,
        usage=result.usage,
        extension=ex.extension(card, result),
        include_usage=bool(chat.stream_options and chat.stream_options.include_usage),
    )


def rate_headers(states: tuple[RateState, ...]) -> dict[str, str]:
    """The ``x-ratelimit-*`` headers of the OpenAI API, from the tightest limit of each kind."""
    headers = {}
    for state in states:
        headers[f"x-ratelimit-limit-{state.kind}"] = str(state.limit)
        headers[f"x-ratelimit-remaining-{state.kind}"] = str(state.remaining)
        headers[f"x-ratelimit-reset-{state.kind}"] = duration(state.reset_s)
    return headers


def rate_refusal(refused: RateLimited) -> RateLimitExceeded:
    per = "requests per minute (RPM)" if refused.kind == "requests" else "tokens per minute (TPM)"
    return RateLimitExceeded(
        f"Rate limit reached for {refused.budget} on {per}: limit {refused.limit}. "
        f"Please try again in {duration(refused.retry_after_s)}.",
        param=f"{refused.budget}:{'rpm' if refused.kind == 'requests' else 'tpm'}",
        kind=refused.kind,
        retry_after_s=refused.retry_after_s,
    )


# Everything the class uses must be defined above it: the ingress decorator freezes
# (pickles) the FastAPI app when the class is defined.
@rayserve.ingress(app)
class Ingress:
    def __init__(
        self,
        cards: dict[str, AgentCard],
        agents: dict[str, DeploymentHandle[Any]],
        options: IngressOptions,
        config: GovernanceConfig,
        root: str,
        audit: DeploymentHandle[Any],
        transport: Transport = "actor",
        ledger: DeploymentHandle[Any] | None = None,
        budgets: BudgetsConfig | None = None,
        approvals: DeploymentHandle[Any] | None = None,
        approvals_config: ApprovalsConfig | None = None,
    ) -> None:
        self._cards = cards
        self._approvals_config = approvals_config or ApprovalsConfig()
        self._approvals = (
            None if approvals is None else ApprovalsClient(approvals, self._approvals_config.call_timeout_s)
        )
        self._budgets = budgets or BudgetsConfig()
        self._key_limits = key_budgets(config.tenants)
        self._limits = budget_limits(cards, self._budgets, self._key_limits)
        self._client = None if ledger is None else LedgerClient(ledger, self._budgets.call_timeout_s)
        self._admissions = None if self._client is None else Admissions(self._client)
        self._wire = {name: card.wire() for name, card in cards.items()}
        self._agents = {name: over(handle, transport) for name, handle in agents.items()}
        self._options = options
        self._created = int(time.time())
        self._tenants = config.tenants
        self._audit = AuditClient(audit, config.audit.commit_timeout_s)
        self._audit_handle = audit
        telemetry.setup_tracing()
        logs.route_to_serve()
        self._metrics = RequestMetrics({name: card.version for name, card in cards.items()})
        self._gov = Governor(*build_engines(config, Path(root)), MetricsSink(self._audit, None, "", ()))

    def _authorize(self, request: Request) -> None:
        """With keys required, every endpoint but health needs one (401 otherwise)."""
        authenticate(request.headers.get("authorization"), self._tenants)

    @app.get("/v1/health")
    async def health(self) -> dict[str, Any]:
        # Liveness only: with keys on, which agents run is for callers with a key.
        return {"status": "ok"} if self._tenants else {"status": "ok", "agents": sorted(self._cards)}

    @app.get(OPENAPI_PATH, include_in_schema=False)
    async def openapi(self, request: Request) -> JSONResponse:
        self._authorize(request)
        schema, root = request.app.openapi(), request.scope.get("root_path", "").rstrip("/")
        if root:  # as FastAPI's own route: the schema's server is where the app is mounted
            schema = {**schema, "servers": [{"url": root}]}
        return JSONResponse(schema)

    @app.get("/v1/docs", include_in_schema=False)
    async def docs(self, request: Request) -> HTMLResponse:
        self._authorize(request)
        root = request.scope.get("root_path", "").rstrip("/")
        return get_swagger_ui_html(openapi_url=root + OPENAPI_PATH, title="Fleet - Swagger UI")

    @app.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        data = [self._model(name, card) for name, card in sorted(self._cards.items())]
        return {"object": "list", "data": data}

    # One path segment: /v1/models/{model} answers nothing else. A pinned id
    # (`name@version`) arrives here whole, `@` percent-encoded or not.
    @app.get("/v1/models/{model}")
    async def retrieve_model(self, model: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return self._model(model, self._card(model))  # an unknown id is a 404: model_not_found

    def _model(self, name: str, card: AgentCard) -> dict[str, Any]:
        """An agent as an OpenAI model object (the list's items and the retrieved one)."""
        return {"id": name, "object": "model", "created": self._created, "owned_by": card.owner.team}

    @app.get("/v1/agents")
    async def agents(self, request: Request) -> dict[str, Any]:
        self._authorize(request)
        return {"object": "list", "data": [self._wire[n] for n in sorted(self._wire)]}

    @app.get("/v1/agents/{name}")
    async def agent(self, name: str, request: Request) -> dict[str, Any]:
        self._authorize(request)
        self._card(name)  # an unknown name is a 404
        return self._wire[name]

    def _card(self, name: str) -> AgentCard:
        card = self._cards.get(name)
        if card is None:
            raise NotFound(f"The model {name!r} does not exist", param="model", code="model_not_found")
        return card

    @app.get("/v1/usage")
    async def usage(self, request: Request) -> dict[str, Any]:
        """Spend, held and remaining per budget and period: a tenant's own (its keys'
        included); role ``admin`` sees every budget, agents' too."""
        principal = authenticate(request.headers.get("authorization"), self._tenants)
        rows = [] if self._client is None else await self._client.usage("", sorted(self._limits))
        if self._tenants and "admin" not in principal.roles:  # without keys, one user: all of it
            mine = (f"tenant:{principal.tenant}:", f"key:{principal.tenant}:")
            rows = [r for r in rows if r["budget"].startswith(mine)]
        return {"object": "list", "data": [with_remaining(r, self._limits) for r in rows]}

    @app.get("/v1/requests/{request_id}/explain")
    async def explain(self, request_id: str, request: Request) -> Response:
        principal = authenticate(request.headers.get("authorization"), self._tenants)
        tenant = None if "admin" in principal.roles else principal.tenant
        await self._audit.commit()  # this replica's last outcomes are in the report too
        report = await self._audit_handle.explain.remote(request_id, tenant)
        # Another tenant's request does not exist, as far as this caller can tell.
        if report is None:
            raise NotFound(f"no explanation for request {request_id!r}", param="request_id")
        return HTMLResponse(render_html(report)) if wants_html(request) else JSONResponse(report)

    @app.get("/v1/approvals")
    async def approvals(self, request: Request) -> Response:
        """The approvals this caller may see (``?status=pending``, ``?agent=``); the inbox
        page with ``?format=html`` (it asks for the list itself, with the key typed in)."""
        if request.query_params.get("format") == "html":
            # No data in it: the page fetches with a key. Never framed (a click on Approve
            # must be the approver's own).
            return HTMLResponse(render_inbox(), headers=INBOX_HEADERS)
        principal, principal_id = identify(request.headers.get("authorization"), self._tenants)
        status, agent = request.query_params.get("status"), request.query_params.get("agent")
        if status is not None and status not in APPROVAL_STATUSES:
            raise InvalidRequest(f"status must be one of {', '.join(APPROVAL_STATUSES)}", param="status")
        if agent is not None:
            self._card(agent)
        rows = await self._approvals_client().inbox(principal, principal_id, status, agent)
        return JSONResponse({"object": "list", "data": rows})

    @app.get("/v1/approvals/{approval_id}")
    async def approval(self, approval_id: str, request: Request) -> Response:
        """One approval, with the request's answer once it finished; ``?wait=N`` holds the
        answer up to N seconds while the approval is pending or running."""
        principal, principal_id = identify(request.headers.get("authorization"), self._tenants)
        wait = request.query_params.get("wait", "0")
        try:
            wait_s = float(wait)
        except ValueError:
            raise InvalidRequest("wait is a number of seconds", param="wait") from None
        if not 0 <= wait_s <= self._approvals_config.max_wait_s:
            raise InvalidRequest(f"wait is 0 to {self._approvals_config.max_wait_s:g} seconds", param="wait")
        got = await self._approvals_client().get(approval_id, principal, principal_id, wait_s)
        if isinstance(got, RequestError):
            raise got
        return JSONResponse(got)

    @app.post("/v1/approvals/{approval_id}/approve")
    async def approve(self, approval_id: str, request: Request) -> Response:
        return await self._decide(approval_id, request, True)

    @app.post("/v1/approvals/{approval_id}/reject")
    async def reject(self, approval_id: str, request: Request) -> Response:
        return await self._decide(approval_id, request, False)

    async def _decide(self, approval_id: str, request: Request, approve: bool) -> Response:
        principal, principal_id = identify(request.headers.get("authorization"), self._tenants)
        body = await read_body(request, 64 << 10)
        reason = decision_reason(body)
        got = await self._approvals_client().decide(approval_id, approve, principal, principal_id, reason)
        if isinstance(got, RequestError):
            raise got
        return JSONResponse(got)

    def _approvals_client(self) -> ApprovalsClient:
        if self._approvals is None:
            raise NotFound("this fleet keeps no approvals")
        return self._approvals

    async def _admit(self, ctx: Context, card: AgentCard) -> Carried:
        """The ingress decision: may this principal call this agent? Returns its records."""
        principal = ctx.principal or Principal(tenant="anonymous", authenticated=False)
        facts = card.facts(principal.scopes)
        with self._audit.carrying() as carried:
            decision = await self._gov.decide(
                "ingress", ctx, facts, {"agent": card.name}, f"call:{card.name}"
            )
        if decision.allowed:
            return carried
        self._audit.adopt(carried)  # a refusal's record is this replica's to commit
        reasons = "; ".join(decision.reasons)
        raise PolicyDenied(
            f"not allowed to call {card.name!r}: {reasons}", decision_id=decision.id, param="model"
        )

    async def _rate(self, ex: Exchange, ctx: Context) -> None:
        """Count the request against its tenant's and key's rate limits (from this replica's
        batch, or the ledger's answer: serve/budget/admissions.py), or refuse it: 429."""
        lines = rate_lines(self._budgets, self._key_limits, ctx)
        if not lines or self._admissions is None:
            return
        got = await self._admissions.admit(lines)
        if isinstance(got, RateLimited):
            ex.rate_headers = rate_headers(got.states)
            raise rate_refusal(got)
        ex.rated = tuple(lines)
        ex.rate_headers = rate_headers(got)

    def _count(self, ex: Exchange, result: AgentResult) -> None:
        """The tokens a rated request used count toward its tokens per minute (reported in
        batches: the answer does not wait for it)."""
        if ex.rated and self._admissions is not None:
            self._admissions.count(ex.rated, result.usage.prompt_tokens + result.usage.completion_tokens)

    def _finish(self, ex: Exchange, status: int, **fields: Any) -> None:
        """The one place a chat completion ends: outcome step, metrics, span."""
        ex.done = True
        if ex.ctx is not None:  # a step, not a decision: it ships with the next batch
            self._gov.step(ex.ctx, OutcomeStep(status, **fields))
        self._metrics.request(ex.agent, status, time.monotonic() - ex.started)
        ex.span.set_attribute("http.response.status_code", status)
        if status >= 500:
            ex.span.set_status(otel.StatusCode.ERROR)
            ex.span.set_attribute("error.type", str(fields.get("code") or status))
        ex.span.end()

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        # Fleet's request id is always its own (128 random bits, `x-fleet-request-id`):
        # budgets, outcomes and explanations key on it. The X-Request-ID Ray's proxy
        # passes on (the client's, if it sent one) and returns is kept as the correlation
        # id. A client's W3C traceparent makes this request's span a child of the client's.
        ex = Exchange(
            telemetry.tracer().start_span(
                "POST /v1/chat/completions",
                context=telemetry.parent(request.headers),
                kind=otel.SpanKind.SERVER,
                attributes={"http.request.method": "POST", "http.route": "/v1/chat/completions"},
            )
        )
        try:
            principal, principal_id = identify(request.headers.get("authorization"), self._tenants)
            ex.ctx = ctx = Context.new(
                principal=principal,
                trace=telemetry.carrier(ex.span),
                principal_id=principal_id,
                correlation_id=request.headers.get("x-request-id"),
            )
            ex.span.set_attribute("fleet.request_id", ctx.request_id)
            if ctx.correlation_id is not None:
                ex.span.set_attribute("fleet.correlation_id", ctx.correlation_id)
            chat = parse_chat_request(await read_body(request, self._options.max_body_bytes))
            ex.ctx = ctx = replace(ctx, session=session_id(request, chat))
            card = self._card(chat.model)
            ex.agent = chat.model
            ex.span.set_attribute("gen_ai.agent.name", chat.model)
            await self._rate(ex, ctx)
            ex.carried = await self._admit(ctx, card)
            # The agent ships the admission record with its own and commits them before it
            # answers: the request's one audit round trip.
            ex.ctx = ctx = replace(ctx, audit=ex.carried)
            handle = self._agents[chat.model]
            if chat.stream:
                return await self._stream(chat, card, handle, ex)
            result = await self._call(handle, chat, ex)
            self._count(ex, result)
            self._finish(ex, 200, finish_reason=result.finish_reason)
        except RequestError as exc:
            # The agent may not have them: commit them here (the service writes each once).
            self._audit.adopt(ex.carried)
            if ex.ctx is not None and not isinstance(exc, AuditUnavailable):
                try:  # a refusal is a decision too: it leaves once its record is durable
                    await self._audit.commit()
                except AuditUnavailable as unavailable:
                    exc = unavailable
            self._finish(ex, exc.status, code=exc.code)
            return error_response(exc, self._options.retry_after_s, ex.headers())
        except BaseException:
            self._audit.adopt(ex.carried)  # shipped by the linger timer, even if this task is cancelled
            if not ex.done:
                self._finish(ex, 500, code="internal_error")
            raise
        body = completion(
            completion_id=completion_id(ctx.request_id),
            model=chat.model,
            content=result.content,
            tool_calls=result.tool_calls,
            finish_reason=result.finish_reason,
            usage=result.usage,
            extension=ex.extension(card, result),
        )
        headers = ex.headers()
        if result.approvals:
            headers[APPROVAL_HEADER] = ",".join(a["id"] for a in result.approvals)
        return JSONResponse(body, headers=headers)

    async def _call(self, handle: DeploymentHandle[Any], chat: ChatRequest, ex: Exchange) -> AgentResult:
        response = handle.chat.remote(chat, ex.ctx)
        try:
            async with asyncio.timeout(self._options.request_timeout_s):  # no task per request
                outcome = await response
        except TimeoutError:
            response.cancel()  # type: ignore[no-untyped-call]  # else the agent, its delegates and its model keep working
            raise Timeout(f"the agent did not answer within {self._options.request_timeout_s:g}s") from None
        except Exception as exc:
            raise handle_error(exc, chat.model) from None
        ex.carried = Carried()  # the agent answered: it has committed them
        if isinstance(outcome, RequestError):
            raise outcome
        result: AgentResult = outcome
        return result

    async def _stream(
        self, chat: ChatRequest, card: AgentCard, handle: DeploymentHandle[Any], ex: Exchange
    ) -> Response:
        assert ex.ctx is not None
        deadline = time.monotonic() + self._options.request_timeout_s
        events = handle.options(stream=True).stream.remote(chat, ex.ctx)
        # Wait for the first event so that an error found before any output (a bad prompt
        # variable, an overloaded agent) is an HTTP status, not a 200 with an error inside.
        first = await self._next(events, deadline, chat.model)
        if isinstance(first, RequestError):
            raise first
        ex.carried = Carried()  # the agent commits what it was handed before its first event
        return StreamingResponse(
            self._events(chat, card, ex, first, events, deadline),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", **ex.headers()},
        )

    async def _next(self, events: Any, deadline: float, agent: str) -> Any:
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.001)):  # no task per event
                return await events.__anext__()
        except StopAsyncIteration:
            return AgentError(f"agent {agent!r} ended its stream without a result")
        except TimeoutError:
            events.cancel()
            return Timeout(f"the agent did not answer within {self._options.request_timeout_s:g}s")
        except Exception as exc:  # a replica died mid-stream: end it with an envelope
            return handle_error(exc, agent)

    async def _events(
        self, chat: ChatRequest, card: AgentCard, ex: Exchange, first: Any, events: Any, deadline: float
    ) -> AsyncIterator[str]:
        assert ex.ctx is not None
        out = ChunkStream(completion_id(ex.ctx.request_id), chat.model)
        done = False
        try:
            yield out.opening()
            event = first
            while True:
                if isinstance(event, RequestError):
                    done = True
                    self._finish(ex, event.status, code=event.code)
                    yield out.error(event)
                    break
                if isinstance(event, ContentDelta):
                    if not ex.first_token:
                        ex.first_token = True
                        self._metrics.first_token(chat.model, time.monotonic() - ex.started)
                    yield out.content(event.text)
                elif isinstance(event, Finished):
                    done = True
                    self._count(ex, event.result)
                    self._finish(ex, 200, finish_reason=event.result.finish_reason)
                    for text in _final_chunks(out, chat, card, ex, event.result):
                        yield text
                    break
                event = await self._next(events, deadline, chat.model)
        finally:
            if not done:  # the client went away mid-stream
                events.cancel()
                self._finish(ex, 499, code="client_closed_request")
        yield DONE
