"""Every deploy config in configs/ validates; local runs on CPU, gpu asks Ray for GPUs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from serve.cli import validate_config
from serve.models import VLLMConfig
from serve.placement import model_deployment_options

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def model_config(name: str) -> VLLMConfig:
    raw = yaml.safe_load((ROOT / "configs" / name).read_text())
    return VLLMConfig.model_validate(raw["applications"][0]["args"]["models"]["default"])


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_validates(path: Path) -> None:
    assert validate_config(path) == ["fleet"]


def test_gpu_config_asks_ray_for_gpus() -> None:
    config = model_config("gpu.yaml")
    options = model_deployment_options("default", config)
    assert options["name"] == "model-default"
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert config.tool_call_mode == "parser" and config.tool_parser == "hermes"
    raw = yaml.safe_load((ROOT / "configs" / "gpu.yaml").read_text())
    override: dict[str, Any] = raw["applications"][0]["deployments"][0]
    assert override["name"] == "model-default" and override["autoscaling_config"]["max_replicas"] > 1


def test_local_config_runs_the_embedded_model_on_cpu() -> None:
    config = model_config("local.yaml")
    options = model_deployment_options("default", config)
    assert config.model == "embedded:smollm2" and not config.on_gpu
    assert options["ray_actor_options"]["num_gpus"] == 0
    assert options["ray_actor_options"]["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert options["autoscaling_config"]["target_ongoing_requests"] == config.max_num_seqs
    assert options["max_ongoing_requests"] == 2 * config.max_num_seqs


def test_same_agents_everywhere() -> None:
    agents = {p.name: yaml.safe_load(p.read_text())["applications"][0]["args"]["agents"] for p in CONFIGS}
    assert len({tuple(a) for a in agents.values()}) == 1, agents


def test_a_scripted_or_upstream_model_takes_many_requests_at_once() -> None:
    from serve.models.scripted import ScriptedConfig
    from serve.models.upstream import OpenAIConfig

    script = ScriptedConfig.model_validate({"kind": "scripted", "script": [{"replies": [{"content": "hi"}]}]})
    upstream = OpenAIConfig.model_validate({"kind": "openai", "base_url": "http://upstream/v1", "model": "m"})
    for config in (script, upstream):
        options = model_deployment_options("default", config)
        assert options["max_ongoing_requests"] == 512, config.kind  # not Ray's default of 5
