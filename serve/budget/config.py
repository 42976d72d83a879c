"""The deploy config's budget settings: what tenants and keys may spend per day and month."""

from __future__ import annotations

from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["BudgetLimits", "BudgetsConfig"]


class BudgetLimits(BaseModel):
    """What a tenant or a key may use: spending caps in USD (strings, read as Decimal) per
    UTC calendar day and month, and rate limits per minute (a sliding window)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_day_usd: Decimal | None = Field(default=None, ge=0, description="Cap per UTC day.")
    per_month_usd: Decimal | None = Field(default=None, ge=0, description="Cap per UTC calendar month.")
    requests_per_minute: int | None = Field(
        default=None, ge=1, description="Chat completions admitted in any 60 s (429 beyond)."
    )
    tokens_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="Tokens (prompt and completion, whole request trees) used in any 60 s: a request "
        "is admitted while fewer were used (429 otherwise).",
    )

    @property
    def rated(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


class BudgetsConfig(BaseModel):
    """The deploy config's ``budgets`` section: the cluster's one ledger."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(
        default="var/budget/ledger.db",
        description="SQLite file of the ledger's settled spend (relative: project root).",
    )
    tenants: dict[str, BudgetLimits] = Field(
        default_factory=dict,
        description="Caps per tenant (all its keys together), by tenant name; a key's own caps "
        "are `budget` beside it in `governance.tenants`.",
    )
    lease_s: float = Field(
        default=120.0,
        gt=0,
        description="How long a reservation lives unless settled: one a dead replica held is "
        "released after this (keep it above the longest model call).",
    )
    slice_fraction: Decimal = Field(
        default=Decimal("0.02"),
        gt=0,
        le=1,
        description="What share of a budget's limit a replica leases at a time, to reserve its calls "
        "against without a round trip (a budget may refuse up to this share per replica early).",
    )
    call_timeout_s: float = Field(
        default=2.0, gt=0, description="How long an agent waits for the ledger (then: 503)."
    )
    soft_threshold: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="The used fraction of a budget (spent + held over its limit) at which "
        "`fleet alerts` warns (FleetBudgetNearlySpent) and the dashboard draws its line.",
    )
    test_clock: bool = Field(
        default=False,
        description="Let a test move the ledger's clock (`advance`): for tests of period boundaries only.",
    )
