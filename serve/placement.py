"""Where Fleet's deployments run, and where the state they keep lives.

The options each deployment is bound with (its CPU share, the head-node resource of the
services that own files, replica counts, requests in flight and queue bounds) and the
paths of those files.
:func:`serve.app.build_app` reads them here; a deploy config's ``deployments:`` section
overrides any of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serve.approvals.config import ApprovalsConfig
from serve.audit.config import AuditConfig
from serve.budget.config import BudgetsConfig
from serve.manifest import AgentManifest
from serve.memory.store import MemoryConfig
from serve.models import BackendConfig, VLLMConfig
from serve.settings import settings

__all__ = [
    "AGENT_ACTOR_OPTIONS",
    "AUDIT_ACTOR_OPTIONS",
    "MEMORY_ACTOR_OPTIONS",
    "SERVICE_ACTOR_OPTIONS",
    "agent_options",
    "approvals_options",
    "approvals_path",
    "audit_options",
    "audit_path",
    "ingress_options",
    "memory_options",
    "memory_path",
    "model_deployment_options",
    "project_root",
    "queue_bound",
]

# Fleet's replicas wait on I/O (models, tools, handles); a whole CPU each would not let
# a laptop hold a fleet.
AGENT_ACTOR_OPTIONS = {"num_cpus": 0.1}
SERVICE_ACTOR_OPTIONS = {"num_cpus": 0.1}
# Ray's default (5 requests in flight per replica) queues in the caller's router beyond
# that: the deployments that only wait on others (a scripted or upstream model) take many.
PROXY_MAX_ONGOING_REQUESTS = 512
# The audit log and the memory store are files: their one writer lives on the head node,
# whose disk outlives workers.
AUDIT_ACTOR_OPTIONS = {"num_cpus": 0.1, "resources": {"node:__internal_head__": 0.001}}
MEMORY_ACTOR_OPTIONS = AUDIT_ACTOR_OPTIONS
# Every request of the fleet passes through the one replica of each.
SERVICE_MAX_ONGOING_REQUESTS = 1000


def queue_bound(max_queued_requests: int | None, max_ongoing_requests: int) -> int:
    """How many requests each caller queues for a deployment whose replicas are all full.

    Unset, one replica's worth: a request let in waits at most about one replica's load
    ahead of it; beyond that, Ray Serve refuses it at once (``BackPressureError``, a 503)
    instead of letting it wait for the request timeout."""
    return max_ongoing_requests if max_queued_requests is None else max_queued_requests


def project_root() -> Path:
    """Where relative paths in configs start: $FLEET_HOME, else this checkout."""
    return settings().home or Path(__file__).resolve().parent.parent


def _state(path: str) -> Path:
    return Path(path) if Path(path).is_absolute() else project_root() / path


def audit_path(config: AuditConfig) -> Path:
    """The audit log's file."""
    return _state(config.path)


def approvals_path(config: ApprovalsConfig) -> Path:
    """The approvals store's file."""
    return _state(config.path)


def budget_path(config: BudgetsConfig) -> Path:
    """The ledger's file."""
    return _state(config.path)


def memory_path(config: MemoryConfig) -> Path:
    """The memory store's file."""
    return _state(config.path)


def model_deployment_options(name: str, config: BackendConfig) -> dict[str, Any]:
    """Options of a model backend's deployment; an engine gets LLM-shaped ones."""
    if not isinstance(config, VLLMConfig):  # a script, or a client of an upstream API: async, light
        return {
            "name": f"model-{name}",
            "ray_actor_options": SERVICE_ACTOR_OPTIONS,
            "max_ongoing_requests": PROXY_MAX_ONGOING_REQUESTS,
            "max_queued_requests": queue_bound(config.max_queued_requests, PROXY_MAX_ONGOING_REQUESTS),
        }
    ongoing = 2 * config.max_num_seqs
    return {
        "name": f"model-{name}",
        "ray_actor_options": config.ray_actor_options(),
        # Scale on queue depth: a replica is "full" when its engine batch is; requests
        # beyond twice that wait in the handle's queue instead of the engine's, up to its bound.
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 1,
            "target_ongoing_requests": config.max_num_seqs,
            "upscale_delay_s": 15,
            "downscale_delay_s": 600,
        },
        "max_ongoing_requests": ongoing,
        "max_queued_requests": queue_bound(config.max_queued_requests, ongoing),
        "health_check_period_s": 10,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": 30,
    }


def audit_options() -> dict[str, Any]:
    return {
        "name": "audit",
        "num_replicas": 1,
        "ray_actor_options": AUDIT_ACTOR_OPTIONS,
        "max_ongoing_requests": SERVICE_MAX_ONGOING_REQUESTS,
    }


def budget_options() -> dict[str, Any]:
    """The ledger: one replica, placed as the other state services (the head's disk)."""
    return {
        "name": "budget",
        "num_replicas": 1,
        "ray_actor_options": AUDIT_ACTOR_OPTIONS,
        "max_ongoing_requests": SERVICE_MAX_ONGOING_REQUESTS,
    }


def approvals_options() -> dict[str, Any]:
    """Parked turns and their approvals: one replica, placed as the other state services."""
    return {
        "name": "approvals",
        "num_replicas": 1,
        "ray_actor_options": AUDIT_ACTOR_OPTIONS,
        "max_ongoing_requests": SERVICE_MAX_ONGOING_REQUESTS,
    }


def memory_options() -> dict[str, Any]:
    return {
        "name": "memory",
        "num_replicas": 1,
        "ray_actor_options": MEMORY_ACTOR_OPTIONS,
        "max_ongoing_requests": SERVICE_MAX_ONGOING_REQUESTS,
    }


def agent_options(manifest: AgentManifest) -> dict[str, Any]:
    """An agent's deployment: autoscaled as its manifest says."""
    return {
        "name": manifest.name,
        "autoscaling_config": manifest.autoscaling.ray_config(),
        "max_ongoing_requests": manifest.autoscaling.max_ongoing_requests,
        "max_queued_requests": queue_bound(
            manifest.autoscaling.max_queued_requests, manifest.autoscaling.max_ongoing_requests
        ),
        "ray_actor_options": AGENT_ACTOR_OPTIONS,
    }


def ingress_options(
    max_ongoing_requests: int, max_queued_requests: int | None, retry_after_s: int, num_replicas: int = 1
) -> dict[str, Any]:
    """The ingress's deployment. A proxy whose queue for it is full answers Ray's own 503;
    ``retry_after_s`` gives it the ``Retry-After`` of the ingress's own 503s."""
    return {
        "name": "ingress",
        "num_replicas": num_replicas,
        "ray_actor_options": SERVICE_ACTOR_OPTIONS,
        "max_ongoing_requests": max_ongoing_requests,
        "max_queued_requests": queue_bound(max_queued_requests, max_ongoing_requests),
        "backpressure_config": {"retry_after_s": retry_after_s},
    }
