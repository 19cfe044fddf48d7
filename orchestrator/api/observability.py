"""``GET /metrics``: this API process's Prometheus registry, plus gauges read from Redis at scrape time.

Unauthenticated, like ``/healthz``: keep it off the public edge (it carries no tenant data).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from orchestrator.api.deps import RuntimeDep
from orchestrator.infra import metrics
from orchestrator.store.stats import read_gauges

router = APIRouter()


@router.get("/metrics", tags=["ops"], include_in_schema=False)
async def get_metrics(rt: RuntimeDep) -> Response:
    metrics.set_gauges(await read_gauges(rt.redis, (rt.settings.queue_name, rt.settings.webhook_queue_name)))
    return metrics.exposition()
