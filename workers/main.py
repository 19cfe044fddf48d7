"""Run the arq workers: one on the jobs queue (with the sweeper cron), one on the webhook queue,
and the poller (workers/polling.py) that reads waiting jobs at their providers.

Webhook delivery has its own queue so a slow receiver never delays job
processing. Both workers share one ``Runtime`` in one process; scale out by
running more processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from typing import Any

from arq import cron, func

from orchestrator.infra import metrics
from orchestrator.infra.destinations import webhook_client
from orchestrator.infra.settings import Settings
from orchestrator.services.runtime import Runtime
from orchestrator.store.queue import connect, dumps, loads
from orchestrator.store.stats import read_gauges
from providers.sandbox.serve import serving
from workers import cancel, collect, delivery, poll, submit, sweep
from workers.polling import Poller
from workers.resilient import Worker  # arq's Worker, kept alive through Redis restarts

log = logging.getLogger("atelier.worker")

JOB_FUNCTIONS = [
    func(submit.submit_job, timeout=120, max_tries=5),
    func(poll.poll_job, timeout=60, max_tries=3),
    func(collect.collect_outputs, timeout=900, max_tries=3),
    func(cancel.cancel_at_provider, timeout=60, max_tries=3),
    func(cancel.cancel_batch_jobs, timeout=600, max_tries=5),
]
WEBHOOK_FUNCTIONS = [func(delivery.deliver_webhook, timeout=60, max_tries=3)]
SWEEP_SECONDS = {0, 10, 20, 30, 40, 50}


async def build_workers(settings: Settings, ctx: dict[str, Any], queues: Sequence[str]) -> list[Worker]:
    common: dict[str, Any] = {
        "handle_signals": False,
        "keep_result": 0,
        "poll_delay": settings.worker_poll_delay,
        "job_serializer": dumps,
        "job_deserializer": loads,
        "ctx": ctx,
        "health_check_interval": 30,
    }
    workers = []
    if "jobs" in queues:
        workers.append(Worker(
            functions=JOB_FUNCTIONS,
            cron_jobs=[cron(sweep.sweep, second=SWEEP_SECONDS, run_at_startup=True, timeout=60)],
            queue_name=settings.queue_name, max_jobs=settings.worker_max_jobs,
            redis_pool=await connect(settings.redis_url, settings.queue_name), **common,
        ))
    if "webhooks" in queues:
        workers.append(Worker(
            functions=WEBHOOK_FUNCTIONS, queue_name=settings.webhook_queue_name,
            max_jobs=settings.worker_max_jobs,
            redis_pool=await connect(settings.redis_url, settings.webhook_queue_name), **common,
        ))
    return workers


async def run(settings: Settings, *, queues: Sequence[str] = ("jobs", "webhooks"),
              stop: asyncio.Event | None = None, completion_wait: float = 30.0,
              metrics_port: int | None = None, metrics_host: str = "0.0.0.0") -> None:
    """Run until ``stop`` is set (or SIGINT/SIGTERM when ``stop`` is not given).

    With ``metrics_port`` (0: any free port), serve ``/metrics`` and ``/healthz`` there.
    """
    # A process that delivers webhooks attempts the ones its own steps admit at once (no queue hop).
    direct = delivery.DirectDeliveries(settings.worker_max_jobs) if "webhooks" in queues else None
    rt = await Runtime.open(settings, deliver_now=direct)
    webhook_http = webhook_client(settings.webhook_timeout_seconds, settings.webhook_allow_private)
    ctx: dict[str, Any] = {"rt": rt, "webhook_http": webhook_http}
    if direct is not None:
        direct.bind(ctx)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    workers = await build_workers(settings, ctx, queues)
    runs = [asyncio.create_task(w.async_run()) for w in workers]
    poller = Poller(rt, settings.worker_max_jobs) if "jobs" in queues else None
    poller_stop = asyncio.Event()
    if poller is not None:
        runs.append(asyncio.create_task(poller.run(poller_stop)))
    if "webhooks" in queues:
        runs.append(asyncio.create_task(delivery.dispatch_parked(rt, poller_stop)))
    log.info("worker started on %s", ", ".join(w.queue_name for w in workers), extra={"event": "worker.started"})
    servers = contextlib.AsyncExitStack()
    try:
        if metrics_port is not None:
            queues = (settings.queue_name, settings.webhook_queue_name)
            app = metrics.worker_app(lambda: read_gauges(rt.redis, queues),
                                     healthy=lambda: stop.is_set() or not any(t.done() for t in runs))
            url = await servers.enter_async_context(serving(app, host=metrics_host, port=metrics_port))
            log.info("worker metrics at %s/metrics", url, extra={"event": "worker.metrics"})
        done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), *runs],
                                     return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task in runs and task.exception():
                raise task.exception()  # type: ignore[misc]
    finally:
        poller_stop.set()
        await asyncio.gather(_shutdown(workers, completion_wait),
                             poller.drain(completion_wait) if poller else asyncio.sleep(0),
                             direct.drain(completion_wait) if direct else asyncio.sleep(0))
        await servers.aclose()
        for task in runs:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await webhook_http.aclose()
        await rt.close()


async def _shutdown(workers: list[Worker], completion_wait: float) -> None:
    """Stop taking jobs, let running ones finish for up to ``completion_wait`` seconds, then stop."""
    for w in workers:
        w.allow_pick_jobs = False
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(_idle(workers), completion_wait)
    for w in workers:
        # close() gathers the jobs it just cancelled; their CancelledError is expected here.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await w.close()


async def _idle(workers: list[Worker]) -> None:
    while any(w.tasks for w in workers):
        await asyncio.sleep(0.05)
