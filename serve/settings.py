"""Fleet's environment variables, read in one place through one typed object.

Every variable is ``FLEET_<NAME>``; a bad value fails with the variable named.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from serve.errors import ConfigError

__all__ = ["Settings", "settings"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_", extra="ignore", frozen=True)

    home: Path | None = Field(
        default=None, description="Where relative paths in deploy configs start (default: the checkout)."
    )
    model_cache: Path | None = Field(
        default=None, description="Where converted embedded models live (default ~/.cache/fleet/models)."
    )
    audit_key: str | None = Field(
        default=None,
        description="Key of the audit log's chain and checkpoint (default: <log>.key, made once).",
    )
    traces_file: Path | None = Field(
        default=None, description="Write spans as JSON lines to this file (tracing on, for local use)."
    )
    trace_content: bool = Field(
        default=False, description="Record prompt and completion text on spans (after PII redaction)."
    )
    metrics_port: int = Field(
        default=9101, gt=0, lt=65536, description="Prometheus port of the Ray cluster `fleet up` starts."
    )
    dashboard_address: str = Field(
        default="http://127.0.0.1:8265",
        description="Dashboard of the Ray cluster `fleet up` deploys to; none there: start one.",
    )


@lru_cache(maxsize=1)
def settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(err["msg"], field="FLEET_" + str(err["loc"][0]).upper()) from None
