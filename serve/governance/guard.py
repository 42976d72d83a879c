"""The agent loop's side of governance: one call per decision point.

:class:`AgentGuard` turns loop steps into policy decisions for one agent: model input
and output (PII), tool calls (scope, arguments, approval), delegations, the data a
tool returns and a budget's shortfall. It narrows scopes on the way down a delegation chain: an agent acts with
its own scopes intersected with what its caller (and the caller's API key) holds. Every
decision is awaited: the policy engine may be a server.
"""

from __future__ import annotations

import json
from dataclasses import replace
from decimal import Decimal
from typing import Any

from serve.cards import AgentCard
from serve.context import Context
from serve.errors import ApprovalRequired, BudgetExceeded, PolicyDenied
from serve.governance.decisions import Decision, Refusal
from serve.governance.governor import Governor
from serve.manifest import AgentSpec
from serve.policy.pii import redact, scan, scrub_name
from serve.policy.schema import AgentFacts
from serve.steps import Step

__all__ = ["AgentGuard"]


def _texts(message: dict[str, Any]) -> list[tuple[Any, Any]]:
    """(container, key) of every text in a chat message."""
    content = message.get("content")
    if isinstance(content, str):
        return [(message, "content")]
    if isinstance(content, list):
        return [
            (part, "text") for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
    return []


def _usd(amount: Decimal | None) -> str | None:
    return None if amount is None else f"{amount:f}"


def _why(decision: Decision) -> str:
    return "; ".join(redact(r, scan(r)) for r in decision.reasons) or decision.outcome


class AgentGuard:
    def __init__(self, governor: Governor, spec: AgentSpec) -> None:
        self._gov = governor
        m = spec.manifest
        self._manifest = m
        self._tools = {
            g.name: {"scope": g.scope, "approval": g.approval, "data": list(g.data)} for g in m.tools
        }
        # Streamed text of an agent that may redact passes a StreamRedactor: a token
        # already sent cannot be taken back when the rest of a card number arrives.
        self.holds_output = m.policies.pii != "allow" or bool(m.policies.compliance)
        # An answer with PII would be withheld whole: the engine stops at the first.
        self.halts_on_pii = m.policies.pii == "block"
        # The facts policies see, from the agent's card (one object per set of scopes).
        self._card = AgentCard.of(spec)

    def enter(self, ctx: Context) -> Context:
        """The context this agent acts in: its scopes narrowed by the caller's."""
        ctx = ctx.enter(self._manifest.name)
        own = tuple(self._manifest.scopes)
        scopes = own if ctx.scopes is None else tuple(s for s in own if s in ctx.scopes)
        return replace(ctx, scopes=scopes)

    def facts(self, ctx: Context) -> AgentFacts:
        return self._card.facts(ctx.scopes)

    async def model_input(self, ctx: Context, messages: list[dict[str, Any]], turn: int) -> None:
        """Decide on PII in ``messages`` (the ones the model has not seen); redact in place."""
        places = [place for message in messages for place in _texts(message)]
        found = [(holder, key, scan(holder[key])) for holder, key in places]
        kinds = sorted({f.kind for *_, fs in found for f in fs})
        decision = await self._gov.decide(
            "model_input", ctx, self.facts(ctx), {"pii": kinds, "turn": turn}, "model_input"
        )
        if decision.outcome == "redact":
            for holder, key, fs in found:
                if fs:
                    holder[key] = redact(holder[key], fs)
        elif not decision.allowed:
            raise PolicyDenied(
                f"the request was refused by policy: {_why(decision)}", decision_id=decision.id
            )

    async def model_output(self, ctx: Context, text: str, turn: int) -> str:
        findings = scan(text)
        action = {"pii": sorted({f.kind for f in findings}), "turn": turn}
        decision = await self._gov.decide("model_output", ctx, self.facts(ctx), action, "model_output")
        if decision.outcome == "redact":
            return redact(text, findings)
        if not decision.allowed:
            raise PolicyDenied(
                f"the answer was withheld by policy: {_why(decision)}", decision_id=decision.id
            )
        return text

    async def tool(self, ctx: Context, name: str, arguments: str) -> Refusal | None:
        """None when the call may run; else what the model is told instead."""
        grant = self._tools.get(name, {})
        try:
            args = json.loads(arguments or "{}")
        except ValueError:
            args = {}
        action = {
            "tool": name,
            "known": name in self._tools,
            "scope": grant.get("scope"),
            "approval": bool(grant.get("approval")),
            "arguments": args if isinstance(args, dict) else {},
        }
        label = name if name in self._tools else scrub_name(name)  # the model may have made it up
        decision = await self._gov.decide("tool", ctx, self.facts(ctx), action, f"tool:{label}")
        return self._refusal(decision, f"call to {name!r}", signal=name)

    async def delegation(self, ctx: Context, target: str, target_scopes: list[str]) -> Refusal | None:
        action = {"target": target, "target_scopes": target_scopes}
        label = target if target in self._manifest.delegates else scrub_name(target)
        decision = await self._gov.decide("delegation", ctx, self.facts(ctx), action, f"delegate:{label}")
        return self._refusal(decision, f"delegation to {label!r}", signal=label)

    async def result(self, ctx: Context, name: str, text: str, classes: list[str]) -> str:
        """What the model may see of a tool's (or delegate's) result."""
        findings = scan(text)
        action = {"tool": name, "classes": classes, "pii": sorted({f.kind for f in findings})}
        decision = await self._gov.decide("data", ctx, self.facts(ctx), action, f"data:{name}")
        if decision.outcome == "redact":
            return redact(text, findings)
        if not decision.allowed:
            return f"error: the result of {name!r} was withheld by policy ({decision.id}): {_why(decision)}"
        return text

    async def memory(self, ctx: Context, operation: str, store: str, namespace: str | None) -> Refusal | None:
        """May this agent read or write this memory (its request's context, or facts)?"""
        action = {"operation": operation, "store": store, "namespace": namespace}
        where = f"{store}:{namespace}" if namespace else store
        decision = await self._gov.decide(
            "memory", ctx, self.facts(ctx), action, f"memory:{operation}:{where}"
        )
        return self._refusal(decision, f"memory {operation} of {where}")

    async def budget(self, ctx: Context, short: BudgetExceeded) -> bool:
        """May a model call the named budget cannot cover go over it (``allow``)? Asked
        only when one cannot; every answer is an audited decision."""
        action = {
            "budget": short.param,
            "amount": _usd(short.amount),
            "left": _usd(short.left),
            "limit": _usd(short.limit),
        }
        decision = await self._gov.decide("budget", ctx, self.facts(ctx), action, f"budget:{short.param}")
        return decision.allowed

    def step(self, ctx: Context, step: Step) -> None:
        """Not a decision: a step of the request's explanation report."""
        self._gov.step(ctx, step)

    @staticmethod
    def _refusal(decision: Decision, what: str, signal: str | None = None) -> Refusal | None:
        """None when the step may run; else what the model is told. An ``escalate`` of a
        tool call or delegation (``signal``: the call's name) is not a refusal but a
        control-flow signal, :class:`ApprovalRequired`, which the loop handles."""
        if decision.allowed:
            return None
        if decision.outcome == "escalate" and signal is not None:
            raise ApprovalRequired(
                f"error: the {what} needs human approval ({decision.id}); it was not run",
                decision_id=decision.id,
                tool=signal,
            )
        if decision.outcome == "escalate":
            return Refusal(
                "escalate", f"error: the {what} needs human approval ({decision.id}); it was not run"
            )
        return Refusal("deny", f"error: the {what} was denied by policy ({decision.id}): {_why(decision)}")
