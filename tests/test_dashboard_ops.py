"""The dashboard's operations, spend, playground and batch views in a real browser (Debian's Chromium
driven by Playwright) against the real API, worker and simulators. Skipped, as ``test_dashboard`` is,
where no Chromium is found."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.store import keypool
from orchestrator.store.tenants import create_api_key
from providers.sandbox.serve import serving
from tests.helpers import WebhookReceiver, api, submit, wait_for
from tests.test_dashboard import LIVE_TIMEOUT_MS, Browser, until

ADMIN = "dev"  # the dev stack's tenant


@pytest.fixture
async def ops_stack(redis_url: str) -> AsyncIterator[Stack]:
    """A stack whose tenant is an admin, with a slot cap and a request budget on replicate's key."""
    async with dev_stack(redis_url=redis_url, log_format="text", admin_tenants=f"{ADMIN}, ops",
                         replicate_concurrency=2, replicate_rpm=600) as s:
        yield s


@pytest.fixture
async def browser(ops_stack: Stack) -> AsyncIterator[Browser]:
    b = await Browser(ops_stack).start(viewport={"width": 1280, "height": 860})
    try:
        yield b
    finally:
        b.assert_same_origin()
        await b.close()


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        found = re.match(rf"^{name}(?:{{(.*)}})? (\S+)$", line)
        if found and all(f'{k}="{v}"' in (found.group(1) or "") for k, v in labels.items()):
            total += float(found.group(2))
    return total


async def _redis(stack: Stack) -> Any:
    return redis.asyncio.Redis.from_url(stack.settings.redis_url)


async def test_operations_view_shows_what_metrics_shows_to_admins_only(ops_stack: Stack, browser: Browser) -> None:
    stack = ops_stack
    fal_key = keypool.key_id(stack.settings.provider_settings()["fal"].api_keys[0])
    replicate_key = keypool.key_id(stack.settings.provider_settings()["replicate"].api_keys[0])
    r = await _redis(stack)
    try:
        await keypool.take_out(r, "fal", fal_key, reason=keypool.AUTH_FAILED, code="auth_failed",
                               message="the provider refused the key (401)")
        other_key = await create_api_key(r, "not-an-admin")
    finally:
        await r.aclose()
    receiver = WebhookReceiver(fail_first=10_000)  # every attempt fails: the delivery is dead-lettered
    async with serving(receiver.app) as base, api(stack) as client:
        endpoint = (await client.post("/v1/webhook-endpoints", json={"url": f"{base}/hook",
                                                                    "events": ["job.succeeded"]})).json()
        done = await wait_for(client, (await submit(client, input={"prompt": "quick"}))["id"])
        slow = await submit(client, input={"prompt": "a slow fox [sim:queue=120]"})
        await wait_for(client, slow["id"], {"submitted"})
        deadline = time.monotonic() + 40
        while (await client.get(f"/v1/webhook-endpoints/{endpoint['id']}/deliveries?status=dead")).json()["data"] == []:
            assert time.monotonic() < deadline, "the failing delivery was not dead-lettered"
            await asyncio.sleep(0.3)
        assert done["status"] == "succeeded"

        page = await browser.sign_in(stack.api_key)
        async with page.expect_navigation():
            await page.get_by_role("link", name="Operations").click()
        await page.locator("#ops-keys").wait_for()

        # The same numbers as /metrics (a poll in progress leaves its board for a moment: read both again
        # until they were read between two such moments).
        names = {"active": "atelier_jobs_active", "overdue": "atelier_jobs_overdue",
                 "polls": "atelier_polls_waiting", "keys-out": "atelier_provider_key_out_of_pool",
                 "pending": "atelier_webhook_deliveries_pending"}
        for _ in range(20):
            scrape = (await client.get("/metrics")).text
            await page.reload()
            shown = {name: float(await page.locator(f"#ops-{name}").inner_text()) for name in names}
            scraped = {name: metric(scrape, gauge) for name, gauge in names.items()}
            if shown == scraped:
                break
            await asyncio.sleep(0.2)
        assert shown == scraped
        assert shown["active"] == 1 and shown["polls"] >= 1 and shown["keys-out"] == 1
        assert float(await page.locator("#ops-dead").inner_text()) == 1
        await browser.screenshot("operations")

        # The key taken out shows why; replicate's key shows the slow job in flight against its cap.
        fal_row = page.locator(f"#key-fal-{fal_key}")
        assert await fal_row.get_attribute("data-state") == "out"
        assert "auth_failed" in await fal_row.inner_text() and "refused the key (401)" in await fal_row.inner_text()
        replicate_row = page.locator(f"#key-replicate-{replicate_key}")
        assert await replicate_row.get_attribute("data-state") == "in"
        assert "1 / 2" in await replicate_row.locator("td[data-label='In flight']").inner_text()
        assert "600 a minute" in await replicate_row.locator("td[data-label='Request budget']").inner_text()
        assert endpoint["id"] in await page.locator("#ops-dead-table").inner_text()

    # Another tenant has no Operations link, and the page is refused.
    async with page.expect_navigation():
        await page.get_by_role("button", name="Sign out").click()
    page = await browser.sign_in(other_key)
    assert await page.get_by_role("link", name="Operations").count() == 0
    response = await page.goto("/dashboard/operations")
    assert response is not None and response.status == 403
    assert "fal" not in await page.locator("main").inner_text()


