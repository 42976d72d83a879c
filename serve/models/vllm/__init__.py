"""``vllm``: vLLM's async engine inside the model deployment's replica, on CPU or GPU.

- :mod:`~serve.models.vllm.config`: :class:`VLLMConfig`, the engine's environment and
  arguments; validates without vLLM;
- :mod:`~serve.models.vllm.prompting`: the tool-call JSON schema and the prompt a model
  without a tool-aware template is shown ("deterministic tool binding");
- :mod:`~serve.models.vllm.decoding`: reading the generated text as it streams, and
  seeing it fall into a loop;
- :mod:`~serve.models.vllm.backend`: :class:`VLLMBackend`, the engine itself, and vLLM's
  errors as Fleet's.

Importing this package imports no vLLM (that takes ~14 s): agent replicas and the
ingress import ``serve.models``, and only the model deployment's replica starts an engine.
"""

from serve.models.vllm.backend import VLLMBackend
from serve.models.vllm.config import VLLMConfig, engine_args, engine_env
from serve.models.vllm.decoding import JsonAnswerScanner
from serve.models.vllm.prompting import (
    flatten_messages,
    tool_call_schema,
    tool_instructions,
    tool_rounds,
    with_system_addendum,
)

__all__ = [
    "JsonAnswerScanner",
    "VLLMBackend",
    "VLLMConfig",
    "engine_args",
    "engine_env",
    "flatten_messages",
    "tool_call_schema",
    "tool_instructions",
    "tool_rounds",
    "with_system_addendum",
]
