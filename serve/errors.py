"""Fleet's one exception tree, and its conversion to the OpenAI error envelope.

Three families, as in pydantic-ai:
- ``ConfigError``: a developer's mistake found before anything runs (manifest, config).
- ``RequestError`` and its subclasses: a request that Fleet answers with a 4xx/5xx; each
  class fixes its status and type, and :func:`envelope` makes the body, in this one place.
- ``Signal``: control flow, not failure: a step that cannot go on without something else.
  ``ApprovalRequired`` (a tool call or delegation a policy escalates) is raised by the
  guard and handled in one place of the loop (:mod:`serve.loop.calls`); ``TurnParked``
  carries a turn that waits for people out of the loop, to the agent that stores it.

Beside them, failures that never reach a client as such: ``ToolError`` (a tool failed:
the loop tells the model), ``PolicyFailure`` (the governor turns it into a denial) and
``MemoryFull`` (the memory service turns it into an answer).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

__all__ = [
    "AgentError",
    "AgentUnavailable",
    "ApprovalRequired",
    "ApprovalsUnavailable",
    "AuditUnavailable",
    "BudgetExceeded",
    "BudgetUnavailable",
    "ConfigError",
    "Conflict",
    "FleetError",
    "Gone",
    "InvalidRequest",
    "InvalidToolArguments",
    "MaxTurnsExceeded",
    "MemoryDenied",
    "MemoryFull",
    "MemoryUnavailable",
    "ModelError",
    "ModelUnavailable",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "PolicyDenied",
    "PolicyFailure",
    "RateLimitExceeded",
    "RequestError",
    "Signal",
    "Timeout",
    "ToolDenied",
    "ToolError",
    "TurnParked",
    "Unauthorized",
    "envelope",
    "field_path",
]


class FleetError(Exception):
    """Root of every error Fleet raises on purpose."""


class ConfigError(FleetError):
    """A manifest, prompt, tool module or deploy config is wrong. Names file and field."""

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None):
        self.file = file
        self.field = field
        where = ": ".join(p for p in (file, field) if p)
        super().__init__(f"{where}: {message}" if where else message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_config_error, (str(self), self.file, self.field))


def _rebuild_config_error(text: str, file: str | None, field: str | None) -> ConfigError:
    err = ConfigError.__new__(ConfigError)
    Exception.__init__(err, text)
    err.file, err.field = file, field
    return err


class RequestError(FleetError):
    """An error answered to the client. Subclasses fix the status and the type."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses Ray process boundaries: keep the keyword arguments.
        return (_rebuild_request_error, (type(self), self.message, self.param, self.code))

    def to_dict(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


def _rebuild_request_error(
    cls: type[RequestError], message: str, param: str | None, code: str | None
) -> RequestError:
    return cls(message, param=param, code=code)


class InvalidRequest(RequestError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(RequestError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PolicyDenied(RequestError):
    """A policy decision refused the request; ``decision_id`` finds it in the audit log."""

    status = 403
    type = "permission_error"
    code = "policy_denied"

    def __init__(self, message: str, *, decision_id: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)
        self.decision_id = decision_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_denied, (self.message, self.decision_id, self.param, self.code))

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "decision_id": self.decision_id}


def _rebuild_denied(message: str, decision_id: str, param: str | None, code: str | None) -> PolicyDenied:
    return PolicyDenied(message, decision_id=decision_id, param=param, code=code)


class BudgetExceeded(RequestError):
    """A budget cannot cover the next model call: refused before the engine is called.
    ``param`` names the budget (``request:<agent>``, ``tenant:acme:day``); ``amount``,
    ``left`` and ``limit`` (USD) are what the ``budget`` policy point is asked about."""

    status = 402
    type = "insufficient_quota"
    code = "budget_exceeded"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
        amount: Decimal | None = None,
        left: Decimal | None = None,
        limit: Decimal | None = None,
    ):
        super().__init__(message, param=param, code=code)
        self.retry_after_s = retry_after_s  # until the budget's period resets (None: it never does)
        self.amount, self.left, self.limit = amount, left, limit

    def __reduce__(self) -> tuple[Any, ...]:
        fields = (self.message, self.param, self.code, self.retry_after_s, self.amount, self.left, self.limit)
        return (_rebuild_budget, fields)


def _rebuild_budget(
    message: str,
    param: str | None,
    code: str | None,
    retry_after_s: int | None,
    amount: Decimal | None = None,
    left: Decimal | None = None,
    limit: Decimal | None = None,
) -> BudgetExceeded:
    return BudgetExceeded(
        message, param=param, code=code, retry_after_s=retry_after_s, amount=amount, left=left, limit=limit
    )


