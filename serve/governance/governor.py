"""The governor: the decision that every governed step goes through.

Each replica (ingress and agents) holds a :class:`Governor`: it builds the policy input
once (``fleet.policy/v1``), asks the policy engine at a decision point, fails closed,
evaluates shadow policies beside the enforced ones, and hands one audit record per
decision (and each step of the request) to its :class:`AuditSink`. The agent loop
reaches it through :class:`serve.governance.guard.AgentGuard`.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from pydantic import TypeAdapter

from serve.auth import ANONYMOUS
from serve.canonical import canonical
from serve.context import Context
from serve.errors import PolicyFailure
from serve.governance.config import Shadow
from serve.governance.decisions import Decision
from serve.policy.engine import EncodedInput, PolicyEngine, encode_input
from serve.policy.pii import redact, scan
from serve.policy.schema import INPUT_VERSION, AgentFacts, Point, Principal
from serve.steps import Step

__all__ = ["AuditSink", "Governor"]

_JSON_ACTION: TypeAdapter[dict[str, Any]] = TypeAdapter(dict[str, Any])


class Governor:
    """Decisions for one replica: policy, fail closed, shadow, one audit record each."""

    def __init__(
        self,
        engine: PolicyEngine,
        shadow: Shadow | None,
        sink: AuditSink,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine, self._shadow, self._sink, self._clock = engine, shadow, sink, clock
        # The principal and agent facts of recent decisions, as JSON and canonical JSON, by
        # identity: a request's decisions share them (its guard keeps one AgentFacts per
        # scope set), so each is dumped and encoded once, not once per decision.
        self._dumped: dict[int, tuple[Principal | AgentFacts, dict[str, Any], bytes]] = {}

    async def decide(
        self, point: Point, ctx: Context, agent: AgentFacts, action: dict[str, Any], label: str
    ) -> Decision:
        """The decision at ``point``, audited (and the shadow engine's beside it).

        Awaited: the engine may be a server. The input is encoded once for both engines."""
        # The PolicyInput document (``fleet.policy/v1``), built as the dict its model dumps
        # to (a test holds the two equal): validating it again per decision cost more than
        # the decision.
        chain = list(ctx.chain)
        principal, principal_json = self._dump(ctx.principal or ANONYMOUS)
        facts, facts_json = self._dump(agent)
        # As the model dumps it (~1 µs): NaN and infinities (json.loads reads them in a model's
        # tool arguments) become null, a set a list.
        action = _JSON_ACTION.dump_python(action, mode="json")
        encoded = encode_input(point, ctx.request_id, chain, principal_json, facts_json, action)
        # Engines read the document and never change it: its principal and agent parts are
        # shared by a replica's decisions.
        document = {
            "version": INPUT_VERSION,
            "point": point,
            "request": {"id": ctx.request_id, "chain": chain},
            "principal": principal,
            "agent": facts,
            "action": action,
        }
        input_sha = hashlib.sha256(encoded.whole).hexdigest()
        decision = await self._evaluate(self._engine, point, document, encoded)
        self._audit(ctx, agent.name, label, decision, input_sha, enforced=True)
        if self._shadow is not None and point in self._shadow[1]:
            shadow = await self._evaluate(self._shadow[0], point, document, encoded)
            self._audit(ctx, agent.name, label, shadow, input_sha, enforced=False)
        return decision

    def _dump(self, model: Principal | AgentFacts) -> tuple[dict[str, Any], bytes]:
        hit = self._dumped.get(id(model))
        if hit is not None and hit[0] is model:
            return hit[1], hit[2]
        if len(self._dumped) >= 256:  # principals arrive with each request: keep the recent ones
            self._dumped.clear()
        dumped = model.model_dump(mode="json")
        encoded = canonical(dumped)
        self._dumped[id(model)] = (model, dumped, encoded)
        return dumped, encoded

    async def _evaluate(
        self, engine: PolicyEngine, point: Point, document: dict[str, Any], encoded: EncodedInput
    ) -> Decision:
        policy, version = engine.describe(point)
        decision_id = "dec_" + os.urandom(16).hex()  # 128 bits: unguessable
        try:
            result = await engine.evaluate(point, document, encoded)
        except PolicyFailure as exc:  # fail closed
            return Decision(decision_id, point, "deny", [f"policy failed, denied: {exc}"], policy, version)
        except Exception as exc:  # an engine bug or a malformed answer: still closed
            reason = f"policy failed, denied: {type(exc).__name__}"
            return Decision(decision_id, point, "deny", [reason], policy, version)
        return Decision(decision_id, point, result.outcome, result.reasons, policy, version)

    def _audit(
        self, ctx: Context, agent: str, label: str, d: Decision, input_sha: str, *, enforced: bool
    ) -> None:
        principal = ctx.principal or ANONYMOUS
        self._sink.append(
            {
                "time": round(self._clock(), 6),
                "request_id": ctx.request_id,
                "decision_id": d.id,
                "tenant": principal.tenant,
                "agent": agent,
                "point": d.point,
                "action": label,
                "policy": d.policy,
                "policy_version": d.version,
                "outcome": d.outcome,
                "enforced": enforced,
                # A policy may quote what it saw: reasons are scrubbed like any output.
                "reasons": [redact(r, scan(r)) for r in d.reasons],
                "input_sha256": input_sha,
            }
        )

    def step(self, ctx: Context, step: Step) -> None:
        """A step for the request's explanation report (no content, no PII)."""
        principal = ctx.principal or ANONYMOUS
        self._sink.step(step, step.record(round(self._clock(), 6), ctx.request_id, principal.tenant))


class AuditSink(Protocol):
    def append(self, record: dict[str, Any]) -> None:
        """One decision's audit record."""

    def step(self, step: Step, record: dict[str, Any]) -> None:
        """One step, typed and as its record (what the audit service stores)."""
