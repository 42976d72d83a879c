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


# (hop, failure, status, message): one mapper, whoever made the call.
MAPPED = [
    ("agent", _full, 503, "agent 'tester' is at capacity; retry later"),
    ("agent", _unavailable, 503, "agent 'tester' is not available yet; retry later"),
    (
        "agent",
        lambda: _rpc_error("CANCELLED"),
        500,
        "agent 'tester' could not be reached: the call failed in transport (gRPC CANCELLED)",
    ),
    ("agent", lambda: ValueError("x"), 500, "agent 'tester' failed: ValueError"),
    ("delegate", _full, 500, "agent 'tester' is unavailable: BackPressureError"),
    (
        "delegate",
        lambda: _rpc_error("UNAVAILABLE"),
        500,
        "agent 'tester' is unavailable: the call failed in transport (gRPC UNAVAILABLE)",
    ),
    (
        "behind",
        lambda: _rpc_error("UNAVAILABLE"),
        502,
        "a deployment behind agent 'tester' could not be reached: the call failed in transport "
        "(gRPC UNAVAILABLE)",
    ),
    ("behind", _died, 502, "a deployment behind agent 'tester' is unavailable"),
    ("behind", lambda: KeyError("k"), 500, "agent 'tester' failed (request req_1)"),
]


@pytest.mark.parametrize(
    ("hop", "failure", "status", "message"), MAPPED, ids=[f"{m[0]}-{i}" for i, m in enumerate(MAPPED)]
)
def test_a_failed_handle_call_maps_to_one_client_error(
    hop: Any, failure: Callable[[], Exception], status: int, message: str
) -> None:
    from serve.handles import handle_error

    error = handle_error(failure(), "tester", hop, "req_1")
    assert (error.status, error.message) == (status, message)
