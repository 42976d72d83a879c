"""serve.handles: the transport Fleet's deployments call each other over."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve.app import FleetArgs
from serve.handles import GRPC_LIMIT, grpc_limit_env
from serve.models.vllm import VLLMConfig
from serve.placement import model_deployment_options
from tests.unit.conftest import ROOT

LIMIT = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"


def test_grpc_is_the_default_transport() -> None:
    scripted = {"kind": "scripted", "script": [{"replies": [{"content": "hi"}]}]}
    assert FleetArgs.model_validate({"agents": ["a"], "models": {"default": scripted}}).transport == "grpc"


@pytest.mark.parametrize(
    "path", [*sorted((ROOT / "configs").glob("*.yaml")), ROOT / "tests/integration/fleet-test.yaml"], ids=str
)
def test_every_config_lifts_grpcs_message_cap_for_its_replicas(path: Path) -> None:
    """gRPC's own cap (4 MiB) would fail a long conversation that an actor call carries."""
    raw = yaml.safe_load(path.read_text())
    for app in raw.get("applications", [raw]):
        assert app["runtime_env"]["env_vars"][LIMIT] == str(GRPC_LIMIT), path


def test_the_engine_replica_gets_the_limit_beside_its_own_environment() -> None:
    """Its runtime_env, set in code, hides the application's: it carries the limit itself."""
    engine = VLLMConfig.model_validate({"kind": "vllm", "model": "embedded:smollm2"})
    env = model_deployment_options("default", engine)["ray_actor_options"]["runtime_env"]["env_vars"]
    assert env[LIMIT] == grpc_limit_env()[LIMIT] == str(GRPC_LIMIT)
    assert env["HF_HUB_OFFLINE"] == "1"


def test_a_message_over_the_grpc_limit_is_named_in_the_error() -> None:
    """Deployed without the configs' runtime_env, the cap shows as what it is, not a bare 500."""
    import grpc

    from serve.errors import AgentError
    from serve.handles import handle_error

    exc = grpc.aio.AioRpcError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="Received message larger than max (5243509 vs. 4194304)",
    )
    error = handle_error(exc, "tester")
    assert isinstance(error, AgentError)
    assert LIMIT in error.message and "'tester'" in error.message


def test_other_grpc_failures_name_their_status_and_others_are_not_transport() -> None:
    import grpc

    from serve.handles import transport_failure

    cancelled = grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata())
    assert transport_failure(cancelled) == "the call failed in transport (gRPC CANCELLED)"
    assert transport_failure(ValueError("x")) is None