class RateLimitExceeded(RequestError):
    """A rate limit per minute refuses the request (429). ``type`` says which kind
    (``requests`` or ``tokens``, as the OpenAI API does), ``param`` which limit."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "requests",
        retry_after_s: float = 1.0,
    ):
        super().__init__(message, param=param, code=code)
        self.type = kind
        self.retry_after_s = retry_after_s  # until the window has room for one more

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_rate, (self.message, self.param, self.code, self.type, self.retry_after_s))


def _rebuild_rate(
    message: str, param: str | None, code: str | None, kind: str, retry_after_s: float
) -> RateLimitExceeded:
    return RateLimitExceeded(message, param=param, code=code, kind=kind, retry_after_s=retry_after_s)


class BudgetUnavailable(RequestError):
    """The ledger did not answer in time (its replica restarting): retry."""

    status = 503
    type = "server_error"
    code = "budget_unavailable"


class NotFound(RequestError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(RequestError):
    """The thing asked about is no longer in the state the request needs (an approval decided)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class Gone(RequestError):
    """The thing asked about existed and is no more (an approval expired)."""

    status = 410
    type = "invalid_request_error"
    code = "gone"


class PayloadTooLarge(RequestError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class AgentError(RequestError):
    """The agent could not produce an answer (its own logic, not the client's input)."""

    status = 500
    type = "server_error"
    code = "agent_error"


class MaxTurnsExceeded(AgentError):
    code = "max_turns_exceeded"


class ModelError(RequestError):
    """The model backend failed (engine down, upstream error, script error)."""

    status = 502
    type = "server_error"
    code = "model_error"


class Overloaded(RequestError):
    status = 503
    type = "server_error"
    code = "overloaded"


class AgentUnavailable(Overloaded):
    """An agent's replica is gone or restarting (killed, its node lost, not yet replaced): retry."""

    code = "agent_unavailable"


class ModelUnavailable(Overloaded):
    """A model's replica or engine is gone or restarting: retry."""

    code = "model_unavailable"


class MemoryUnavailable(Overloaded):
    code = "memory_unavailable"


class ApprovalsUnavailable(Overloaded):
    code = "approvals_unavailable"


class AuditUnavailable(Overloaded):
    """The audit log could not make a request's records durable in time (nothing leaves)."""

    code = "audit_unavailable"


class Timeout(RequestError):
    status = 504
    type = "server_error"
    code = "timeout"


class ToolError(FleetError):
    """A tool failed or timed out; reported to the model as the tool's result."""


class ToolDenied(ToolError):
    """A policy decision inside a tool (a memory read or write) refused it."""


class InvalidToolArguments(ToolError):
    """The model's arguments do not fit the tool's schema (or are not JSON); told to the model, counted."""


class MemoryDenied(ToolDenied):
    """The policy refused a memory read or write."""


class MemoryFull(FleetError, ValueError):
    """One value is larger than its memory store may hold at all."""


class PolicyFailure(FleetError):
    """A policy could not be evaluated (no rule, undefined, malformed, engine down): deny."""


class Signal(FleetError):
    """Control flow: the step cannot go on now; the loop handles it, a client never sees it raw."""


class ApprovalRequired(Signal):
    """A tool call or delegation needs a human's approval before it may run."""

    def __init__(self, message: str, *, decision_id: str, tool: str):
        super().__init__(message)
        self.decision_id = decision_id
        self.tool = tool

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_approval, (str(self), self.decision_id, self.tool))


def _rebuild_approval(message: str, decision_id: str, tool: str) -> ApprovalRequired:
    return ApprovalRequired(message, decision_id=decision_id, tool=tool)


class TurnParked(Signal):
    """A turn stops to wait: for people to decide on its gated calls (``gates``), or for a
    delegate's turn that waits for them. The agent stores it (serve/approvals/) and answers."""

    def __init__(self, gates: list[Any]):
        super().__init__(f"the turn waits for {len(gates)} approval(s)")
        self.gates = gates

    def __reduce__(self) -> tuple[Any, ...]:
        return (TurnParked, (self.gates,))


def field_path(loc: tuple[int | str, ...], skip: frozenset[str] = frozenset()) -> str:
    """A pydantic error location as the user wrote it: ``tools[0].scope``.

    ``skip`` names the tags pydantic adds for union members and discriminators (the
    ``scripted`` in ``models.default.scripted.script``), which the user never wrote.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in skip and not _is_union_tag(part):
            out += f".{part}" if out else part
    return out


def _is_union_tag(part: str) -> bool:
    # pydantic names union members by their type: "str", "list[TextPart]", "literal['a']",
    # "function-after[...]", "dict[str,any]", or a model class name (capitalised).
    return (
        part in {"str", "int", "float", "bool"}
        or part.startswith(("list[", "literal[", "function-", "dict[", "tuple[", "union["))
        or part[:1].isupper()
    )


def envelope(error: RequestError) -> dict[str, Any]:
    """The OpenAI error body for ``error``."""
    return {"error": error.to_dict()}
