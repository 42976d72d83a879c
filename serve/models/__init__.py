"""Model backends: one interface (``base``), one module per kind."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from serve.models.base import ModelBackend, ModelChunk, ModelReply, ModelRequest, collect
from serve.models.scripted import ScriptedBackend, ScriptedConfig
from serve.models.upstream import OpenAIBackend, OpenAIConfig

__all__ = [
    "BACKEND_KINDS",
    "BackendConfig",
    "ModelBackend",
    "ModelChunk",
    "ModelReply",
    "ModelRequest",
    "collect",
    "make_backend",
]

BackendConfig = Annotated[ScriptedConfig | OpenAIConfig, Field(discriminator="kind")]
BACKEND_KINDS = frozenset({"scripted", "openai"})


def make_backend(config: ScriptedConfig | OpenAIConfig) -> ModelBackend:
    """The backend object for a config (in the model deployment's replica)."""
    if isinstance(config, ScriptedConfig):
        return ScriptedBackend(config)
    return OpenAIBackend(config)
