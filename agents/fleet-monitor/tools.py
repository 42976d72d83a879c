"""Infrastructure tools: live Ray Serve status and scaling recommendations."""

from __future__ import annotations

import asyncio
import math
from typing import Annotated, Any

from pydantic import Field
from ray import serve as rayserve
from ray.serve.exceptions import RayServeException

from serve.tools import tool


def recommend(
    *,
    status: str,
    running: int,
    ongoing: int,
    target_per_replica: float | None,
    min_replicas: int,
    max_replicas: int,
) -> str:
    """The scaling action for one deployment, from its live numbers."""
    if status not in ("HEALTHY", "UPSCALING", "DOWNSCALING"):
        return f"investigate: deployment is {status}"
    if running == 0:
        return "no running replicas: check placement and resources"
    if target_per_replica is None:
        return "fixed replica count: no action"
    desired = min(max(math.ceil(ongoing / target_per_replica), min_replicas), max_replicas)
    if ongoing / running > target_per_replica and running >= max_replicas:
        return f"saturated at max_replicas={max_replicas}: raise max_replicas"
    if desired > running:
        return f"scale up to {desired} replicas"
    if desired < running:
        return f"can scale down to {desired} replicas"
    return "ok"


async def _ongoing(replicas: list[dict[str, Any]]) -> int:
    import ray

    # Ray Serve has no public API for ongoing requests; the replica actor's own counter
    # is what its autoscaler reads.
    calls = [
        ray.get_actor(r["actor_name"], namespace="serve").get_num_ongoing_requests.remote() for r in replicas
    ]
    counts = await asyncio.gather(*calls, return_exceptions=True)
    return sum(c for c in counts if isinstance(c, int))


def _details() -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    details: dict[str, Any] = _get_global_client().get_serve_details()
    return details


def _own_application() -> str:
    """The application this replica belongs to ('*' outside a replica)."""
    try:
        return rayserve.get_replica_context().app_name
    except RayServeException:
        return "*"


@tool
async def fleet_status(
    application: Annotated[
        str | None,
        Field(description="Serve application to report on: a name, '*' for all (default: this fleet's own)."),
    ] = None,
) -> list[dict[str, object]]:
    """Live status of every Serve deployment: replicas, ongoing requests, autoscaling bounds, and a recommended action."""
    details = await asyncio.to_thread(_details)
    wanted = application or _own_application()
    report: list[dict[str, object]] = []
    for app_name, app in sorted(details.get("applications", {}).items()):
        if wanted not in ("*", app_name):
            continue
        for name, dep in sorted(app.get("deployments", {}).items()):
            running = [r for r in dep.get("replicas", []) if r.get("state") == "RUNNING"]
            auto = dep.get("deployment_config", {}).get("autoscaling_config") or {}
            target = auto.get("target_ongoing_requests")
            lo = auto.get("min_replicas", len(running))
            hi = auto.get("max_replicas", len(running))
            ongoing = await _ongoing(running)
            report.append(
                {
                    "application": app_name,
                    "deployment": name,
                    "status": dep["status"],
                    "running_replicas": len(running),
                    "target_replicas": dep.get("target_num_replicas"),
                    "ongoing_requests": ongoing,
                    "min_replicas": lo,
                    "max_replicas": hi,
                    "target_ongoing_requests": target,
                    "recommendation": recommend(
                        status=dep["status"],
                        running=len(running),
                        ongoing=ongoing,
                        target_per_replica=target,
                        min_replicas=lo,
                        max_replicas=hi,
                    ),
                }
            )
    return report
