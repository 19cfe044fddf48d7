"""The dashboard in a real browser: Playwright drives Debian's Chromium against the real API, worker and
simulators (no mocks). Skipped, saying how to install it, where no Chromium is found."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from orchestrator.cli.devstack import Stack
from orchestrator.store.tenants import create_api_key
from providers.sandbox.serve import serving
from tests.helpers import WebhookReceiver, api, submit, wait_for

CHROMIUM = os.environ.get("ATELIER_TEST_CHROMIUM", "/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.async_api", reason="pip install playwright (the dev extra)")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set ATELIER_TEST_CHROMIUM)",
                allow_module_level=True)

LIVE_TIMEOUT_MS = 15_000
# Screenshots of the pages the tests visit (the README shows the ones in docs/screenshots, written with
# DASHBOARD_SCREENSHOTS=docs/screenshots; not ATELIER_*, which conftest clears).
SCREENSHOTS = Path(os.environ.get("DASHBOARD_SCREENSHOTS", "build/screenshots"))


class Browser:
    """One Chromium and one context per test; every request the pages make is recorded."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.requests: list[str] = []

    async def start(self, **context: Any) -> Browser:
        self._pw = await playwright_api.async_playwright().start()
        self.browser = await self._pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        self.context = await self.browser.new_context(base_url=self.stack.api_url, **context)
        self.context.on("request", lambda r: self.requests.append(r.url))
        self.page = await self.context.new_page()
        return self

    async def close(self) -> None:
        await self.context.close()
        await self.browser.close()
        await self._pw.stop()

    async def sign_in(self, key: str) -> Any:
        await self.page.goto("/dashboard/login")
        await self.page.get_by_label("API key").fill(key)
        async with self.page.expect_navigation():
            await self.page.get_by_role("button", name="Sign in").click()
        return self.page

    def assert_same_origin(self) -> None:
        """Every request the pages made (scripts, styles, media, streams) went to Atelier itself."""
        assert self.requests
        origin = urlsplit(self.stack.api_url).netloc
        elsewhere = {u for u in self.requests if urlsplit(u).scheme not in {"http", "data", "blob"}
                     or (urlsplit(u).scheme == "http" and urlsplit(u).netloc != origin)}
        assert not elsewhere, f"requests to another origin: {sorted(elsewhere)[:5]}"

    async def screenshot(self, name: str, full_page: bool = True) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await self.page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)


@pytest.fixture
async def browser(stack: Stack) -> AsyncIterator[Browser]:
    b = await Browser(stack).start()
    try:
        yield b
    finally:
        b.assert_same_origin()
        await b.close()


