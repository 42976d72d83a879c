"""A model backend as a Ray Serve deployment, shared by the agents that name it.

Errors cross the handle as values (``RequestError`` instances), so the caller sees the
same typed error whatever Ray does with exceptions raised in a replica.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from pydantic import TypeAdapter

from serve.errors import ModelError, RequestError
from serve.models import BackendConfig, ModelBackend, make_backend
from serve.models.base import ModelChunk, ModelReply, ModelRequest, collect
from serve.telemetry import logs

__all__ = ["ModelDeployment", "as_model_error", "parse_backend_config", "raise_errors", "stream_model"]

log = logging.getLogger("fleet.model")
_CONFIG: TypeAdapter[Any] = TypeAdapter(BackendConfig)


def parse_backend_config(raw: dict[str, Any]) -> Any:
    """A backend config from its YAML mapping (the deployments are handed it parsed)."""
    return _CONFIG.validate_python(raw)


def as_model_error(exc: Exception) -> RequestError:
    """A backend's failure as the client may see it; an engine's bug never as a stack trace."""
    if isinstance(exc, RequestError):
        return exc
    log.error("model backend failed", exc_info=exc)
    return ModelError(f"model backend failed: {type(exc).__name__}")


async def stream_model(
    backend: ModelBackend, request: ModelRequest
) -> AsyncIterator[ModelChunk | RequestError]:
    """Stream a backend's reply; any failure ends the stream with a ``RequestError`` value."""
    try:
        async for piece in backend.stream(request):
            yield piece
    except Exception as exc:
        yield as_model_error(exc)


async def raise_errors(items: AsyncIterator[ModelChunk | RequestError]) -> AsyncIterator[ModelChunk]:
    """The caller's side of :func:`stream_model`: an error value is raised again."""
    async for item in items:
        if isinstance(item, RequestError):
            raise item
        yield item


class ModelDeployment:
    """Wraps one backend; deployed as ``model-<name>``."""

    def __init__(self, name: str, config: BackendConfig) -> None:
        logs.route_to_serve()
        self.name = name
        self._backend = make_backend(config)

    async def stream(self, request: ModelRequest) -> AsyncIterator[ModelChunk | RequestError]:
        async for item in stream_model(self._backend, request):
            yield item

    async def complete(self, request: ModelRequest) -> ModelReply | RequestError:
        """The whole reply in one handle call (cheaper than a stream when nobody streams)."""
        try:
            return await collect(self._backend.stream(request))
        except Exception as exc:
            return as_model_error(exc)

    async def check_health(self) -> None:
        await self._backend.check_health()

    def __del__(self) -> None:
        # Ray Serve calls this when it stops the replica: stop an engine's processes too.
        shutdown = getattr(getattr(self, "_backend", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
