"""Model backends: one interface (``base``), one module per kind."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from serve.models.base import ModelBackend, ModelChunk, ModelReply, ModelRequest, collect
from serve.models.scripted import ScriptedBackend, ScriptedConfig
from serve.models.upstream import OpenAIBackend, OpenAIConfig
from serve.models.vllm import VLLMBackend, VLLMConfig

__all__ = [
    "BACKEND_KINDS",
    "BackendConfig",
    "ModelBackend",
    "ModelChunk",
    "ModelReply",
    "ModelRequest",
    "VLLMConfig",
    "collect",
    "make_backend",
]

BackendConfig = Annotated[ScriptedConfig | OpenAIConfig | VLLMConfig, Field(discriminator="kind")]
BACKEND_KINDS = frozenset({"scripted", "openai", "vllm"})


def make_backend(config: ScriptedConfig | OpenAIConfig | VLLMConfig) -> ModelBackend:
    """The backend object for a config (in the model deployment's replica)."""
    if isinstance(config, ScriptedConfig):
        return ScriptedBackend(config)
    if isinstance(config, VLLMConfig):
        return VLLMBackend(config)  # imports vLLM: only the model deployment's replica makes one
    return OpenAIBackend(config)
