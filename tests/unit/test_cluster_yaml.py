"""cluster.yaml is a valid Ray cluster-launcher config with the node types Fleet needs."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_passes_rays_own_validation() -> None:
    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)  # raises on any schema violation
    types = config["available_node_types"]
    assert sorted(types) == ["cpu-worker", "gpu-worker", "head"]
    assert config["head_node_type"] == "head"
    assert types["gpu-worker"]["node_config"]["InstanceType"].startswith("g")
    assert types["cpu-worker"]["max_workers"] >= types["cpu-worker"]["min_workers"] >= 1


def test_cluster_yaml_installs_fleet_with_the_projects_own_command() -> None:
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert any("make install" in c for c in config["setup_commands"])
    assert all("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"][1:])
