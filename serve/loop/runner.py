"""The agent loop: model call, tool calls, delegation, up to ``max_turns``.

Pure asyncio, no Ray: the agent deployment gives it a model caller and one delegate
callable per delegate agent, so it runs the same in a replica and in a unit test.

Semantics (OpenAI function calling, end to end):
- The model sees the agent's tools, one ``delegate_to_<agent>`` tool per delegate and
  the client's own ``tools``.
- Calls to the agent's tools and delegates run server-side; their results go back to
  the model as ``role: tool`` messages, and the loop goes on.
- Calls to client tools end the request with ``finish_reason: tool_calls``; the client
  runs them and sends the results back in its next request.
- ``tool_choice`` applies to the first model call; later calls use ``auto`` (otherwise
  ``required`` would never let the model answer).
- Invalid calls (unknown tool, arguments that fail the schema) and tool failures are
  told to the model as the tool's result and counted; they never fail the request.
- Every step passes the agent's :class:`Guard` (governance): model input and output,
  each tool call, each delegation and each result. A refused call is told to the model.
- An agent whose manifest routes (``routing: {mode: choose}``) makes its first model call
  a choice among its delegates when the client left ``tool_choice`` to it and sent no
  tools; the chosen delegate gets the user's message, as a call the model made would
  (:mod:`serve.loop.routing`).

This module drives the turns (model call, redaction of streamed text, finishing);
:mod:`serve.loop.calls` runs each server-side call. What a turn carries from one model
call to the next is one :class:`~serve.loop.state.LoopState`, a value.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from opentelemetry import trace as otel

from serve import telemetry
from serve.budget import Hold, Price, Purse, prompt_bound
from serve.budget.slices import AgentLedger, SliceHold
from serve.context import Context
from serve.errors import BudgetExceeded, InvalidRequest, MaxTurnsExceeded, TurnParked
from serve.loop.calls import ServerCalls
from serve.loop.guard import Guard
from serve.loop.results import AgentResult, ContentDelta, DelegateTarget, Event, Finished, ModelCaller, Runs
from serve.loop.routing import (
    ROUTING_MAX_TOKENS,
    Matcher,
    chosen,
    delegation_call,
    last_question,
    routes,
    routing_messages,
)
from serve.loop.state import LoopState
from serve.manifest import DIRECT_ROUTE, AgentSpec, Routing
from serve.models.base import ModelRequest
from serve.policy.pii import StreamRedactor
from serve.prompt import PromptRenderer
from serve.protocol import ChatRequest, NamedToolChoice, ToolCall, Usage
from serve.steps import ModelCallStep
from serve.tools import Tool

__all__ = ["AgentLoop", "Resumed"]

# A model call with no max_tokens, where a budget applies, is bounded so that its worst
# case can be held: 4096 tokens (a long answer on any model here).
UNBOUNDED_CALL_TOKENS = 4096


@dataclass(frozen=True, slots=True)
class Resumed:
    """A parked turn to go on with: its state, how each of its waiting calls was resolved
    (by call id, as the approvals store tells), and the runs of approved calls."""

    state: LoopState
    resolutions: dict[str, dict[str, Any]]
    runs: Runs


@dataclass(slots=True)
class _Reply:
    """One model call's reply, collected as it comes (:meth:`AgentLoop._model_call`)."""

    content: list[str] = field(default_factory=list)
    calls: list[ToolCall] = field(default_factory=list)
    finish: str = "stop"
    spent: Usage = field(default_factory=Usage)
    said: str = ""  # what the client may see of it, once the output policy decided


