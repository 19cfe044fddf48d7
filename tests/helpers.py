"""Small helpers for driving the real API in tests."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.cli.devstack import Stack

TERMINAL = {"succeeded", "failed", "canceled", "timed_out"}


def api(stack: Stack, key: str | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=stack.api_url, timeout=30,
                             headers={"Authorization": f"Bearer {key or stack.api_key}"})


async def submit(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    payload = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
               "input": {"prompt": "a red fox"}} | body
    resp = await client.post("/v1/jobs", json=payload)
    assert resp.status_code == 202, resp.text
    job: dict[str, Any] = resp.json()
    return job


async def wait_for(client: httpx.AsyncClient, job_id: str, statuses: set[str] | None = None,
                   timeout: float = 30.0) -> dict[str, Any]:
    wanted = statuses or TERMINAL
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] in wanted:
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} did not reach {wanted} in {timeout}s; last: {json.dumps(job)[:800]}")


async def sim_faults(stack: Stack, provider: str, *faults: dict[str, Any]) -> None:
    async with httpx.AsyncClient() as c:
        resp = await c.post(f"{stack.simulator_url(provider)}/_sim/faults", json=list(faults))
        resp.raise_for_status()


async def sim_stats(stack: Stack, provider: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as c:
        stats: dict[str, Any] = (await c.get(f"{stack.simulator_url(provider)}/_sim/stats")).json()
        return stats


class WebhookReceiver:
    """A real HTTP endpoint that records deliveries; ``fail_first`` makes it answer 500 at first."""

    def __init__(self, fail_first: int = 0) -> None:
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        self.calls = 0
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        self.calls += 1
        if self.calls <= self.fail_first:
            return Response("not yet", status_code=500)
        self.deliveries.append((dict(request.headers), await request.body()))
        return Response(status_code=204)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.deliveries]

    async def wait(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.deliveries) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert len(self.deliveries) >= count, f"got {len(self.deliveries)} webhooks, wanted {count}"
