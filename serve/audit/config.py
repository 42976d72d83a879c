"""The ``governance.audit`` section of a deploy config."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["AuditConfig"]


class AuditConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(
        default="var/audit/audit.jsonl", description="Audit log file (relative: from the project root)."
    )
    commit_timeout_s: float = Field(
        default=10.0, gt=0, description="How long a request waits for its records to be durable (then 503)."
    )