def _rpc_error(code: str, details: str | None = None) -> Exception:
    import grpc

    status = getattr(grpc.StatusCode, code)
    return grpc.aio.AioRpcError(status, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def _unavailable() -> Exception:
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError

    return DeploymentUnavailableError(DeploymentID(name="tester", app_name="fleet"))


def _full() -> Exception:
    from ray.serve.exceptions import BackPressureError

    return BackPressureError(num_queued_requests=3, max_queued_requests=2)


def _died() -> Exception:
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


def _lost() -> Exception:
    """What Serve raises when a replica dies under a gRPC call (it turns UNAVAILABLE into it)."""
    from ray.exceptions import ActorUnavailableError

    return ActorUnavailableError("Actor is unavailable.", None)


def _actor() -> Exception:
    from ray.exceptions import RayActorError

    return RayActorError()


def _replica() -> Exception:
    from ray.serve.exceptions import ReplicaUnavailableError

    return ReplicaUnavailableError("fleet#tester#abc")


def _task(cause: Exception) -> Exception:
    from ray.exceptions import RayTaskError

    return RayTaskError("chat", "Traceback ...", cause, ip="127.0.0.1")  # type: ignore[no-untyped-call]


GONE = "is unavailable: a replica is gone or restarting; retry later"

# (hop, failure, status, code, message): one mapper, whoever made the call. A failure a
# retry can fix is a 503; a model deployment's own failure a 502; anything else Fleet's bug.
MAPPED = [
    ("agent", _full, 503, "overloaded", "agent 'tester' is at capacity; retry later"),
    # A BackPressureError raised in a replica reaches its caller as a task error that is one too.
    ("agent", lambda: _task(_full()).as_instanceof_cause(), 503, "overloaded", "agent 'tester' is at capacity; retry later"),
    ("agent", _unavailable, 503, "agent_unavailable", "agent 'tester' is not available yet; retry later"),
    ("agent", _lost, 503, "agent_unavailable", f"agent 'tester' {GONE}"),
    ("agent", _died, 503, "agent_unavailable", f"agent 'tester' {GONE}"),
    ("agent", _actor, 503, "agent_unavailable", f"agent 'tester' {GONE}"),
    ("agent", _replica, 503, "agent_unavailable", f"agent 'tester' {GONE}"),
    ("agent", lambda: _task(_died()), 503, "agent_unavailable", f"agent 'tester' {GONE}"),
    ("agent", lambda: _rpc_error("UNAVAILABLE"), 503, "agent_unavailable", f"agent 'tester' {GONE}"),
    ("agent", lambda: _rpc_error("CANCELLED"), 503, "agent_unavailable", f"agent 'tester' {GONE}"),
    (
        "agent",
        lambda: _rpc_error("INTERNAL"),
        500,
        "agent_error",
        "agent 'tester' could not be reached: the call failed in transport (gRPC INTERNAL)",
    ),
    ("agent", lambda: _task(ValueError("x")), 500, "agent_error", "agent 'tester' failed: RayTaskError"),
    ("agent", lambda: ValueError("x"), 500, "agent_error", "agent 'tester' failed: ValueError"),
    ("delegate", _full, 503, "overloaded", "agent 'tester' is at capacity; retry later"),
    ("delegate", _lost, 503, "agent_unavailable", f"agent 'tester' {GONE}"),
    ("delegate", lambda: _rpc_error("UNAVAILABLE"), 503, "agent_unavailable", f"agent 'tester' {GONE}"),
    (
        "delegate",
        lambda: _rpc_error("INTERNAL"),
        500,
        "agent_error",
        "agent 'tester' is unavailable: the call failed in transport (gRPC INTERNAL)",
    ),
    ("model", _full, 503, "overloaded", "model deployment 'tester' is at capacity; retry later"),
    ("model", _unavailable, 503, "model_unavailable", "model deployment 'tester' is not available yet; retry later"),
    ("model", _lost, 503, "model_unavailable", f"model deployment 'tester' {GONE}"),
    ("model", _died, 503, "model_unavailable", f"model deployment 'tester' {GONE}"),
    ("model", lambda: _rpc_error("UNAVAILABLE"), 503, "model_unavailable", f"model deployment 'tester' {GONE}"),
    (
        "model",
        lambda: _rpc_error("INTERNAL"),
        502,
        "model_error",
        "model deployment 'tester' could not be reached: the call failed in transport (gRPC INTERNAL)",
    ),
    ("model", lambda: _task(ValueError("x")), 502, "model_error", "model deployment 'tester' failed: RayTaskError"),
    ("model", lambda: KeyError("k"), 500, "agent_error", "the call to model deployment 'tester' failed: KeyError"),
    ("behind", _full, 503, "overloaded", "a deployment behind agent 'tester' is at capacity; retry later"),
    ("behind", _died, 503, "agent_unavailable", f"a deployment behind agent 'tester' {GONE}"),
    (
        "behind",
        lambda: _rpc_error("UNAVAILABLE"),
        503,
        "agent_unavailable",
        f"a deployment behind agent 'tester' {GONE}",
    ),
    (
        "behind",
        lambda: _rpc_error("INTERNAL"),
        502,
        "model_error",
        "a deployment behind agent 'tester' could not be reached: the call failed in transport "
        "(gRPC INTERNAL)",
    ),
    ("behind", lambda: _task(ValueError("x")), 502, "model_error", "a deployment behind agent 'tester' failed: RayTaskError"),
    ("behind", lambda: KeyError("k"), 500, "agent_error", "agent 'tester' failed (request req_1)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("hop", "failure", "status", "code", "message"), MAPPED, ids=[f"{m[0]}-{i}" for i, m in enumerate(MAPPED)]
)
def test_a_failed_handle_call_maps_to_one_client_error(
    hop: Any, failure: Callable[[], Exception], status: int, code: str, message: str
) -> None:
    from serve.handles import handle_error

    error = handle_error(failure(), "tester", hop, "req_1")
    assert (error.status, error.code, error.message) == (status, code, message)


@pytest.mark.parametrize(
    ("failure", "hop", "code"),
    [
        (_lost, "agent", "agent_unavailable"),
        (_full, "agent", "overloaded"),  # the ingress's call to an agent whose queue is full
        (_full, "delegate", "overloaded"),
        (_full, "model", "overloaded"),
        (_full, "behind", "overloaded"),
    ],
    ids=["lost", "full-agent", "full-delegate", "full-model", "full-behind"],
)
def test_a_failure_a_retry_can_fix_is_a_503_with_retry_after_and_a_bug_is_a_500_without(
    failure: Callable[[], Exception], hop: Any, code: str
) -> None:
    """What a client sees: a failure a retry can fix says when to retry; Fleet's own bug does not."""
    import json

    from serve.handles import handle_error
    from serve.protocol import error_response

    retryable = error_response(handle_error(failure(), "tester", hop), retry_after=2)
    assert (retryable.status_code, retryable.headers["retry-after"]) == (503, "2")
    body = json.loads(bytes(retryable.body))
    assert body["error"]["code"] == code and body["error"]["type"] == "server_error"
    # Ray's words (ActorUnavailableError, its queue counts) are not the client's business.
    assert not any(word in body["error"]["message"] for word in ("Error", "queued"))
    bug = error_response(handle_error(ValueError("x"), "tester"))
    assert bug.status_code == 500 and "retry-after" not in bug.headers


def test_a_replica_that_is_gone_is_told_apart_from_other_failures() -> None:
    from serve.handles import retry_reason

    assert (
        retry_reason(_lost())
        == retry_reason(_rpc_error("UNAVAILABLE"))
        == "is unavailable: a replica is gone or restarting"
    )
    assert retry_reason(_full()) == "is at capacity"
    for other in (
        _rpc_error("INTERNAL"),
        _rpc_error("RESOURCE_EXHAUSTED"),
        _task(ValueError("x")),
        KeyError("k"),
    ):
        assert retry_reason(other) is None, other
