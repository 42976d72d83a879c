"""The steps of a request that are not decisions: model calls, tool calls, delegations, its outcome.

A step is counted by the metrics sink and kept by the audit service beside the request's
decisions, for its explanation report. Each is a frozen value; :meth:`record` is the dict
the audit service stores (a compatibility contract: the audit event format and the
``/explain`` report read its keys, in this order). No step holds content or PII: token
counts, names the manifest declares (or scrubbed ones), statuses.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from decimal import Decimal
from typing import Any, ClassVar, Literal

__all__ = [
    "ApprovalEvent",
    "ApprovalStep",
    "DelegationStep",
    "ModelCallStep",
    "OutcomeStep",
    "Step",
    "ToolCallStep",
    "ToolStatus",
]

ToolStatus = Literal["ok", "invalid", "error", "denied", "escalated"]


ApprovalEvent = Literal[
    "requested", "approved", "rejected", "expired", "resumed", "ran", "outcome_unknown", "completed", "failed"
]


def _record(
    step: ModelCallStep | ToolCallStep | DelegationStep | ApprovalStep,
    time: float,
    request_id: str,
    tenant: str,
) -> dict[str, Any]:
    """The record of an agent's step: the request's keys, its kind, then its fields in order."""
    record: dict[str, Any] = {"time": time, "request_id": request_id, "tenant": tenant, "kind": step.kind}
    for f in fields(step):
        value = getattr(step, f.name)
        # Money stays exact in JSON, and reads as fleet.cost_usd does: 0.00000015, not 1.5E-7.
        record[f.name] = f"{value:f}" if isinstance(value, Decimal) else value
    return record


@dataclass(frozen=True, slots=True)
class ModelCallStep:
    """One model call of an agent's turn: its tokens, how many tool calls it asked for, why it stopped."""

    kind: ClassVar[str] = "model_call"
    agent: str
    turn: int
    prompt_tokens: int
    completion_tokens: int
    tool_calls: int
    finish_reason: str
    cost_usd: Decimal = Decimal(0)  # at the agent's backend's price

    def record(self, time: float, request_id: str, tenant: str) -> dict[str, Any]:
        return _record(self, time, request_id, tenant)


@dataclass(frozen=True, slots=True)
class ToolCallStep:
    """One server-side call (a tool or a delegate): its name as shown, how it went, how long it took."""

    kind: ClassVar[str] = "tool_call"
    agent: str
    tool: str  # the declared name, or the scrubbed one of a tool the model made up
    status: ToolStatus
    duration_s: float
    # The call's arguments as the model gave them (JSON text), PII redacted and capped:
    # what an explanation and an eval read of what was done.
    arguments: str | None = None

    def record(self, time: float, request_id: str, tenant: str) -> dict[str, Any]:
        return _record(self, time, request_id, tenant)


@dataclass(frozen=True, slots=True)
class DelegationStep:
    """An agent handing a task to another (after the delegation was allowed)."""

    kind: ClassVar[str] = "delegation"
    agent: str
    target: str

    def record(self, time: float, request_id: str, tenant: str) -> dict[str, Any]:
        return _record(self, time, request_id, tenant)


@dataclass(frozen=True, slots=True)
class OutcomeStep:
    """How the ingress answered a chat completion: an answer (its finish reason) or a failure (its code).

    Recorded by the ingress, so no agent. A failure's code may be None (a plain invalid
    request): the record says so rather than leaving the key out."""

    kind: ClassVar[str] = "outcome"
    status: int
    finish_reason: str | None = None
    code: str | None = None

    def record(self, time: float, request_id: str, tenant: str) -> dict[str, Any]:
        record: dict[str, Any] = {
            "time": time,
            "request_id": request_id,
            "tenant": tenant,
            "kind": self.kind,
            "agent": None,
            "status": self.status,
        }
        if self.finish_reason is not None:
            record["finish_reason"] = self.finish_reason
        else:
            record["code"] = self.code
        return record


@dataclass(frozen=True, slots=True)
class ApprovalStep:
    """One step of a gated call's approval (recorded by the approvals service): requested,
    decided (``by`` whom, ``detail`` the reason, PII redacted), resumed, the tool's run
    (``detail`` its status), and how the request ended."""

    kind: ClassVar[str] = "approval"
    agent: str
    approval_id: str
    tool: str
    event: ApprovalEvent
    by: str | None = None
    detail: str | None = None

    def record(self, time: float, request_id: str, tenant: str) -> dict[str, Any]:
        return _record(self, time, request_id, tenant)


Step = ModelCallStep | ToolCallStep | DelegationStep | OutcomeStep | ApprovalStep