async def test_spend_chart_per_day_and_model(ops_stack: Stack, browser: Browser) -> None:
    stack = ops_stack
    async with api(stack) as client:
        jobs = [await submit(client, input={"prompt": f"tile {i}", "num_outputs": 1 + i % 2}) for i in range(3)]
        jobs.append(await submit(client, provider="fal", model="fal-ai/flux/schnell", input={"prompt": "fal"}))
        jobs.append(await submit(client, kind="video", model="minimax/video-01", input={"prompt": "no price"}))
        finished = [await wait_for(client, j["id"]) for j in jobs]
    expected = 0.0
    for job in finished:
        cost = job["cost"] or {}
        chosen = cost.get("final") or cost.get("estimated")
        expected += chosen["amount"] if chosen else 0.0
    assert expected > 0

    page = await browser.sign_in(stack.api_key)
    async with page.expect_navigation():
        await page.get_by_role("link", name="Spend").click()
    total = await page.locator("#spend-total").inner_text()
    assert float(total.split()[0]) == pytest.approx(expected, abs=1e-4)
    chart = page.locator("#spend-chart")
    assert await chart.get_attribute("role") == "img"
    assert await chart.locator("rect").count() >= 2  # today's bar: a segment per model
    models = await page.locator("#spend-models").inner_text()
    assert "replicate/black-forest-labs/flux-schnell" in models and "fal/fal-ai/flux/schnell" in models
    unpriced = page.locator("#spend-models tr", has_text="replicate/minimax/video-01")
    assert await unpriced.locator("td[data-label='Without a price']").inner_text() == "1"
    await browser.screenshot("spend")
    response = await page.goto("/dashboard/spend?days=0")
    assert response is not None and response.status == 422
    assert "days" in await page.locator("[role=alert]").inner_text()


async def test_playground_is_built_from_the_catalog(ops_stack: Stack, browser: Browser) -> None:
    stack = ops_stack
    page = await browser.sign_in(stack.api_key)
    async with api(stack) as client:
        listed = (await client.get("/v1/models/kling/kling-v3")).json()
        await page.goto("/dashboard/playground")
        # Choosing a model re-renders the form with that model's inputs and their allowed values.
        async with page.expect_navigation():
            await page.locator("#pg-choose-model").select_option("kling/kling-v3")
        if await page.locator("#pg-choose-kind").input_value() != "video":
            async with page.expect_navigation():
                await page.locator("#pg-choose-kind").select_option("video")
        video = listed["inputs"]["video"]
        durations = await page.locator("#pg-duration_seconds option").all_inner_texts()
        assert durations[1:] == [f"{d:g}" for d in video["duration_seconds"]]
        ratios = await page.locator("#pg-aspect_ratio option").all_inner_texts()
        assert ratios[1:] == video["aspect_ratio"]
        assert await page.locator("#pg-resolution").count() == ("resolution" in video["accepts"])
        assert await page.locator("#pg-num_outputs").get_attribute("max") == str(video["num_outputs"]["max"])
        await browser.screenshot("playground")

        # Keyboard only: type the prompt, pick values, submit.
        await page.locator("#pg-prompt").focus()
        await page.keyboard.type("a paper boat")
        await page.locator("#pg-duration_seconds").select_option("5")
        await page.locator("#pg-aspect_ratio").select_option("9:16")
        await page.locator("#pg-aspect_ratio").focus()
        async with page.expect_navigation():
            await page.get_by_role("button", name="Submit job").press("Enter")
        job_id = page.url.rsplit("/", 1)[1]
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert (job["provider"], job["model"], job["kind"]) == ("kling", "kling-v3", "video")
        assert job["input"]["duration_seconds"] == 5 and job["input"]["aspect_ratio"] == "9:16"

        # A value outside the catalog's list is refused by POST /v1/jobs, naming the field.
        await page.goto("/dashboard/playground?id=kling/kling-v3&kind=video")
        csrf = await page.locator("#playground-form input[name=csrf]").input_value()
        refused = await page.request.post("/dashboard/playground", form={
            "csrf": csrf, "provider": "kling", "model": "kling-v3", "kind": "video", "prompt": "x",
            "duration_seconds": "99"})
        assert refused.status == 422 and "duration_seconds" in await refused.text()


