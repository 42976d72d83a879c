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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from opentelemetry import trace as otel

from serve import telemetry
from serve.context import Context
from serve.errors import (
    InvalidRequest,
    InvalidToolArguments,
    MaxTurnsExceeded,
    RequestError,
    ToolDenied,
    ToolError,
)
from serve.governance.decisions import Refusal
from serve.loop.guard import Guard
from serve.loop.results import AgentResult, ContentDelta, DelegateTarget, Event, Finished, ModelCaller, Stats
from serve.manifest import AgentSpec, delegate_tool_name
from serve.models.base import ModelRequest
from serve.policy.pii import StreamRedactor, scrub_name
from serve.prompt import PromptRenderer
from serve.protocol import ChatRequest, NamedToolChoice, ToolCall, Usage, UserMessage
from serve.tools import DelegateArgs, Tool

__all__ = ["AgentLoop"]


BUILTIN_TIMEOUT_S = 10.0


class AgentLoop:
    def __init__(
        self,
        spec: AgentSpec,
        tools: dict[str, Tool],
        model: ModelCaller,
        delegates: dict[str, DelegateTarget],
        guard: Guard,
        builtin: Mapping[str, Tool] | None = None,
    ) -> None:
        self.spec = spec
        self._guard = guard
        self.manifest = spec.manifest
        # Built-in tools (memory) decide at their own policy point, not at ``tool``.
        self._builtin = dict(builtin or {})
        self._tools = {**self._builtin, **tools}
        self._grants = {g.name: g for g in spec.manifest.tools}
        self._model = model
        self._delegates = {delegate_tool_name(n): (n, t) for n, t in delegates.items()}
        self._prompt = PromptRenderer(spec)
        self._server_schemas = [t.openai_schema() for t in self._tools.values()] + [
            _delegate_schema(name, target.description) for name, target in delegates.items()
        ]

    async def run(
        self, request: ChatRequest, ctx: Context, history: list[dict[str, Any]] | None = None
    ) -> AgentResult:
        async with contextlib.aclosing(self.events(request, ctx, history)) as events:
            async for event in events:
                if isinstance(event, Finished):
                    return event.result
        raise AssertionError("the loop ended without a result")  # pragma: no cover

    async def events(
        self, request: ChatRequest, ctx: Context, history: list[dict[str, Any]] | None = None
    ) -> AsyncGenerator[Event, None]:
        """The loop's output as it happens, inside one ``invoke_agent`` span.

        ``history``: earlier turns of the session, between the system prompt and the request."""
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
            async with contextlib.aclosing(self._events(request, ctx, span, history or [])) as steps:
                async for event in steps:
                    if isinstance(event, Finished):
                        _finish_span(span, event.result)
                    yield event
        except GeneratorExit:  # the consumer stopped reading after the result: not an error
            raise
        except BaseException as exc:
            span.set_status(otel.StatusCode.ERROR)
            span.set_attribute("error.type", getattr(exc, "code", None) or type(exc).__name__)
            raise
        finally:
            span.end()

    async def _events(
        self, request: ChatRequest, ctx: Context, span: otel.Span, history: list[dict[str, Any]]
    ) -> AsyncGenerator[Event, None]:
        client_tools = self._client_tools(request)
        asked = request.conversation()
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": self._prompt.render(request.metadata)},
            *history,
            *asked,
        ]
        schemas = self._server_schemas + [t.model_dump(exclude_none=True) for t in request.tools or []]
        choice = request.tool_choice
        tool_choice: Any = choice.model_dump() if isinstance(choice, NamedToolChoice) else choice or "auto"
        stats, usage, text, seen = Stats(), Usage(), [], 0
        for turn in range(1, self.manifest.max_turns + 1):
            stats.turns += 1
            self._guard.model_input(ctx, messages[seen:], turn)
            seen = len(messages)
            content, calls, finish, spent = [], [], "stop", Usage()
            redactor = StreamRedactor() if self._guard.holds_output else None
            model_request = self._model_request(request, messages, schemas, tool_choice)
            model_span = self._model_span(span, model_request)
            try:
                async for piece in self._model(model_request):
                    if piece.content:
                        content.append(piece.content)
                        safe = redactor.feed(piece.content) if redactor else piece.content
                        if safe:
                            yield ContentDelta(safe)
                    calls.extend(piece.tool_calls)
                    finish = piece.finish_reason or finish
                    if piece.usage:
                        spent.add(piece.usage)
            except BaseException as exc:
                model_span.set_status(otel.StatusCode.ERROR)
                model_span.set_attribute("error.type", getattr(exc, "code", None) or type(exc).__name__)
                model_span.end()
                raise
            model_span.set_attributes(
                {
                    "gen_ai.usage.input_tokens": spent.prompt_tokens,
                    "gen_ai.usage.output_tokens": spent.completion_tokens,
                    "gen_ai.response.finish_reasons": [finish],
                }
            )
            model_span.end()
            usage.add(spent)
            self._guard.event(
                ctx,
                "model_call",
                turn=turn,
                prompt_tokens=spent.prompt_tokens,
                completion_tokens=spent.completion_tokens,
                tool_calls=len(calls),
                finish_reason=finish,
            )
            said = self._guard.model_output(ctx, "".join(content), turn) if content else ""
            if said and telemetry.content_capture():  # the model span has ended: the agent's carries it
                span.add_event(
                    "gen_ai.choice",
                    {"gen_ai.output.messages": json.dumps([{"role": "assistant", "content": said}])},
                )
            rest = redactor.flush() if redactor else ""
            if rest:
                yield ContentDelta(rest)
            text.append(said)
            if not calls:
                answer = "".join(text)
                transcript = [*asked, {"role": "assistant", "content": answer}]
                yield Finished(AgentResult(answer, [], finish, usage, stats, transcript))
                return
            theirs = [c for c in calls if c.function.name in client_tools]
            if theirs:
                # The client runs its tools and comes back with the whole conversation;
                # server-side calls of this turn are not run (their results would be
                # lost with it): the model makes them again on the next request.
                said_before = "".join(text)
                transcript = [*asked, _assistant(said_before, theirs)]
                yield Finished(
                    AgentResult(said_before or None, theirs, "tool_calls", usage, stats, transcript)
                )
                return
            if turn == self.manifest.max_turns:
                break  # no turn left to read the results: do not run the tools
            messages.append(_assistant(said, calls))
            if len(calls) == 1:  # the common case: no task to run it in
                results = [await self._execute(calls[0], ctx, stats, usage, span)]
            else:
                results = await asyncio.gather(*(self._execute(c, ctx, stats, usage, span) for c in calls))
            messages.extend(
                {"role": "tool", "tool_call_id": c.id, "content": r}
                for c, r in zip(calls, results, strict=True)
            )
            seen = len(messages)  # results were decided on as data already
            tool_choice = "auto"
        raise MaxTurnsExceeded(
            f"agent {self.manifest.name!r} did not finish within max_turns={self.manifest.max_turns}"
        )

    def _client_tools(self, request: ChatRequest) -> set[str]:
        names: set[str] = set()
        for i, t in enumerate(request.tools or []):
            name = t.function.name
            if name in self._tools or name in self._delegates:
                raise InvalidRequest(
                    f"tool name {name!r} is reserved by agent {self.manifest.name!r}",
                    param=f"tools[{i}].function.name",
                )
            names.add(name)
        return names

    def _model_request(
        self,
        request: ChatRequest,
        messages: list[dict[str, Any]],
        schemas: list[dict[str, Any]],
        tool_choice: Any,
    ) -> ModelRequest:
        defaults = self.manifest.model
        stop = [request.stop] if isinstance(request.stop, str) else request.stop
        return ModelRequest(
            agent=self.manifest.name,
            messages=list(messages),
            tools=schemas,
            tool_choice=tool_choice,
            max_tokens=request.completion_limit or defaults.max_tokens,
            temperature=request.temperature if request.temperature is not None else defaults.temperature,
            top_p=request.top_p if request.top_p is not None else defaults.top_p,
            stop=stop,
            seed=request.seed,
            stream=request.stream,
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

    async def _execute(
        self, call: ToolCall, ctx: Context, stats: Stats, usage: Usage, agent_span: otel.Span
    ) -> str:
        """Run one server-side call; every failure becomes text for the model."""
        name, started = call.function.name, time.monotonic()
        shown = name if name in self._tools or name in self._delegates else scrub_name(name)
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
        stats.tool_calls += 1
        try:
            status, text = await self._attempt(name, call.function.arguments, ctx.traced(span), stats, usage)
            if status == "ok":
                classes: list[str] = (
                    list(self._delegates[name][1].data)
                    if name in self._delegates
                    else list(self._grants[name].data)
                    if name in self._grants
                    else []
                )
                text = self._guard.result(ctx, name, text, classes)
        except BaseException:
            span.set_status(otel.StatusCode.ERROR)
            span.end()
            raise
        span.set_attribute("fleet.tool.status", status)
        if status != "ok":
            span.set_status(otel.StatusCode.ERROR)
            span.set_attribute("error.type", status)
        span.end()
        self._guard.event(
            ctx, "tool_call", tool=shown, status=status, duration_s=round(time.monotonic() - started, 4)
        )
        return text

    async def _attempt(
        self, name: str, arguments: str, ctx: Context, stats: Stats, usage: Usage
    ) -> tuple[str, str]:
        """(status, text): ok, invalid, error, denied or escalated."""
        known = name in self._tools or name in self._delegates
        checked: dict[str, Any] | None = None
        task: DelegateArgs | None = None
        try:
            if name in self._tools:  # the policy judges the arguments the tool will get
                checked = self._tools[name].validate(arguments).model_dump(mode="json")
            elif name in self._delegates:
                task = DelegateArgs.model_validate_json(arguments or "{}")
        except (InvalidToolArguments, ValueError) as exc:
            stats.invalid_tool_calls += 1
            detail = exc if isinstance(exc, InvalidToolArguments) else f"invalid arguments for {name}: {exc}"
            return "invalid", f"error: {detail}"
        refusal = self._decide(name, arguments if checked is None else json.dumps(checked), ctx)
        if not known:
            stats.invalid_tool_calls += 1
        if refusal is not None:
            escalated = refusal.outcome == "escalate"
            stats.escalations += escalated
            stats.denials += not escalated
            message = refusal.message
            if not known:
                message += (
                    f"; available tools: {', '.join(sorted([*self._tools, *self._delegates])) or 'none'}"
                )
            return ("escalated" if escalated else "denied"), message
        if not known:  # a policy that lets unknown tools through cannot make them exist
            return "invalid", f"error: unknown tool {name!r}"
        try:
            if checked is not None:
                grant = self._grants.get(name)
                return "ok", await self._tools[name].run(
                    checked, grant.timeout_s if grant else BUILTIN_TIMEOUT_S
                )
            if task is not None:
                return "ok", await self._delegate(name, task, ctx, stats, usage)
            raise AssertionError(f"{name!r} is known but neither a tool nor a delegate")  # pragma: no cover
        except ToolDenied as exc:  # a tool's own policy decision (memory) refused what it asked
            stats.denials += 1
            return "denied", f"error: {exc}"
        except ToolError as exc:
            stats.tool_failures += 1
            return "error", f"error: {exc}"

    def _decide(self, name: str, arguments: str, ctx: Context) -> Refusal | None:
        """The policy decision on one call: a delegation, or a tool (known or not)."""
        if name in self._delegates:
            agent, target = self._delegates[name]
            return self._guard.delegation(ctx, agent, list(target.scopes))
        if name.startswith("delegate_to_") and name not in self._tools:
            return self._guard.delegation(ctx, name.removeprefix("delegate_to_"), [])
        if name in self._builtin:
            return None  # each memory read or write is decided at the ``memory`` point
        return self._guard.tool(ctx, name, arguments)

    async def _delegate(
        self, tool_name: str, args: DelegateArgs, ctx: Context, stats: Stats, usage: Usage
    ) -> str:
        agent, delegate = self._delegates[tool_name]
        stats.delegations.append(agent)
        self._guard.event(ctx, "delegation", target=agent)
        request = ChatRequest(model=agent, messages=[UserMessage(role="user", content=args.task)])
        try:
            result = await delegate.call(request, ctx)
        except RequestError as exc:
            raise ToolError(f"agent {agent!r} failed: {exc.message}") from None
        usage.add(result.usage)
        return result.content or ""


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


def _assistant(content: str, calls: list[ToolCall]) -> dict[str, Any]:
    return {"role": "assistant", "content": content or None, "tool_calls": [c.model_dump() for c in calls]}


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
