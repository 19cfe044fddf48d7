"""The public schema of spend: a tenant's budgets and its usage figures (``GET /v1/usage``)."""

from __future__ import annotations

from datetime import date
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GroupBy = Literal["provider", "model", "day", "batch"]


class UsageFigures(BaseModel):
    """Jobs accepted in the period and what they cost (USD): ``estimated`` at acceptance, ``final``
    for those finished (zero where nothing was billed)."""

    jobs: int = 0
    finished: int = 0
    succeeded: int = 0
    estimated: float = 0.0
    final: float = 0.0


class UsageGroup(UsageFigures):
    key: str = Field(description="the provider, `provider/model`, day (`YYYY-MM-DD`) or batch id")


class BudgetView(BaseModel):
    """A budget period: its limit (``null``: none set), what is committed (estimates held for running
    jobs plus final costs), and what is left."""

    period: str = Field(description="`YYYY-MM` or `YYYY-MM-DD` (UTC)")
    limit: float | None
    committed: float
    remaining: float | None


class UsageReport(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    object: Literal["usage"] = "usage"
    start: date = Field(alias="from")
    end: date = Field(alias="to")
    group_by: GroupBy | None
    currency: str = "USD"
    total: UsageFigures
    groups: list[UsageGroup]
    budgets: dict[str, BudgetView] = Field(description="`monthly` and `daily` (the tenant's), and `key_monthly`, "
                                           "`key_daily` where the calling API key has budgets of its own")
