"""How Fleet's replicas call one another: Ray Serve deployment handles, over gRPC or not.

Ray Serve sends a handle call either as a Ray actor call (its default, "by reference")
or over the gRPC server every replica runs (``_by_reference=False``). Fleet's calls
between its own deployments (ingress -> agent, agent -> delegate, agent -> model) carry
small pickled values and take the gRPC path by default: it skips the actor task and the
object store, and costs less per hop (measured in docs/DECISIONS.md and the ladder's
results).
Calls that pass Ray object references (the memory deployment's artifacts) and the audit
deployment's stay actor calls: gRPC cannot carry object references.

gRPC caps a message at 4 MiB unless the replicas on both ends are told otherwise, in
``RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH``, read as a replica starts: Fleet's configs set
it to Ray's own limit for a gRPC message in the application's ``runtime_env`` (the model
engine's replica, which has a ``runtime_env`` of its own, gets it there), so a long
conversation or a large delegate answer passes as it would by actor call. A deployment
given a ``runtime_env`` in code does not get the application's variables (Ray Serve 2.60):
that is why this is a config setting and not set on each deployment.

A handle call that fails (a replica at capacity, gone, or out of reach) becomes the
client's error in :func:`handle_error`, and nowhere else. A failure a retry can fix is a
503 (``Retry-After``): the deployment full (``overloaded``), or the called replica gone or
restarting (``agent_unavailable``, ``model_unavailable``). Ray Serve retries a call that
no replica accepted yet; one a replica accepted and then lost (killed, its node gone) it
hands to the caller, as ``ActorDiedError`` over an actor call and ``ActorUnavailableError``
over gRPC (a gRPC ``UNAVAILABLE``). Fleet does not retry it either: the agent may already
have run a tool. Anything else is a 502 (a model deployment failed) or a 500 (Fleet's bug).
"""

from __future__ import annotations

import logging
from typing import Any, Literal, TypeVar

import grpc
from ray.exceptions import RayActorError, RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle

from serve.errors import AgentError, AgentUnavailable, ModelError, ModelUnavailable, Overloaded, RequestError

__all__ = [
    "GRPC_LIMIT",
    "Hop",
    "Transport",
    "grpc_limit_env",
    "handle_error",
    "over",
    "retry_reason",
    "transport_failure",
]

log = logging.getLogger("fleet.handles")

Transport = Literal["grpc", "actor"]
# Whose call failed: the ingress's to an agent, an agent's to its delegate, an agent's to
# its model deployment, or another made inside an agent's replica that its loop did not
# answer for.
Hop = Literal["agent", "delegate", "model", "behind"]
H = TypeVar("H", bound=DeploymentHandle[Any])

GRPC_LIMIT = 2**31 - 1  # Ray Serve's send limit (RAY_SERVE_GRPC_MAX_MESSAGE_SIZE)


def grpc_limit_env() -> dict[str, str]:
    """The variable that lifts a replica's gRPC message cap to :data:`GRPC_LIMIT`."""
    return {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(GRPC_LIMIT)}


def over(handle: H, transport: Transport) -> H:
    """``handle``, calling over ``transport``."""
    return handle.options(_by_reference=transport == "actor")  # type: ignore[return-value]


def transport_failure(exc: BaseException) -> str | None:
    """What a handle call that failed in gRPC itself means (None: not such a failure).

    Serve turns an unreachable replica into its own error; any other gRPC status reaches
    the caller as the raw ``AioRpcError``, a message over a replica's cap among them."""
    if not isinstance(exc, grpc.aio.AioRpcError):
        return None
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (exc.details() or ""):
        return (
            "a message is larger than the replicas' gRPC limit (set "
            "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH in the application's runtime_env)"
        )
    return f"the call failed in transport (gRPC {exc.code().name})"


_GONE = "a replica is gone or restarting"
# gRPC statuses of a replica that went away: its process died (UNAVAILABLE), or its server
# cancelled the call as it shut down (CANCELLED; a caller's own cancellation is an
# asyncio.CancelledError, never an AioRpcError).
_GONE_STATUSES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


def retry_reason(exc: BaseException) -> str | None:
    """Why a retry a moment later may succeed where ``exc`` failed (None: it would not)."""
    if isinstance(exc, BackPressureError):
        return "is at capacity"
    if isinstance(exc, DeploymentUnavailableError):
        return "is not available yet"
    # ActorDiedError, ActorUnavailableError; a task error that carries one (Serve wraps an
    # upstream actor's death so, and keeps the death as its cause).
    causes = (exc, getattr(exc, "cause", None), exc.__cause__)
    if any(isinstance(c, RayActorError | ReplicaUnavailableError) for c in causes):
        return f"is unavailable: {_GONE}"
    if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _GONE_STATUSES:
        return f"is unavailable: {_GONE}"
    return None


def _retryable(exc: BaseException, reason: str, called: str, hop: Hop) -> Overloaded:
    """The 503 of a call a retry may fix; back-pressure keeps its own code, ``overloaded``."""
    log.warning("call to %s (%s) failed, retryable: %s", called, hop, type(exc).__name__)
    kind: type[Overloaded]
    if hop == "model":
        subject, kind = f"model deployment {called!r}", ModelUnavailable
    elif hop == "behind":
        subject, kind = f"a deployment behind agent {called!r}", AgentUnavailable
    else:
        subject, kind = f"agent {called!r}", AgentUnavailable
    kind = Overloaded if isinstance(exc, BackPressureError) else kind
    return kind(f"{subject} {reason}; retry later")


def handle_error(exc: BaseException, agent: str, hop: Hop = "agent", request_id: str = "") -> RequestError:
    """What a failed call on ``hop`` means for the client; ``agent`` is the one called
    (``"model"``: the model deployment; ``"behind"``: the agent whose replica made the call)."""
    reason = retry_reason(exc)
    if reason is not None:
        return _retryable(exc, reason, agent, hop)
    failure = transport_failure(exc)
    if hop == "delegate":  # a tool error its caller's model is told of
        return AgentError(f"agent {agent!r} is unavailable: {failure or type(exc).__name__}")
    if hop == "model":
        return _model_failure(exc, agent, failure)
    if hop == "behind":
        log.error("agent %s failed on %s", agent, request_id, exc_info=exc)
        if failure is not None:
            return ModelError(f"a deployment behind agent {agent!r} could not be reached: {failure}")
        if isinstance(exc, RayError):
            return ModelError(f"a deployment behind agent {agent!r} failed: {type(exc).__name__}")
        return AgentError(f"agent {agent!r} failed (request {request_id})")
    log.error("call to agent %s failed", agent, exc_info=exc)
    if failure is not None:  # e.g. a cluster deployed without the configs' runtime_env
        return AgentError(f"agent {agent!r} could not be reached: {failure}")
    return AgentError(f"agent {agent!r} failed: {type(exc).__name__}")


def _model_failure(exc: BaseException, deployment: str, failure: str | None) -> RequestError:
    """A model deployment's call that failed for good: the deployment's fault (502) or Fleet's (500)."""
    log.error("call to model deployment %s failed", deployment, exc_info=exc)
    if failure is not None:
        return ModelError(f"model deployment {deployment!r} could not be reached: {failure}")
    if isinstance(exc, RayError):  # e.g. an exception the replica raised instead of answering
        return ModelError(f"model deployment {deployment!r} failed: {type(exc).__name__}")
    return AgentError(f"the call to model deployment {deployment!r} failed: {type(exc).__name__}")
