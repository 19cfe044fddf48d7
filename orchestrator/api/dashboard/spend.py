"""Spend: what the tenant's jobs cost per day (UTC, by acceptance) and per provider and model, as a
server-rendered SVG bar chart and a table (no script, nothing from elsewhere).

A job counts with ``cost.final`` once it has one (the provider's reported cost, or zero when nothing was
billed), else ``cost.estimated``; jobs whose model has no price rule count as jobs without an amount.
The jobs are read through the store's tenant index, newest first, at most ``SCAN_LIMIT`` of them.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from fastapi import APIRouter, Request, Response

from orchestrator.api.dashboard.pages import _session, page, render
from orchestrator.api.deps import RuntimeDep
from orchestrator.api.problems import Problem
from orchestrator.domain.job import Job
from orchestrator.services.runtime import Runtime

router = APIRouter(prefix="/dashboard", include_in_schema=False)

DEFAULT_DAYS = 14
MAX_DAYS = 90
SCAN_LIMIT = 20_000
PAGE = 500
SERIES_SHOWN = 7  # the biggest provider/model series get a colour each; the rest are "other"
PALETTE = ("#2f6fdf", "#e0712c", "#2a9d6a", "#c4418c", "#8a63d2", "#b59a12", "#1f9bb0", "#8b8f98")
OTHER = "other models"

# The chart's geometry (SVG user units; the element scales to its box).
WIDTH, HEIGHT = 720, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 8, 12, 28


def job_amount(job: Job) -> tuple[float, str] | None:
    """The job's cost as the spend view counts it: final when known, else the estimate."""
    cost = job.cost
    if cost is None:
        return None
    chosen = getattr(cost, "final", None) or cost.estimated
    return (chosen.amount, chosen.currency) if chosen is not None else None


@dataclass
class Spend:
    days: list[date]
    currency: str = "USD"
    # (provider/model) -> day -> amount, in ``currency``
    amounts: dict[str, dict[date, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    jobs: Counter[str] = field(default_factory=Counter)
    unpriced: Counter[str] = field(default_factory=Counter)  # jobs without an amount, per series
    other_currencies: Counter[str] = field(default_factory=Counter)
    scanned: int = 0
    truncated: bool = False

    def total(self, series: str) -> float:
        return sum(self.amounts.get(series, {}).values())

    def day_total(self, day: date) -> float:
        return sum(per_day.get(day, 0.0) for per_day in self.amounts.values())

    @property
    def grand_total(self) -> float:
        return sum(self.total(s) for s in self.amounts)

    def series(self) -> list[str]:
        """Every provider/model that ran in the window, the most expensive first."""
        names = set(self.jobs)
        return sorted(names, key=lambda s: (-self.total(s), s))


async def collect(rt: Runtime, tenant: str, days: int, today: date | None = None) -> Spend:
    today = today or datetime.now(UTC).date()
    first = today - timedelta(days=days - 1)
    spend = Spend(days=[first + timedelta(days=i) for i in range(days)])
    start = datetime(first.year, first.month, first.day, tzinfo=UTC).timestamp()
    found: list[Job] = []
    cursor = None
    while len(found) < SCAN_LIMIT:
        batch = await rt.store.page(tenant, created_from=start, cursor=cursor, limit=PAGE)
        found += batch.jobs
        cursor = batch.next_cursor
        if cursor is None or len(batch.jobs) < PAGE:
            break
    else:
        spend.truncated = True
    spend.scanned = len(found)
    priced = [(j, a) for j in found if (a := job_amount(j)) is not None]
    currencies = Counter(currency for _, (_, currency) in priced)
    if currencies:
        spend.currency = currencies.most_common(1)[0][0]
    for job in found:
        series = f"{job.provider}/{job.model}"
        spend.jobs[series] += 1
        amount = job_amount(job)
        if amount is None:
            spend.unpriced[series] += 1
        elif amount[1] != spend.currency:
            spend.other_currencies[amount[1]] += 1
        else:
            spend.amounts[series][job.created_at.astimezone(UTC).date()] += amount[0]
    return spend


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    colour: str
    title: str


def _nice_top(value: float) -> float:
    """A round axis maximum at or above ``value`` (1, 2, 2.5 or 5 times a power of ten)."""
    if value <= 0:
        return 1.0
    base = 10 ** math.floor(math.log10(value))
    return next(base * f for f in (1, 2, 2.5, 5, 10) if base * f >= value * (1 - 1e-9))


def chart(spend: Spend) -> dict[str, object]:
    """The stacked bars (one per day, a segment per series), the axis ticks and the legend."""
    ranked = [s for s in spend.series() if spend.total(s) > 0]
    shown = ranked[:SERIES_SHOWN]
    colours = {s: PALETTE[i] for i, s in enumerate(shown)}
    legend = [(s, colours[s], spend.total(s)) for s in shown]
    rest = ranked[SERIES_SHOWN:]
    if rest:
        legend.append((OTHER, PALETTE[-1], sum(spend.total(s) for s in rest)))
    top = _nice_top(max((spend.day_total(d) for d in spend.days), default=0.0))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(1, len(spend.days))
    bar_w = max(2.0, slot * 0.7)
    bars: list[Bar] = []
    labels = []
    every = max(1, len(spend.days) // 10)
    for i, day in enumerate(spend.days):
        x = LEFT + i * slot + (slot - bar_w) / 2
        y: float = TOP + plot_h
        segments = [(s, spend.amounts[s].get(day, 0.0), colours[s]) for s in shown]
        if rest:
            segments.append((OTHER, sum(spend.amounts[s].get(day, 0.0) for s in rest), PALETTE[-1]))
        for name, amount, colour in segments:
            if amount <= 0:
                continue
            h = amount / top * plot_h
            y -= h
            bars.append(Bar(round(x, 2), round(y, 2), round(bar_w, 2), round(h, 2), colour,
                            f"{day.isoformat()} · {name}: {amount:.4f} {spend.currency}"))
        if i % every == 0:
            labels.append((round(x + bar_w / 2, 2), day.strftime("%m-%d")))
    ticks = [(round(TOP + plot_h - plot_h * f, 2), top * f) for f in (0, 0.25, 0.5, 0.75, 1)]
    return {"bars": bars, "labels": labels, "ticks": ticks, "legend": legend, "width": WIDTH, "height": HEIGHT,
            "left": LEFT, "right": WIDTH - RIGHT, "baseline": TOP + plot_h}


def _days(request: Request) -> int:
    raw = request.query_params.get("days", "").strip()
    if not raw:
        return DEFAULT_DAYS
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_DAYS:
        raise Problem(422, "Invalid filter", f"days: a whole number of days from 1 to {MAX_DAYS}, not {raw[:20]!r}")
    return int(raw)


@router.get("/spend")
@page
async def spend_page(request: Request, rt: RuntimeDep) -> Response:
    session = await _session(rt, request)
    days = _days(request)
    spend = await collect(rt, session.tenant, days)
    return render("spend.html", session=session, nav="spend", spend=spend, chart=chart(spend), days=days,
                  scan_limit=SCAN_LIMIT)
