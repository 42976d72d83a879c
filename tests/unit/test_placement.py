"""serve.placement: where each deployment runs and where the state it keeps lives."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter
from ray import serve as rayserve

from serve.audit.config import AuditConfig
from serve.manifest import load_agent
from serve.memory.store import MemoryConfig
from serve.models import BackendConfig
from serve.placement import (
    agent_options,
    audit_options,
    audit_path,
    ingress_options,
    memory_options,
    memory_path,
    model_deployment_options,
    project_root,
)
from tests.unit.conftest import AGENTS, ROOT, write_agent


def test_state_paths_start_at_the_project_root_unless_absolute(tmp_path: Path) -> None:
    assert project_root() == ROOT
    assert audit_path(AuditConfig(path="var/audit/a.jsonl")) == ROOT / "var/audit/a.jsonl"
    assert memory_path(MemoryConfig(path=str(tmp_path / "m.db"))) == tmp_path / "m.db"


def test_the_services_that_own_files_are_single_replicas_on_the_head_node() -> None:
    for options, name in ((audit_options(), "audit"), (memory_options(), "memory")):
        assert options["name"] == name and options["num_replicas"] == 1
        assert options["ray_actor_options"]["resources"] == {"node:__internal_head__": 0.001}


def test_an_agent_scales_as_its_manifest_says_on_a_tenth_of_a_cpu() -> None:
    manifest = load_agent(AGENTS / "hr-policy-advisor").manifest
    options = agent_options(manifest)
    assert options["name"] == "hr-policy-advisor"
    assert options["autoscaling_config"] == manifest.autoscaling.ray_config()
    assert options["max_ongoing_requests"] == manifest.autoscaling.max_ongoing_requests == 32
    assert options["max_queued_requests"] == 32  # unset: one replica's worth
    assert options["ray_actor_options"] == {"num_cpus": 0.1}
    assert ingress_options(64, None, 2, num_replicas=3) == {
        "name": "ingress",
        "num_replicas": 3,
        "ray_actor_options": {"num_cpus": 0.1},
        "max_ongoing_requests": 64,
        "max_queued_requests": 64,
        "backpressure_config": {"retry_after_s": 2},  # Ray's proxy sends it with its own 503
    }


SCRIPT = {"kind": "scripted", "script": [{"replies": [{"content": "hi"}]}]}


def _model(config: dict[str, Any]) -> dict[str, Any]:
    return model_deployment_options("default", TypeAdapter(BackendConfig).validate_python(config))


@pytest.mark.parametrize(
    ("options", "ongoing", "queued"),
    [
        (lambda: _model({"kind": "vllm"}), 16, 16),  # 2 x max_num_seqs in flight
        (lambda: _model({"kind": "vllm", "max_num_seqs": 4, "max_queued_requests": 3}), 8, 3),
        (lambda: _model(SCRIPT), 512, 512),
        (lambda: _model({**SCRIPT, "max_queued_requests": 20}), 512, 20),
        (lambda: ingress_options(512, None, 1), 512, 512),
        (lambda: ingress_options(512, 100, 1), 512, 100),
    ],
    ids=["vllm", "vllm-set", "scripted", "scripted-set", "ingress", "ingress-set"],
)
def test_each_caller_queues_one_replicas_worth_unless_told_otherwise(
    options: Callable[[], dict[str, Any]], ongoing: int, queued: int
) -> None:
    bound = options()
    assert (bound["max_ongoing_requests"], bound["max_queued_requests"]) == (ongoing, queued)


def test_an_agents_queue_is_its_manifests(tmp_path: Path) -> None:
    autoscaling = {"max_ongoing_requests": 8, "max_queued_requests": 3}
    manifest = load_agent(write_agent(tmp_path, "bounded", autoscaling=autoscaling)).manifest
    assert agent_options(manifest)["max_queued_requests"] == 3
    assert "max_queued_requests" not in agent_options(manifest)["autoscaling_config"]  # a deployment option


@pytest.mark.parametrize(
    "options",
    [
        lambda: agent_options(load_agent(AGENTS / "fleet-monitor").manifest),
        lambda: _model({"kind": "vllm"}),
        lambda: _model(SCRIPT),
        lambda: ingress_options(512, None, 3),
    ],
    ids=["agent", "vllm", "scripted", "ingress"],
)
def test_ray_serve_takes_the_bounds_as_given(options: Callable[[], dict[str, Any]]) -> None:
    """Ray validates a deployment's options as they are set: none is refused, none dropped."""
    given = options()
    deployment = rayserve.deployment(_Replica).options(**given)
    assert deployment.max_queued_requests == given["max_queued_requests"] >= 1
    assert deployment.backpressure_config.status_code == 503
    expected = given.get("backpressure_config", {}).get("retry_after_s")
    assert deployment.backpressure_config.retry_after_s == expected


class _Replica:
    pass
