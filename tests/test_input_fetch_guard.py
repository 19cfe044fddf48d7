"""Media inputs a tenant names are fetched through the destination guard (issue 13, defect 2): a URL
pointing inside (loopback by address, name, decimal form, or a redirect) is refused before anything is
created, and the job's error says so in the tenant's terms, never what answered inside."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from orchestrator.cli.devstack import Stack, dev_stack
from providers.sandbox.serve import serving
from tests.helpers import api, sim_stats, submit, wait_for

SECRET = b"internal-service-body-that-must-not-leak"


@pytest.fixture
async def guarded(redis_url: str) -> AsyncIterator[Stack]:
    # Webhook receivers stay on loopback in tests; media inputs are guarded as in production.
    async with dev_stack(redis_url=redis_url, log_format="text", fetch_allow_private=False) as s:
        yield s


async def test_internal_urls_are_refused_and_nothing_is_created(guarded: Stack) -> None:
    hits: list[str] = []

    async def internal(request: Request) -> Response:
        hits.append(request.url.path)
        return Response(SECRET, status_code=403)

    app = Starlette(routes=[Route("/meta", internal),
                            Route("/hop", lambda r: RedirectResponse("http://127.0.0.1:1/meta"))])
    async with serving(app) as base, api(guarded) as client:
        port = base.rsplit(":", 1)[1]
        urls = [f"{base}/meta", f"http://localhost:{port}/meta", f"http://2130706433:{port}/meta",
                f"http://[::1]:{port}/meta", f"{base}/hop"]
        for url in urls:
            job = await submit(client, provider="veo", kind="video", model="veo-3.0-generate-001",
                               input={"prompt": "a fox", "image_url": url})
            done = await wait_for(client, job["id"])
            assert done["status"] == "failed", done
            error = done["error"]
            assert error["code"] == "input_image_unavailable", error
            assert "private or internal address" in error["message"], error
            assert SECRET.decode() not in str(done) and "403" not in error["message"]
    assert hits == []  # the guard refused every connection: nothing inside answered
    assert (await sim_stats(guarded, "veo"))["creations"] == 0