class AgentLoop:
    def __init__(
        self,
        spec: AgentSpec,
        tools: dict[str, Tool],
        model: ModelCaller,
        delegates: dict[str, DelegateTarget],
        guard: Guard,
        builtin: Mapping[str, Tool] | None = None,
        price: Price | None = None,
        ledger: AgentLedger | None = None,
        parking: bool = False,
    ) -> None:
        self.spec = spec
        self._price = price  # of the agent's model backend (None: its calls cost nothing)
        self._ledger = ledger  # the cluster's budgets per day and month (None: none apply)
        self._guard = guard
        self.manifest = spec.manifest
        self._model = model
        self._prompt = PromptRenderer(spec)
        self._calls = ServerCalls(spec.manifest, tools, builtin or {}, delegates, guard, parking)
        # The routes: each delegate's description, in the manifest's order.
        self._routes = {n: delegates[n].description for n in spec.manifest.delegates if n in delegates}
        routing = spec.manifest.routing
        self._matcher = Matcher(routing, self._routes) if routing and self._routes else None

    async def run(
        self,
        request: ChatRequest,
        ctx: Context,
        history: list[dict[str, Any]] | None = None,
        resumed: Resumed | None = None,
    ) -> AgentResult:
        async with contextlib.aclosing(self.events(request, ctx, history, resumed)) as events:
            async for event in events:
                if isinstance(event, Finished):
                    return event.result
        raise AssertionError("the loop ended without a result")  # pragma: no cover

    async def events(
        self,
        request: ChatRequest,
        ctx: Context,
        history: list[dict[str, Any]] | None = None,
        resumed: Resumed | None = None,
    ) -> AsyncGenerator[Event, None]:
        """The loop's output as it happens, inside one ``invoke_agent`` span.

        ``history``: earlier turns of the session, between the system prompt and the request.
        ``resumed``: a parked turn to go on with (its state, and how its gated calls were
        resolved), instead of a new one. A turn that parks raises :class:`TurnParked`,
        carrying its state (``exc.state``)."""
        m = self.manifest
        span = telemetry.tracer().start_span(
            f"invoke_agent {m.name}",
            context=telemetry.parent(ctx.trace),
            attributes=telemetry.attributes(
                gen_ai__operation__name="invoke_agent",
                gen_ai__agent__name=m.name,
                gen_ai__agent__version=m.version,
                fleet__request_id=ctx.request_id,
            ),
        )
        try:
            # Closed here, not left to the garbage collector: asyncio would finalize it in
            # a task of its own, scheduled through the loop's self-pipe.
            async with contextlib.aclosing(self._events(request, ctx, span, history or [], resumed)) as steps:
                async for event in steps:
                    if isinstance(event, Finished):
                        _finish_span(span, event.result)
                    yield event
        except GeneratorExit:  # the consumer stopped reading after the result: not an error
            raise
        except TurnParked:  # not a failure: the turn waits for people
            span.set_attribute("fleet.parked", True)
            raise
        except BaseException as exc:
            span.set_status(otel.StatusCode.ERROR)
            span.set_attribute("error.type", getattr(exc, "code", None) or type(exc).__name__)
            raise
        finally:
            span.end()

    async def _events(
        self,
        request: ChatRequest,
        ctx: Context,
        span: otel.Span,
        history: list[dict[str, Any]],
        resumed: Resumed | None,
    ) -> AsyncGenerator[Event, None]:
        client_tools = self._client_tools(request)
        state = self._start(request, history, ctx) if resumed is None else resumed.state
        try:
            async with contextlib.aclosing(
                self._turns(request, ctx, span, state, client_tools, resumed)
            ) as turns:
                async for event in turns:
                    yield event
        except TurnParked as parked:
            parked.state = state  # type: ignore[attr-defined]  # what the agent stores
            raise

    async def _turns(
        self,
        request: ChatRequest,
        ctx: Context,
        span: otel.Span,
        state: LoopState,
        client_tools: set[str],
        resumed: Resumed | None,
    ) -> AsyncGenerator[Event, None]:
        schemas = self._calls.schemas + [t.model_dump(exclude_none=True) for t in request.tools or []]
        first, handed = 1, None
        if resumed is not None:  # the parked turn's calls first, as they were resolved
            handed = await self._resume_calls(ctx, state, span, resumed)
            first = state.turn + 1
        elif (routing := self._routes_first(request, state, client_tools)) is not None:
            handed = await self._route(ctx, state, span, routing)
            first = state.turn + 1
        if handed is not None:  # a routed request: the delegate's reply is the answer
            if handed:
                yield ContentDelta(handed)
            state.said.append(handed)
            yield Finished(_answer(state, "stop"))
            return
        for turn in range(first, self.manifest.max_turns + 1):
            state.turn = turn
            state.stats.turns += 1
            await self._guard.model_input(ctx, state.messages[state.seen :], turn)
            state.seen = len(state.messages)
            reply, redactor = _Reply(), StreamRedactor() if self._guard.holds_output else None
            call = self._model_call(ctx, state, span, self._model_request(request, state, schemas), reply)
            async with contextlib.aclosing(call) as texts:
                async for text in texts:
                    safe = redactor.feed(text) if redactor else text
                    if safe:
                        yield ContentDelta(safe)
            said, finish = reply.said, reply.finish
            rest = redactor.flush() if redactor else ""
            if rest:
                yield ContentDelta(rest)
            state.said.append(said)
            result = _result(state, finish, client_tools)
            if result is not None:
                yield Finished(result)
                return
            if turn == self.manifest.max_turns:
                break  # no turn left to read the results: do not run the tools
            await self._run_calls(ctx, state, said, span)
        raise MaxTurnsExceeded(
            f"agent {self.manifest.name!r} did not finish within max_turns={self.manifest.max_turns}"
        )

    def _routes_first(self, request: ChatRequest, state: LoopState, client_tools: set[str]) -> Routing | None:
        """The routing, if the request is routed before the model speaks: never when the
        client chose (``tool_choice`` other than ``auto``), sent tools the model may need to
        call, or asked for a format (a delegate's reply would not keep it)."""
        routing = self.manifest.routing
        if routing is None or not self._routes:
            return None
        if state.tool_choice != "auto" or client_tools or not last_question(state.asked).strip():
            return None
        answer_format = request.response_format
        if answer_format is not None and answer_format.type != "text":
            return None
        return routing

    async def _route(self, ctx: Context, state: LoopState, span: otel.Span, routing: Routing) -> str | None:
        """Route the request to a delegate before the model answers (:mod:`serve.loop.routing`).

        The request passes the ``model_input`` point first, as for the model (what is routed
        is the message as the guard left it). The delegation runs as a call the model made.
        Returns the answer if the delegate's reply is it (a handoff), else ``None``: the
        loop goes on, from the delegate's result or, routed nowhere, as without routing."""
        await self._guard.model_input(ctx, state.messages[state.seen :], 1)
        state.seen = len(state.messages)
        question = last_question(state.messages)
        if routing.mode == "match" and self._matcher is not None:
            agent = self._matcher.choose(question)
            span.set_attribute("fleet.routing.scores", json.dumps(self._matcher.scores(question)))
        else:
            agent = await self._choose(ctx, state, span, routing, question)
        span.set_attribute("fleet.routing.choice", agent or DIRECT_ROUTE)
        if agent is None:
            return None
        stats = state.stats
        refused = stats.denials + stats.escalations + stats.tool_failures + stats.invalid_tool_calls
        state.pending = [delegation_call(agent, question)]
        state.routed = routing.answer != "model"  # if the turn parks, its resume hands the reply on
        await self._run_calls(ctx, state, "", span)
        state.routed = False
        if routing.answer == "model":
            return None
        if stats.denials + stats.escalations + stats.tool_failures + stats.invalid_tool_calls > refused:
            return None  # the model is told why, and answers
        reply = state.messages[-1]["content"]
        return await self._guard.model_output(ctx, reply, max(state.turn, 1)) if reply else ""

    async def _choose(
        self, ctx: Context, state: LoopState, span: otel.Span, routing: Routing, question: str
    ) -> str | None:
        """The model's pick among the routes: the request's first model call (``mode: choose``).
        Audited, traced and counted as any model call."""
        state.turn = 1
        state.stats.turns += 1
        names = list(self._routes)
        model_request = ModelRequest(
            agent=self.manifest.name,
            messages=routing_messages(routing, self._routes, question),
            choice=routes(routing, names),
            max_tokens=ROUTING_MAX_TOKENS,
            temperature=0.0,  # a classification: the client's sampling is for the answer
            stream=False,
        )
        reply = _Reply()
        async with contextlib.aclosing(self._model_call(ctx, state, span, model_request, reply)) as texts:
            async for _ in texts:
                pass
        state.pending = []
        return chosen("".join(reply.content), reply.calls, names)

    async def _model_call(
        self, ctx: Context, state: LoopState, span: otel.Span, request: ModelRequest, reply: _Reply
    ) -> AsyncGenerator[str, None]:
        """One model call: held in the budgets, traced, its pieces collected into ``reply``
        (its text yielded as it comes), then answered: settled, recorded, decided on."""
        request, hold, held = await self._reserve(ctx, state, request)
        model_span = self._model_span(span, request)
        try:
            async for piece in self._model(request):
                if piece.content:
                    reply.content.append(piece.content)
                    yield piece.content
                reply.calls.extend(piece.tool_calls)
                reply.finish = piece.finish_reason or reply.finish
                if piece.usage:
                    reply.spent.add(piece.usage)
        except (GeneratorExit, asyncio.CancelledError) as exc:
            # Stopped before its end (the client went away mid-stream): the engine worked
            # until now, and its counts come only at the end, so the call is charged its
            # prompt's bound and a token for every piece that came (``_cut_short``).
            _fail(model_span, exc)
            self._settle(state, hold, held, self._cut_short(request, reply))
            raise
        except BaseException as exc:
            _fail(model_span, exc)
            if reply.content or reply.calls or reply.spent.prompt_tokens:  # the engine worked: charged
                self._settle(state, hold, held, self._cut_short(request, reply))
            else:
                self._release(state, hold, held)
            raise
        state.pending = reply.calls
        content = "".join(reply.content)
        reply.said = await self._answered(
            ctx, state, content, reply.finish, reply.spent, (model_span, span), (hold, held)
        )

    def _start(self, request: ChatRequest, history: list[dict[str, Any]], ctx: Context) -> LoopState:
        choice = request.tool_choice
        tool_choice: Any = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice or "auto"
        system = {"role": "system", "content": self._prompt.render(request.metadata)}
        asked = request.conversation()
        return LoopState(
            messages=[system, *history, *asked],
            asked=asked,
            tool_choice=tool_choice,
            purse=self._purse(request, ctx),
        )

    def _purse(self, request: ChatRequest, ctx: Context) -> Purse:
        """What this run may spend: the manifest's per-request cap, within the caller's
        allowance. A ``max_tokens`` the cap could never pay for is the client's error."""
        cap = self.manifest.policies.cost.per_request_usd
        limit = request.completion_limit
        if cap is not None and limit and self._price and self._price.cost(0, limit) > cap:
            param = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
            raise InvalidRequest(
                f"{param}={limit} could never fit the budget of agent {self.manifest.name!r}, "
                f"{cap} USD per request ({self._price.cost(0, limit)} USD at its completion price)",
                param=param,
            )
        binds_caller = ctx.allowance is not None and (cap is None or ctx.allowance < cap)
        owner = ctx.chain[0] if binds_caller and ctx.chain else self.manifest.name
        return Purse.of(cap, ctx.allowance, f"request:{owner}")

    async def _reserve(
        self, ctx: Context, state: LoopState, request: ModelRequest
    ) -> tuple[ModelRequest, Hold, SliceHold | None]:
        """Hold a model call's worst case in the request's purse, then in the cluster's
        budgets per day and month it counts toward (in this replica's slices of them)."""
        lines = self._ledger.lines(ctx) if self._ledger is not None and self._price is not None else []
        request, worst = self._bound(state, request, ledgered=bool(lines))
        try:
            hold = state.purse.hold(worst)
        except BudgetExceeded as short:
            await self._overdraw(ctx, short)
            hold = state.purse.hold(worst, overdraw=True)
        if not lines:
            return request, hold, None
        assert self._ledger is not None
        allowed: set[str] = set()  # the budgets a policy let this call overdraw, each asked once
        try:
            while True:
                try:
                    return request, hold, await self._ledger.slices.reserve(lines, worst, allowed)
                except BudgetExceeded as short:
                    if short.param is None or short.param in allowed:
                        raise
                    await self._overdraw(ctx, short)
                    allowed.add(short.param)
        except BaseException:
            state.purse.release(hold)
            raise

    def _bound(self, state: LoopState, request: ModelRequest, ledgered: bool) -> tuple[ModelRequest, Decimal]:
        """A model call's worst case (its prompt's bound, then ``max_tokens`` at the
        completion price), and the call with the ``max_tokens`` it is held for: the
        client's; else what the purse still pays for; else, where a budget per day or
        month applies (``ledgered``), ``UNBOUNDED_CALL_TOKENS``, so that it can be held."""
        price = self._price
        if price is None:
            return request, Decimal(0)
        prompt = price.cost(prompt_bound(request.messages, request.tools), 0)
        if request.max_tokens is None:
            left = state.purse.available
            fits = None if left is None else price.completion_tokens_within(left - prompt)
            if fits is not None or ledgered:  # no more than a long answer: an upstream refuses more
                tokens = UNBOUNDED_CALL_TOKENS if fits is None else min(max(fits, 1), UNBOUNDED_CALL_TOKENS)
                request = request.model_copy(update={"max_tokens": tokens})
        completion = price.cost(0, request.max_tokens) if request.max_tokens else Decimal(0)
        return request, prompt + completion

    async def _overdraw(self, ctx: Context, short: BudgetExceeded) -> None:
        """A budget cannot cover the call: the ``budget`` policy point decides whether it
        may go over (an audited decision); if not, the refusal stands."""
        if not await self._guard.budget(ctx, short):
            raise short

    def _settle(self, state: LoopState, hold: Hold, held: SliceHold | None, cost: Decimal) -> None:
        state.purse.settle(hold, cost)
        if held is not None and self._ledger is not None:
            self._ledger.slices.settle(held, cost)  # reported with the replica's next flush

    def _cut_short(self, request: ModelRequest, reply: _Reply) -> Decimal:
        """What a call stopped before its end cost, at most what it held: the engine's
        counts if they came, else its prompt's bound and a token per piece received."""
        if self._price is None:
            return Decimal(0)
        if reply.spent.prompt_tokens or reply.spent.completion_tokens:
            return self._price.cost(reply.spent.prompt_tokens, reply.spent.completion_tokens)
        pieces = len(reply.content) + len(reply.calls)
        return self._price.cost(prompt_bound(request.messages, request.tools), 0) + self._price.cost(
            0, min(pieces, request.max_tokens or pieces)
        )

    def _release(self, state: LoopState, hold: Hold, held: SliceHold | None) -> None:
        state.purse.release(hold)
        if held is not None and self._ledger is not None:
            self._ledger.slices.release(held)

    async def _answered(
        self,
        ctx: Context,
        state: LoopState,
        content: str,
        finish: str,
        spent: Usage,
        spans: tuple[otel.Span, otel.Span],
        holds: tuple[Hold, SliceHold | None],
    ) -> str:
        """A model call is over: its span, usage, cost and step; what the client may see of its text."""
        model_span, span = spans
        spent.cost_usd = (
            self._price.cost(spent.prompt_tokens, spent.completion_tokens) if self._price else Decimal(0)
        )
        self._settle(state, *holds, spent.cost_usd)
        model_span.set_attributes(
            {
                "gen_ai.usage.input_tokens": spent.prompt_tokens,
                "gen_ai.usage.output_tokens": spent.completion_tokens,
                "gen_ai.response.finish_reasons": [finish],
            }
        )
        model_span.end()
        state.usage.add(spent)
        step = ModelCallStep(
            self.manifest.name,
            state.turn,
            spent.prompt_tokens,
            spent.completion_tokens,
            len(state.pending),
            finish,
            spent.cost_usd,
        )
        self._guard.step(ctx, step)
        said = await self._guard.model_output(ctx, content, state.turn) if content else ""
        if said and telemetry.content_capture():  # the model span has ended: the agent's carries it
            span.add_event(
                "gen_ai.choice",
                {"gen_ai.output.messages": json.dumps([{"role": "assistant", "content": said}])},
            )
        return said

    async def _run_calls(self, ctx: Context, state: LoopState, said: str, span: otel.Span) -> None:
        """Run the turn's server-side calls; their results go to the model next turn. If
        some must wait for people, the others' results are kept and the turn parks."""
        calls = state.pending
        state.messages.append(_assistant(said, calls))
        # Each delegation is handed an even share of what is left; what it reports it
        # spent (its whole subtree) is settled here.
        purse, delegations = state.purse, self._calls.delegations(calls)
        share = purse.share(delegations)
        hold = purse.hold(share * delegations if share is not None else Decimal(0))
        spent_before = state.usage.cost_usd
        try:
            results = await self._calls.run_all(
                calls, replace(ctx, allowance=share), state.stats, state.usage, span
            )
        finally:  # a parking turn holds nothing: its resume takes what it needs again
            purse.settle(hold, state.usage.cost_usd - spent_before)
        gates = [r.gate for r in results if r.gate is not None]
        if gates:
            state.answered = {c.id: r.text for c, r in zip(calls, results, strict=True) if r.gate is None}
            raise TurnParked(gates)
        self._answer_calls(state, [r.text for r in results])

    def _answer_calls(self, state: LoopState, results: list[str]) -> None:
        calls = state.pending
        state.messages.extend(
            {"role": "tool", "tool_call_id": c.id, "content": r} for c, r in zip(calls, results, strict=True)
        )
        state.seen = len(state.messages)  # results were decided on as data already
        state.pending = []
        state.answered = {}
        state.tool_choice = "auto"

    async def _resume_calls(
        self, ctx: Context, state: LoopState, span: otel.Span, resumed: Resumed
    ) -> str | None:
        """Answer a parked turn's waiting calls as they were resolved; park again if one
        waits anew (an approved delegation whose delegate parks). For a routed request,
        returns the delegate's reply, which is the answer."""
        waiting = [c for c in state.pending if c.id not in state.answered]
        unresolved = [c.function.name for c in waiting if c.id not in resumed.resolutions]
        if unresolved:  # the store resolves every call it parked: a mismatch is a bug, not a guess
            raise AssertionError(f"parked calls without a resolution: {unresolved}")
        delegations = self._calls.delegations(waiting)
        purse, share = state.purse, state.purse.share(delegations)
        hold = purse.hold(share * delegations if share is not None else Decimal(0))
        spent_before = state.usage.cost_usd
        try:
            results = await asyncio.gather(
                *(
                    self._calls.resume(
                        c, resumed.resolutions[c.id], replace(ctx, allowance=share), state.stats, state.usage,
                        span, resumed.runs,
                    )
                    for c in waiting
                )
            )  # fmt: skip
        finally:
            purse.settle(hold, state.usage.cost_usd - spent_before)
        gates = [r.gate for r in results if r.gate is not None]
        state.answered.update({c.id: r.text for c, r in zip(waiting, results, strict=True) if r.gate is None})
        if gates:
            raise TurnParked(gates)
        routed, ok = state.routed, all(r.status == "ok" for r in results)
        self._answer_calls(state, [state.answered[c.id] for c in state.pending])
        state.routed = False
        if not routed or not ok:
            return None
        reply = state.messages[-1]["content"]
        return await self._guard.model_output(ctx, reply, max(state.turn, 1)) if reply else ""

    def _client_tools(self, request: ChatRequest) -> set[str]:
        """The client's own tools; a ``tool_choice`` may name one of them or one of the
        agent's (forcing that call: its approval, scope and policy apply as ever)."""
        names: set[str] = set()
        for i, t in enumerate(request.tools or []):
            name = t.function.name
            if self._calls.reserves(name):
                raise InvalidRequest(
                    f"tool name {name!r} is reserved by agent {self.manifest.name!r}",
                    param=f"tools[{i}].function.name",
                )
            names.add(name)
        choice = request.tool_choice
        if isinstance(choice, NamedToolChoice):
            named = choice.function.name
            if named not in names and not self._calls.reserves(named):
                raise InvalidRequest(
                    f"tool_choice names function {named!r}, which is neither in tools nor a tool of "
                    f"agent {self.manifest.name!r}",
                    param="tool_choice",
                )
        return names

    def _model_request(
        self, request: ChatRequest, state: LoopState, schemas: list[dict[str, Any]]
    ) -> ModelRequest:
        """Every model call of the request samples as the client asked; the format binds
        whichever call answers (a call that makes tool calls is not an answer)."""
        defaults = self.manifest.model
        stop = [request.stop] if isinstance(request.stop, str) else request.stop
        answer_format = request.response_format
        return ModelRequest(
            agent=self.manifest.name,
            messages=list(state.messages),
            tools=schemas,
            tool_choice=state.tool_choice,
            max_tokens=request.completion_limit or defaults.max_tokens,
            temperature=request.temperature if request.temperature is not None else defaults.temperature,
            top_p=request.top_p if request.top_p is not None else defaults.top_p,
            stop=stop,
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            logit_bias=request.logit_bias,
            response_format=None if answer_format is None or answer_format.type == "text" else answer_format,
            parallel_tool_calls=request.parallel_tool_calls,
            stream=request.stream,
            halt_on_pii=self._guard.halts_on_pii,
        )

    def _model_span(self, agent_span: otel.Span, request: ModelRequest) -> otel.Span:
        model = self.manifest.model.backend
        span = telemetry.tracer().start_span(
            f"chat {model}",
            context=otel.set_span_in_context(agent_span),
            kind=otel.SpanKind.CLIENT,
            attributes=telemetry.attributes(
                gen_ai__operation__name="chat",
                gen_ai__request__model=model,
                gen_ai__request__max_tokens=request.max_tokens,
                gen_ai__request__temperature=request.temperature,
                gen_ai__request__top_p=request.top_p,
            ),
        )
        if telemetry.content_capture():  # the messages as the model sees them: PII already decided on
            span.set_attribute("gen_ai.input.messages", json.dumps(request.messages, default=str))
        return span


