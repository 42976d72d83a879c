"""serve.placement: where each deployment runs and where the state it keeps lives."""

from __future__ import annotations

from pathlib import Path

from serve.audit.config import AuditConfig
from serve.manifest import load_agent
from serve.memory.store import MemoryConfig
from serve.placement import (
    agent_options,
    audit_options,
    audit_path,
    ingress_options,
    memory_options,
    memory_path,
    project_root,
)
from tests.unit.conftest import AGENTS, ROOT


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
    assert options["ray_actor_options"] == {"num_cpus": 0.1}
    assert ingress_options(64) == {
        "name": "ingress",
        "ray_actor_options": {"num_cpus": 0.1},
        "max_ongoing_requests": 64,
    }
