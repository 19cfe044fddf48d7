"""``GET /v1/usage``: the tenant's spend and counts, grouped, with its budgets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from orchestrator.api.deps import RuntimeDep, TenantDep, caller_key
from orchestrator.api.problems import Problem
from orchestrator.services.usage import MAX_DAYS, usage_report
from orchestrator.wire.strict import IsoDate
from orchestrator.wire.usage import GroupBy, UsageReport

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get("", response_model=UsageReport, response_model_by_alias=True)
async def get_usage(
    rt: RuntimeDep, tenant: TenantDep,
    start: Annotated[IsoDate | None, Query(alias="from", description="first day (UTC); default: this month's first")]
    = None,
    end: Annotated[IsoDate | None, Query(alias="to", description="last day (UTC), inclusive; default: today")] = None,
    group_by: GroupBy | None = None,
) -> UsageReport:
    """Jobs accepted in the period, what they were estimated to cost and what they cost (USD)."""
    today = datetime.now(UTC).date()
    end = end or today
    start = start or end.replace(day=1)
    if start > end:
        raise Problem(422, "Invalid request", "from: must not be after `to`",
                      errors=[{"field": "from", "message": "must not be after `to`"}])
    if end - start > timedelta(days=MAX_DAYS):
        raise Problem(422, "Invalid request", f"from: the period spans at most {MAX_DAYS} days",
                      errors=[{"field": "from", "message": f"the period spans at most {MAX_DAYS} days"}])
    return await usage_report(rt.ledger, tenant, start, end, group_by, caller_key.get())
