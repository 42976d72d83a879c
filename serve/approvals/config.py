"""The deploy config's ``approvals`` section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ApprovalsConfig"]


class ApprovalsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(
        default="var/approvals/approvals.db",
        description="SQLite file of parked turns and their approvals (relative: project root).",
    )
    lease_s: float = Field(
        default=30.0,
        gt=0,
        description="How long a resuming replica holds a turn without renewing it (every third of "
        "this): after it, the replica counts as lost and the turn is handed to another.",
    )
    redispatch_s: float = Field(
        default=10.0,
        gt=0,
        description="A turn ready to resume that no replica claimed within this is sent again.",
    )
    call_timeout_s: float = Field(
        default=5.0, gt=0, description="How long a replica waits for the approvals service (then: 503)."
    )
    max_wait_s: float = Field(
        default=60.0, gt=0, description="The longest `GET /v1/approvals/{id}?wait=N` holds a request."
    )
    webhooks: dict[str, str] = Field(
        default_factory=dict,
        description="A URL per agent that gets a POST of each approval it asks for (over the "
        "manifest's approval_webhook): how a platform team routes them to its chat or ticket tool.",
    )
    alert_after_s: float = Field(
        default=3600.0,
        ge=60,
        description="`fleet alerts`: FleetApprovalsWaiting fires once an agent has had approvals "
        "pending for this long without a break (rounded to whole seconds).",
    )
    test_clock: bool = Field(
        default=False,
        description="Let a test move the service's clock (`advance`): for expiry tests only.",
    )