async def test_fifty_job_batch_per_provider_live_with_posters(ops_stack: Stack, browser: Browser) -> None:
    stack = ops_stack
    items = [{"ref": f"img-{i}", "provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
              "input": {"prompt": f"tile {i} [sim:run=0.5]"}} for i in range(40)]
    items += [{"ref": f"vid-{i}", "provider": "replicate", "kind": "video", "model": "minimax/video-01",
               "input": {"prompt": f"wave {i}"}} for i in range(5)]
    items += [{"ref": f"fal-{i}", "provider": "fal", "kind": "image", "model": "fal-ai/flux/schnell",
               "input": {"prompt": f"fal {i}"}} for i in range(5)]
    page = await browser.sign_in(stack.api_key)
    async with api(stack) as client:
        created = (await client.post("/v1/batches", json={"jobs": items})).json()
        assert created["total"] == 50
        await page.goto(f"/dashboard/batches/{created['id']}")
        await page.evaluate("window.notReloaded = true")
        await page.locator("#batch-state[data-terminal=true]").wait_for(timeout=60_000)
        assert await page.evaluate("window.notReloaded === true")  # followed live
        assert "succeeded 50" in " ".join((await page.locator("#batch-counts").inner_text()).split())
        rows = page.locator("#batch-providers tbody tr")
        assert await rows.count() == 2
        assert "45/45" in await page.locator("#provider-replicate td[data-label=Progress]").inner_text()
        assert "5/5" in await page.locator("#provider-fal td[data-label=Progress]").inner_text()
        assert await page.locator("#provider-fal td[data-label=succeeded]").inner_text() == "5"
        assert await page.locator("#batch-main figure.card").count() == 50
        poster = page.locator("#batch-main video.poster").first
        await until(poster, "v => v.readyState >= 1 && v.videoWidth > 0", timeout=LIVE_TIMEOUT_MS / 1000)
        assert "#t=0.1" in (await poster.get_attribute("src") or "")
        await browser.screenshot("batch-50")


async def test_new_views_fit_a_phone(ops_stack: Stack) -> None:
    phone = await Browser(ops_stack).start(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    try:
        page = await phone.sign_in(ops_stack.api_key)
        async with api(ops_stack) as client:
            job = await wait_for(client, (await submit(client, kind="video", model="minimax/video-01",
                                                       input={"prompt": "waves " * 40}))["id"])
            batch = (await client.post("/v1/batches", json={"jobs": [
                {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
                 "input": {"prompt": "p"}}]})).json()
        for path in ("/dashboard/jobs", f"/dashboard/jobs/{job['id']}", "/dashboard/operations", "/dashboard/spend",
                     "/dashboard/playground?id=kling/kling-v3&kind=video", f"/dashboard/batches/{batch['id']}"):
            await page.goto(path)
            widths = await page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            assert widths[0] <= widths[1], (path, widths)
        phone.assert_same_origin()
    finally:
        await phone.close()


async def test_dev_banner_names_the_dashboard(ops_stack: Stack) -> None:
    from orchestrator.cli.main import dev_banner

    assert f"{ops_stack.api_url}/dashboard" in dev_banner(ops_stack, "memory")