async def until(handle: Any, predicate: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` (a JS function of the element) until it holds; ``wait_for_function`` would need
    ``unsafe-eval``, which the dashboard's Content-Security-Policy forbids."""
    deadline = time.monotonic() + timeout
    while not await handle.evaluate(predicate):
        assert time.monotonic() < deadline, f"timed out waiting for {predicate}"
        await asyncio.sleep(0.1)


async def other_tenant_key(redis_url: str) -> str:
    r = redis.asyncio.Redis.from_url(redis_url)
    try:
        return await create_api_key(r, "other-tenant")
    finally:
        await r.aclose()


async def test_sign_in_session_cookie_and_live_list(stack: Stack, browser: Browser) -> None:
    page = browser.page
    # A wrong key is refused, and no session is set.
    await page.goto("/dashboard/jobs")
    assert page.url.endswith("/dashboard/login?next=%2Fdashboard%2Fjobs")
    await page.get_by_label("API key").fill("atl_not-a-key")
    async with page.expect_response(lambda r: r.url.endswith("/dashboard/login")) as refused:
        await page.get_by_role("button", name="Sign in").click()
    assert (await refused.value).status == 401
    await page.locator("#login-error").wait_for()
    assert await browser.context.cookies() == []

    await browser.sign_in(stack.api_key)
    assert page.url.endswith("/dashboard/jobs")
    [cookie] = await browser.context.cookies()
    assert cookie["name"] == "atelier_session" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert time.time() < cookie["expires"] <= time.time() + stack.settings.dashboard_session_seconds + 5
    assert stack.api_key not in cookie["value"]
    assert await page.evaluate("document.cookie") == ""  # HttpOnly: invisible to scripts

    await page.evaluate("window.notReloaded = true")
    await page.get_by_text("Live: new jobs").wait_for(timeout=LIVE_TIMEOUT_MS)
    async with api(stack) as client:
        job = await submit(client, input={"prompt": "a slow fox [sim:queue=1] [sim:run=1.5]"})
        row = page.locator(f"#row-{job['id']}")
        await row.wait_for(timeout=LIVE_TIMEOUT_MS)  # appeared without a reload
        await page.locator(f"#row-{job['id']}[data-status=running]").wait_for(timeout=LIVE_TIMEOUT_MS)
        await page.locator(f"#row-{job['id']}[data-status=succeeded]").wait_for(timeout=LIVE_TIMEOUT_MS)
        thumb = row.locator("img.thumb").first
        await thumb.wait_for()
        await until(thumb, "img => img.complete && img.naturalWidth > 0")
        assert await page.evaluate("window.notReloaded === true")
        await browser.screenshot("jobs")

        # Filters: another status hides it; the batch filter of an unknown batch is a 404 page.
        await page.goto("/dashboard/jobs?status=failed")
        assert await page.locator(f"#row-{job['id']}").count() == 0
        await page.goto(f"/dashboard/jobs?status=succeeded&provider=replicate&kind=image&model={job['model']}")
        assert await page.locator(f"#row-{job['id']}").count() == 1
        response = await page.goto("/dashboard/jobs?batch=bat_nope")
        assert response is not None and response.status == 404

        # A live, filtered list drops the row of a job that leaves its filter.
        waiting = await submit(client, input={"prompt": "a patient fox [sim:queue=60]"})
        await wait_for(client, waiting["id"], {"submitted"})
        await page.goto("/dashboard/jobs?status=submitted")
        await page.locator(f"#row-{waiting['id']}").wait_for()
        await page.get_by_text("Live: new jobs").wait_for(timeout=LIVE_TIMEOUT_MS)
        assert (await client.post(f"/v1/jobs/{waiting['id']}/cancel")).status_code == 200
        await page.locator(f"#row-{waiting['id']}").wait_for(state="detached", timeout=LIVE_TIMEOUT_MS)


async def test_job_page_media_cancel_and_csrf(stack: Stack, browser: Browser) -> None:
    page = await browser.sign_in(stack.api_key)
    async with api(stack) as client:
        # The playground: a refused request comes back naming the field; a good one opens the job's page,
        # which follows the job's stream to running and succeeded without a reload.
        await page.goto("/dashboard/playground")
        csrf = await page.locator("#playground-form input[name=csrf]").input_value()
        refused = await page.request.post("/dashboard/playground", form={
            "csrf": csrf, "provider": "replicate", "kind": "image", "model": "not a replicate model",
            "prompt": "a lighthouse"})
        assert refused.status == 422 and "model" in await refused.text()
        await page.get_by_label("Prompt", exact=True).fill("a lighthouse [sim:queue=1] [sim:run=1.5]")
        async with page.expect_navigation():
            await page.get_by_role("button", name="Submit job").click()
        image = (await client.get(f"/v1/jobs/{page.url.rsplit('/', 1)[1]}")).json()
        assert image["input"]["prompt"] == "a lighthouse [sim:queue=1] [sim:run=1.5]"
        await page.evaluate("window.notReloaded = true")
        await page.locator("#job-status", has_text="running").wait_for(timeout=LIVE_TIMEOUT_MS)
        await page.locator("#job-status", has_text="succeeded").wait_for(timeout=LIVE_TIMEOUT_MS)
        assert await page.evaluate("window.notReloaded === true")
        video = await submit(client, kind="video", model="minimax/video-01", input={"prompt": "waves"})
        failed = await submit(client, input={"prompt": "a broken fox [sim:fail]"})
        slow = await submit(client, input={"prompt": "a very slow fox [sim:queue=60]"})
        for job_id in (image["id"], video["id"], failed["id"]):
            await wait_for(client, job_id)

        await page.goto(f"/dashboard/jobs/{image['id']}")
        img = page.locator("img.media").first
        await until(img, "img => img.complete && img.naturalWidth > 0")
        assert "job.succeeded" in await page.locator("#timeline").inner_text()
        assert '"status": "succeeded"' in await page.locator("#raw-json").text_content() or ""
        task_id = (await client.get(f"/v1/jobs/{image['id']}")).json()["provider_task_id"]
        assert await page.locator("#task-id").inner_text() == task_id

        await page.goto(f"/dashboard/jobs/{video['id']}")
        player = page.locator("video.media").first
        assert await player.get_attribute("controls") is not None
        await until(player, "v => v.readyState >= 1")  # its metadata loaded from Atelier's file URL
        await player.evaluate("v => { v.muted = true; return v.play(); }")
        await until(player, "v => v.readyState >= 2 && v.videoWidth > 0")
        await browser.screenshot("job-video")

        await page.goto(f"/dashboard/jobs/{failed['id']}")
        failed_view = (await client.get(f"/v1/jobs/{failed['id']}")).json()
        assert failed_view["error"]["message"] in await page.locator("#error-message").inner_text()
        await browser.screenshot("job-failed")

        # Re-run: a new job with the same request.
        await page.goto(f"/dashboard/jobs/{image['id']}")
        async with page.expect_navigation():
            await page.get_by_role("button", name="Re-run").click()
        new_id = page.url.rsplit("/", 1)[1]
        assert new_id != image["id"] and new_id.startswith("job_")
        again = (await client.get(f"/v1/jobs/{new_id}")).json()
        assert again["input"]["prompt"] == image["input"]["prompt"] and again["model"] == image["model"]

        # A state-changing request without the CSRF token (or with a wrong one) is refused.
        for form in ({}, {"csrf": "forged"}):
            refused = await page.request.post(f"/dashboard/jobs/{slow['id']}/cancel", form=form)
            assert refused.status == 403
        assert (await client.get(f"/v1/jobs/{slow['id']}")).json()["status"] != "canceled"

        await page.goto(f"/dashboard/jobs/{slow['id']}")
        async with page.expect_navigation():
            await page.get_by_role("button", name="Cancel job").click()
        await page.locator("#job-status", has_text="canceled").wait_for()
        assert (await client.get(f"/v1/jobs/{slow['id']}")).json()["status"] == "canceled"


async def test_another_tenants_job_is_not_found(stack: Stack, browser: Browser, redis_url: str) -> None:
    async with api(stack) as client:
        job = await submit(client, input={"prompt": "mine [sim:queue=30]"})
    page = await browser.sign_in(await other_tenant_key(redis_url))
    for path in (f"/dashboard/jobs/{job['id']}", f"/dashboard/jobs/{job['id']}/stream"):
        response = await page.goto(path) if path.endswith(job["id"]) else await page.request.get(path)
        assert response is not None and response.status == 404, path
    assert "mine" not in await page.content()
    await page.goto("/dashboard/jobs")
    assert await page.locator(f"#row-{job['id']}").count() == 0
    refused = await page.request.post(f"/dashboard/jobs/{job['id']}/rerun",
                                      form={"csrf": await page.locator("input[name=csrf]").first.input_value()})
    assert refused.status == 404


async def test_batch_and_webhook_pages(stack: Stack, browser: Browser) -> None:
    receiver = WebhookReceiver()
    async with serving(receiver.app) as base, api(stack) as client:
        endpoint = (await client.post("/v1/webhook-endpoints", json={"url": f"{base}/hook",
                                                                    "events": ["job.succeeded"]})).json()
        created = (await client.post("/v1/batches", json={"jobs": [
            {"ref": f"item-{i}", "provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
             "input": {"prompt": f"tile {i}"}} for i in range(4)]})).json()
        page = await browser.sign_in(stack.api_key)
        await page.goto(f"/dashboard/batches/{created['id']}")
        # Live: the page follows the batch's stream until it completes.
        await page.locator("#batch-state[data-terminal=true]").wait_for(timeout=LIVE_TIMEOUT_MS)
        assert "succeeded 4" in " ".join((await page.locator("#batch-counts").inner_text()).split())
        assert await page.locator("#batch-main img.thumb").count() == 4
        await browser.screenshot("batch")

        await receiver.wait(4)
        await page.goto(f"/dashboard/webhooks/{endpoint['id']}")
        first = page.locator("section.delivery").first
        await first.locator("td[data-label='Status code']", has_text="204").first.wait_for()
        delivery_id = (await first.get_attribute("id") or "").removeprefix("delivery-")
        async with page.expect_navigation():
            await first.get_by_role("button", name="Replay").click()
        await receiver.wait(5)
        seen = (await client.get(f"/v1/webhook-endpoints/{endpoint['id']}/deliveries/{delivery_id}")).json()
        assert len(seen["attempts"]) >= 1 and seen["id"] == delivery_id
        await browser.screenshot("webhook-endpoint")

        async with page.expect_navigation():
            await page.get_by_role("button", name="Rotate secret").click()
        secret = await page.locator("#new-secret").inner_text()
        assert secret.startswith("whsec_") and secret != endpoint["secret"]
        async with page.expect_navigation():
            await page.get_by_role("button", name="Disable").click()
        assert (await client.get(f"/v1/webhook-endpoints/{endpoint['id']}")).json()["enabled"] is False
        await page.get_by_role("button", name="Enable").wait_for()


async def test_phone_width_has_no_horizontal_overflow(stack: Stack, redis_url: str) -> None:
    phone = await Browser(stack).start(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = await phone.sign_in(stack.api_key)
        async with api(stack) as client:
            job = await wait_for(client, (await submit(client, input={"prompt": "a long prompt " * 30}))["id"])
        for path in ("/dashboard/jobs", f"/dashboard/jobs/{job['id']}", "/dashboard/batches", "/dashboard/webhooks",
                     "/dashboard/playground", "/dashboard/spend", "/dashboard/login"):
            await page.goto(path)
            widths = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            assert widths[0] <= widths[1], (path, widths)
        # Keyboard: the skip link is the first stop and leads to the content.
        await page.goto("/dashboard/jobs")
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
        phone.assert_same_origin()
    finally:
        await phone.close()
