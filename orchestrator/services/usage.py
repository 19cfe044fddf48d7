"""A tenant's spend, grouped: what ``GET /v1/usage`` and ``atelier usage`` show (one computation)."""

from __future__ import annotations

from datetime import date

from orchestrator.store.ledger import Ledger, dollars
from orchestrator.wire.usage import BudgetView, GroupBy, UsageFigures, UsageGroup, UsageReport

MAX_DAYS = 400  # how long the usage figures are kept
PREFIX = {"provider": "p:", "model": "m:", "batch": "b:"}


def figures(raw: dict[str, int]) -> UsageFigures:
    return UsageFigures(jobs=raw.get("n", 0), finished=raw.get("done", 0), succeeded=raw.get("ok", 0),
                        estimated=dollars(raw.get("est", 0)), final=dollars(raw.get("fin", 0)))


def _add(into: dict[str, int], raw: dict[str, int]) -> None:
    for name, value in raw.items():
        into[name] = into.get(name, 0) + value


async def usage_report(ledger: Ledger, tenant: str, start: date, end: date, group_by: GroupBy | None,
                       api_key: str | None = None) -> UsageReport:
    """Figures of the jobs accepted from ``start`` to ``end`` (UTC days, inclusive), with the budgets
    (those of ``api_key``, the caller's key, too where it has its own)."""
    days = await ledger.usage(tenant, start, end)
    total: dict[str, int] = {}
    groups: dict[str, dict[str, int]] = {}
    for day, by_group in sorted(days.items()):
        _add(total, by_group.get("all", {}))
        if group_by == "day":
            _add(groups.setdefault(day, {}), by_group.get("all", {}))
        elif group_by is not None:
            prefix = PREFIX[group_by]
            for group, raw in by_group.items():
                if group.startswith(prefix):
                    _add(groups.setdefault(group[len(prefix):], {}), raw)
    budgets = {label: BudgetView(**view) for label, view in (await ledger.budgets(tenant, api_key=api_key)).items()}
    return UsageReport(start=start, end=end, group_by=group_by, total=figures(total),
                       groups=[UsageGroup(key=key, **figures(raw).model_dump())
                               for key, raw in sorted(groups.items()) if raw.get("n", 0) or raw.get("fin", 0)],
                       budgets=budgets)
