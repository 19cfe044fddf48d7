"""The operations view, for the tenants ``ATELIER_ADMIN_TENANTS`` names: the deployment's shared state.

The figures are read by the functions ``/metrics`` reads them with (``store.stats.read_gauges``: queues,
active and overdue jobs, pending deliveries, polls waiting, keys out of the pool), so the page and a
Prometheus scrape agree; the key pool's rows are ``keypool.pool_state`` (what ``atelier provider-keys list``
prints) and each key's slots and request budget ``Throttle.usage``. Dead-lettered deliveries are counted
from the endpoints' ``dead`` indexes.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from orchestrator.api.dashboard.pages import _session, page, render
from orchestrator.api.deps import RuntimeDep
from orchestrator.api.problems import Problem
from orchestrator.services.runtime import Runtime
from orchestrator.store import keypool
from orchestrator.store.stats import dead_deliveries, read_gauges

router = APIRouter(prefix="/dashboard", include_in_schema=False)


async def operations(rt: Runtime) -> dict[str, Any]:
    """Everything the page shows (``gauges`` is ``None`` when Redis could not be read)."""
    gauges = await read_gauges(rt.redis, (rt.settings.queue_name, rt.settings.webhook_queue_name))
    configured = {name: p.settings.api_keys for name, p in sorted(rt.registry.providers.items())}
    rows = await keypool.pool_state(rt.redis, configured)
    usage = await rt.throttle.usage([(r["provider"], r["key_id"]) for r in rows])
    for row in rows:
        row["usage"] = usage[(row["provider"], row["key_id"])]
    return {"gauges": gauges, "keys": rows, "dead": await dead_deliveries(rt.redis)}


@router.get("/operations")
@page
async def operations_page(request: Request, rt: RuntimeDep) -> Response:
    session = await _session(rt, request)
    if not session.admin:
        raise Problem(403, "Forbidden", "the operations view is for the tenants ATELIER_ADMIN_TENANTS names")
    return render("operations.html", session=session, nav="operations", **await operations(rt))
