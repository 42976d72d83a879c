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
client's error in :func:`handle_error`, and nowhere else.
"""

from __future__ import annotations

import logging
from typing import Any, Literal, TypeVar

import grpc
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from serve.errors import AgentError, ModelError, Overloaded, RequestError

__all__ = ["GRPC_LIMIT", "Hop", "Transport", "grpc_limit_env", "handle_error", "over", "transport_failure"]

log = logging.getLogger("fleet.handles")

Transport = Literal["grpc", "actor"]
# Whose call failed: the ingress's to an agent, an agent's to its delegate, or one made
# inside an agent's replica (its model's handle) that its loop did not answer for.
Hop = Literal["agent", "delegate", "behind"]
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


def handle_error(exc: BaseException, agent: str, hop: Hop = "agent", request_id: str = "") -> RequestError:
    """What a failed call on ``hop`` means for the client; ``agent`` is the one called
    (``"behind"``: the agent whose replica made the call)."""
    failure = transport_failure(exc)
    if hop == "delegate":  # a tool error its caller's model is told of
        return AgentError(f"agent {agent!r} is unavailable: {failure or type(exc).__name__}")
    if hop == "behind":
        log.error("agent %s failed on %s", agent, request_id, exc_info=exc)
        if failure is not None:
            return ModelError(f"a deployment behind agent {agent!r} could not be reached: {failure}")
        if isinstance(exc, RayError):
            return ModelError(f"a deployment behind agent {agent!r} is unavailable")
        return AgentError(f"agent {agent!r} failed (request {request_id})")
    if isinstance(exc, BackPressureError):
        return Overloaded(f"agent {agent!r} is at capacity; retry later")
    if isinstance(exc, DeploymentUnavailableError):
        return Overloaded(f"agent {agent!r} is not available yet; retry later")
    log.error("call to agent %s failed", agent, exc_info=exc)
    if failure is not None:  # e.g. a cluster deployed without the configs' runtime_env
        return AgentError(f"agent {agent!r} could not be reached: {failure}")
    return AgentError(f"agent {agent!r} failed: {type(exc).__name__}")
