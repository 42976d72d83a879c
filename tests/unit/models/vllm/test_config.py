"""serve.models.vllm.config: validation, the replica's resources and environment, vLLM's
engine arguments and the model folder, all without an engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from serve.errors import ConfigError
from serve.models.vllm.config import (
    EMBEDDED_REPETITION_PENALTY,
    GIB,
    RepetitionStop,
    VLLMConfig,
    engine_args,
    engine_env,
    resolve_model,
)
from tests.unit.conftest import ROOT
from tests.unit.models.vllm.conftest import config


def test_defaults_run_the_embedded_model_on_cpu() -> None:
    c = config()
    assert (c.model, c.dtype, c.max_model_len, c.max_num_seqs) == ("embedded:smollm2", "auto", 2048, 8)
    assert (c.tool_call_mode, c.tool_parser, c.num_gpus, c.on_gpu) == ("structured", None, 0, False)
    assert c.enforce_eager and c.cpu_kv_cache_gib == 1.0
    assert c.ray_actor_options()["num_gpus"] == 0


def test_every_field_is_described() -> None:
    undocumented = [name for name, f in VLLMConfig.model_fields.items() if not f.description]
    assert undocumented == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"inline": True}, "own shared deployment"),
        ({"tool_call_mode": "parser"}, "needs tool_parser"),
        ({"tool_parser": "hermes"}, "only used with tool_call_mode 'parser'"),
        ({"model": "embedded:llama"}, "unknown embedded model"),
        ({"tensor_parallel_size": 2}, "needs GPUs"),
        ({"num_gpus": 1, "tensor_parallel_size": 2}, "needs num_gpus >= that"),
        ({"num_gpus": 0.5, "tensor_parallel_size": 2}, "fractional num_gpus"),
        ({"num_gpus": 0.5}, "more than this replica's share"),
        ({"dtype": "int8"}, "Input should be"),
        ({"max_model_len": 0}, "greater than or equal"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
        ({"repetition_penalty": 0}, "greater than 0"),
        ({"repetition_stop": {"min_repeats": 1}}, "greater than or equal to 2"),
        ({"repetition_stop": {"period": 3}}, "Extra inputs are not permitted"),
    ],
)
def test_invalid_configs_are_rejected(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        config(**changes)


def test_the_embedded_model_gets_a_repetition_penalty_and_every_model_the_repetition_stop() -> None:
    assert config().applied_repetition_penalty == EMBEDDED_REPETITION_PENALTY == 1.1
    hub = config(model="Qwen/Qwen2.5-7B-Instruct", num_gpus=1)
    assert hub.applied_repetition_penalty == 1.0  # none: a 7B model does not need it
    tuned = config(model="Qwen/Qwen2.5-7B-Instruct", num_gpus=1, repetition_penalty=1.05)
    assert tuned.applied_repetition_penalty == 1.05
    assert config(repetition_penalty=1.0).applied_repetition_penalty == 1.0  # the embedded one's turned off
    assert config().repetition_stop == RepetitionStop(min_chars=48, max_period=48, min_repeats=4)
    assert hub.repetition_stop is not None
    assert config(repetition_stop=None).repetition_stop is None


def test_parser_mode_with_a_parser_and_gpu_configs_are_accepted() -> None:
    assert config(tool_call_mode="parser", tool_parser="hermes").tool_parser == "hermes"
    gpu = config(model="Qwen/Qwen2.5-7B-Instruct", num_gpus=2, tensor_parallel_size=2)
    assert gpu.on_gpu and gpu.ray_actor_options()["num_gpus"] == 2
    assert config(num_gpus=0.5, gpu_memory_utilization=0.45).on_gpu


def test_the_deployment_asks_ray_for_gpus_and_sets_the_engine_environment() -> None:
    options = config(num_gpus=1, num_cpus=2).ray_actor_options()
    assert (options["num_cpus"], options["num_gpus"]) == (2, 1)
    assert options["runtime_env"]["env_vars"]["VLLM_NO_USAGE_STATS"] == "1"


def test_the_engine_runs_offline_unless_the_model_is_a_hub_id(tmp_path: Path) -> None:
    assert engine_env(config())["HF_HUB_OFFLINE"] == "1"
    assert engine_env(config(model=str(tmp_path)))["TRANSFORMERS_OFFLINE"] == "1"
    assert "HF_HUB_OFFLINE" not in engine_env(config(model="Qwen/Qwen2.5-7B-Instruct", num_gpus=1))


def test_cpu_threads_are_bound_only_when_asked() -> None:
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_env(config())
    assert engine_env(config(cpu_threads_bind="0-1"))["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_the_package_and_a_config_import_neither_vllm_nor_torch() -> None:
    """Agent replicas and the ingress import serve.models: they must not pay vLLM's ~14 s."""
    code = (
        "import sys, serve.models.vllm as m; m.VLLMConfig(kind='vllm'); "
        "print(sorted({'vllm', 'torch'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_engine_args_on_cpu_size_the_kv_cache_and_run_float32(vllm: Any) -> None:
    args = engine_args(config(max_model_len=1024, max_num_seqs=4, cpu_kv_cache_gib=0.5), "/models/smol")
    assert (args.model, args.max_model_len, args.max_num_seqs) == ("/models/smol", 1024, 4)
    assert args.kv_cache_memory_bytes == GIB // 2
    assert args.dtype == "float32"  # `auto` on CPU for the embedded model
    assert args.enforce_eager and args.tensor_parallel_size == 1 and args.disable_log_stats


def test_engine_args_on_gpu_leave_the_kv_cache_to_vllm(vllm: Any) -> None:
    c = config(model="Qwen/Qwen2.5-7B-Instruct", num_gpus=2, tensor_parallel_size=2, enforce_eager=False)
    args = engine_args(c, c.model)
    assert args.kv_cache_memory_bytes is None
    assert (args.dtype, args.tensor_parallel_size, args.gpu_memory_utilization) == ("auto", 2, 0.9)
    assert not args.enforce_eager
    assert engine_args(config(dtype="bfloat16"), "/m").dtype == "bfloat16"


def test_a_missing_model_folder_fails_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError) as info:
        resolve_model(VLLMConfig(kind="vllm", model=str(missing)))
    assert str(missing) in str(info.value)
    (missing).mkdir()
    (missing / "config.json").write_text("{}")
    assert resolve_model(VLLMConfig(kind="vllm", model=str(missing))) == str(missing)