def _finish_span(span: otel.Span, result: AgentResult) -> None:
    span.set_attributes(
        {
            "gen_ai.usage.input_tokens": result.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": result.usage.completion_tokens,
            "gen_ai.response.finish_reasons": [result.finish_reason],
            "fleet.turns": result.stats.turns,
            "fleet.tool_calls": result.stats.tool_calls,
            "fleet.policy_denials": result.stats.denials,
        }
    )


def _result(state: LoopState, finish: str, client_tools: set[str]) -> AgentResult | None:
    """The request's answer, if this turn ends it: no calls, or calls the client runs."""
    calls = state.pending
    if not calls:
        return _answer(state, finish)
    theirs = [c for c in calls if c.function.name in client_tools]
    if not theirs:
        return None
    # The client runs its tools and comes back with the whole conversation; server-side
    # calls of this turn are not run (their results would be lost with it): the model
    # makes them again on the next request.
    said = state.text()
    transcript = [*state.asked, _assistant(said, theirs)]
    return AgentResult(said or None, theirs, "tool_calls", state.usage, state.stats, transcript)


def _answer(state: LoopState, finish: str) -> AgentResult:
    """The request's answer: everything the model (or, handed off, the delegate) said."""
    answer = state.text()
    transcript = [*state.asked, {"role": "assistant", "content": answer}]
    return AgentResult(answer, [], finish, state.usage, state.stats, transcript)


def _fail(span: otel.Span, exc: BaseException) -> None:
    span.set_status(otel.StatusCode.ERROR)
    span.set_attribute("error.type", getattr(exc, "code", None) or type(exc).__name__)
    span.end()


def _assistant(content: str, calls: list[ToolCall]) -> dict[str, Any]:
    return {"role": "assistant", "content": content or None, "tool_calls": [c.model_dump() for c in calls]}
