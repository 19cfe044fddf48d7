"""Costs, quotes and budgets (issue 17): ``cost.final``, ``dry_run`` for jobs and batches, the budget
ledger (exact under 1,000 concurrent submissions), 402 naming what is left, releases when nothing
was billed, ``GET /v1/usage`` and ``atelier tenants budget`` / ``atelier usage``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from orchestrator.cli.devstack import Stack, dev_stack
from orchestrator.store.ledger import Ledger
from orchestrator.store.queue import connect
from orchestrator.store.tenants import create_api_key, hash_key
from tests.helpers import api, sim_stats, submit, wait_for

FLUX = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
        "input": {"prompt": "a red fox"}}
FLUX_PRICE = 0.003  # the catalog's price per image of flux-schnell at Replicate


@pytest.fixture
async def api_only(redis_url: str) -> AsyncIterator[Stack]:
    """The API and the simulators, no worker: accepted jobs stay queued."""
    async with dev_stack(redis_url=redis_url, run_worker=False, log_format="text") as s:
        yield s


async def set_budget(stack: Stack, tenant: str, **amounts: float | None) -> None:
    redis = await connect(stack.settings.redis_url, stack.settings.queue_name)
    try:
        for period, amount in amounts.items():
            await Ledger(redis).set_budget(tenant, period, amount)
    finally:
        await redis.aclose()


def problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = resp.json()
    return body


# -- quotes ------------------------------------------------------------------------------------------

async def test_dry_run_quotes_a_job_and_creates_nothing(api_only: Stack) -> None:
    async with api(api_only) as client:
        resp = await client.post("/v1/jobs", json={**FLUX, "input": {"prompt": "x", "num_outputs": 3},
                                                   "dry_run": True})
        assert resp.status_code == 200, resp.text
        quote = resp.json()
        assert quote["object"] == "quote"
        assert quote["cost"]["amount"] == pytest.approx(3 * FLUX_PRICE)
        assert "per image x 3" in quote["cost"]["rule"]
        assert quote["request"]["model"] == FLUX["model"]
        assert (await client.get("/v1/jobs")).json()["data"] == []
        # A dry run is validated like a real request: the field is named.
        bad = await client.post("/v1/jobs", json={**FLUX, "input": {"prompt": "x", "num_outputs": 9}, "dry_run": True})
        assert problem(bad, 422)["errors"][0]["field"].endswith("num_outputs")


async def test_dry_run_quotes_a_batch_per_item_and_in_total(api_only: Stack) -> None:
    items = [FLUX, {**FLUX, "input": {"prompt": "y", "num_outputs": 2}},
             {"provider": "fal", "kind": "image", "model": "fal-ai/flux/dev", "input": {"prompt": "z"}},
             {**FLUX, "input": {"prompt": "w", "num_outputs": 99}}]
    async with api(api_only) as client:
        resp = await client.post("/v1/batches", json={"jobs": items, "dry_run": True})
        assert resp.status_code == 200, resp.text
        quote = resp.json()
        assert quote["object"] == "batch_quote"
        assert [q["index"] for q in quote["items"]] == [0, 1, 2]
        assert [q["cost"]["amount"] for q in quote["items"]] == pytest.approx([FLUX_PRICE, 2 * FLUX_PRICE, 0.025])
        assert quote["total"]["amount"] == pytest.approx(3 * FLUX_PRICE + 0.025)
        assert [p["index"] for p in quote["invalid"]] == [3]
        assert (await client.get("/v1/batches")).json()["data"] == []


# -- budgets -----------------------------------------------------------------------------------------

async def test_a_thousand_concurrent_submissions_at_a_budget_for_a_hundred(api_only: Stack) -> None:
    await set_budget(api_only, "dev", monthly=100 * FLUX_PRICE)
    # 20 clients of 50 requests each, all in flight at once: one httpx pool queueing 1,000 requests
    # spends seconds of CPU per request on its own bookkeeping (quadratic), which is not what is tested.
    clients = [api(api_only) for _ in range(20)]
    async with api(api_only) as client:
        answers = [r for batch in await asyncio.gather(*(
            asyncio.gather(*(c.post("/v1/jobs", json=FLUX) for _ in range(50))) for c in clients)) for r in batch]
        for c in clients:
            await c.aclose()
        statuses = [r.status_code for r in answers]
        assert statuses.count(202) == 100, {s: statuses.count(s) for s in set(statuses)}
        assert statuses.count(402) == 900
        refused = next(r for r in answers if r.status_code == 402)
        body = problem(refused, 402)
        assert body["budget"] == "monthly" and body["remaining"] == 0 and body["needed"] == FLUX_PRICE
        assert "monthly budget has 0 USD left" in body["detail"]
        usage = (await client.get("/v1/usage")).json()
        assert usage["total"]["jobs"] == 100
        assert usage["total"]["estimated"] == pytest.approx(100 * FLUX_PRICE)
        assert usage["budgets"]["monthly"]["remaining"] == 0
        assert usage["budgets"]["monthly"]["committed"] == pytest.approx(100 * FLUX_PRICE)
        # Canceling a job that was never submitted releases its hold: exactly one more fits.
        first = next(r.json()["id"] for r in answers if r.status_code == 202)
        assert (await client.post(f"/v1/jobs/{first}/cancel")).json()["cost"]["final"]["amount"] == 0
        again = await asyncio.gather(*(client.post("/v1/jobs", json=FLUX) for _ in range(5)))
        assert sorted(r.status_code for r in again) == [202, 402, 402, 402, 402]


async def test_budgets_settle_to_final_costs_and_release_what_was_not_billed(redis_url: str) -> None:
    async with dev_stack(redis_url=redis_url, log_format="text", submit_max_attempts=1) as stack:
        await set_budget(stack, "dev", daily=10 * FLUX_PRICE)
        async with api(stack) as client:
            ok = await submit(client, input={"prompt": "a fox", "num_outputs": 2})
            done = await wait_for(client, ok["id"])
            assert done["status"] == "succeeded"
            cost = done["cost"]
            assert cost["estimated"]["amount"] == pytest.approx(2 * FLUX_PRICE)
            assert cost["final"] == (cost["reported"] or cost["estimated"])

            # Refused before creation (503 on every create, one attempt allowed): nothing billed.
            async with httpx.AsyncClient() as sim:
                await sim.post(f"{stack.simulator_url('replicate')}/_sim/faults",
                               json=[{"kind": "503", "route": "create", "count": 5}])
            refused = await submit(client)
            failed = await wait_for(client, refused["id"])
            assert failed["status"] == "failed" and failed["error"]["code"] == "provider_unavailable"
            assert failed["cost"]["final"]["amount"] == 0
            assert "nothing was billed" in failed["cost"]["final"]["rule"]

            usage = (await client.get("/v1/usage", params={"group_by": "model"})).json()
            assert usage["total"] | {} == usage["total"]
            assert (usage["total"]["jobs"], usage["total"]["finished"], usage["total"]["succeeded"]) == (2, 2, 1)
            assert usage["total"]["final"] == pytest.approx(cost["final"]["amount"])
            assert usage["budgets"]["daily"]["committed"] == pytest.approx(cost["final"]["amount"])
            [group] = usage["groups"]
            assert group["key"] == "replicate/black-forest-labs/flux-schnell" and group["jobs"] == 2
            assert (await sim_stats(stack, "replicate"))["creations"] == 1


async def test_a_batch_over_budget_is_refused_whole_and_one_within_is_held_once(api_only: Stack) -> None:
    await set_budget(api_only, "dev", monthly=10 * FLUX_PRICE)
    async with api(api_only) as client:
        over = await client.post("/v1/batches", json={"jobs": [FLUX] * 11})
        body = problem(over, 402)
        assert body["remaining"] == pytest.approx(10 * FLUX_PRICE) and body["needed"] == pytest.approx(11 * FLUX_PRICE)
        assert (await client.get("/v1/batches")).json()["data"] == []
        headers = {"Idempotency-Key": "b-1"}
        first = await client.post("/v1/batches", json={"jobs": [FLUX] * 6}, headers=headers)
        assert first.status_code == 202, first.text
        replay = await client.post("/v1/batches", json={"jobs": [FLUX] * 6}, headers=headers)
        assert replay.status_code == 200 and replay.json()["id"] == first.json()["id"]
        usage = (await client.get("/v1/usage", params={"group_by": "batch"})).json()
        assert usage["budgets"]["monthly"]["committed"] == pytest.approx(6 * FLUX_PRICE)
        assert [(g["key"], g["jobs"]) for g in usage["groups"]] == [(first.json()["id"], 6)]
        assert problem(await client.post("/v1/jobs", json={**FLUX, "input": {"prompt": "x", "num_outputs": 5}}),
                       402)["remaining"] == pytest.approx(4 * FLUX_PRICE)


async def test_an_api_key_with_a_budget_of_its_own(api_only: Stack) -> None:
    redis = await connect(api_only.settings.redis_url, api_only.settings.queue_name)
    try:
        limited = await create_api_key(redis, "dev")
        await Ledger(redis).set_budget("dev", "monthly", 2 * FLUX_PRICE, api_key=hash_key(limited))
    finally:
        await redis.aclose()
    async with api(api_only, limited) as client, api(api_only) as other:
        assert [(await client.post("/v1/jobs", json=FLUX)).status_code for _ in range(2)] == [202, 202]
        body = problem(await client.post("/v1/jobs", json=FLUX), 402)
        assert body["budget"] == "key_monthly" and "API key's monthly budget" in body["detail"]
        # A batch through the same key is held against it too; the tenant's other key is not limited.
        assert problem(await client.post("/v1/batches", json={"jobs": [FLUX]}), 402)["budget"] == "key_monthly"
        assert (await other.post("/v1/jobs", json=FLUX)).status_code == 202
        mine = (await client.get("/v1/usage")).json()["budgets"]
        assert mine["key_monthly"]["limit"] == pytest.approx(2 * FLUX_PRICE) and mine["key_monthly"]["remaining"] == 0
        assert mine["monthly"]["committed"] == pytest.approx(3 * FLUX_PRICE)
        assert "key_monthly" not in (await other.get("/v1/usage")).json()["budgets"]


async def test_usage_routes_validate_their_parameters(api_only: Stack) -> None:
    async with api(api_only) as client:
        assert problem(await client.get("/v1/usage", params={"from": "2026-12-05", "to": "2026-12-01"}),
                       422)["errors"][0]["field"] == "from"
        assert (await client.get("/v1/usage", params={"group_by": "colour"})).status_code == 422
        today = datetime.now(UTC).date()
        empty = (await client.get("/v1/usage", params={"group_by": "day"})).json()
        assert empty["from"] == today.replace(day=1).isoformat() and empty["to"] == today.isoformat()
        assert empty["total"]["jobs"] == 0 and empty["budgets"]["monthly"]["limit"] is None


def test_budget_and_usage_commands(redis_url: str) -> None:
    env = {**os.environ, "ATELIER_REDIS_URL": redis_url}

    def atelier(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], env=env, capture_output=True,
                              text=True, timeout=60)

    done = atelier("tenants", "budget", "--tenant", "acme", "--monthly", "500", "--daily", "25", "--init")
    assert done.returncode == 0, done.stderr
    assert "monthly budget 500 USD" in done.stdout and "daily budget 25 USD" in done.stdout
    usage = atelier("usage", "--tenant", "acme", "--json")
    assert usage.returncode == 0, usage.stderr
    report = json.loads(usage.stdout)
    assert report["budgets"]["monthly"]["limit"] == 500 and report["budgets"]["daily"]["remaining"] == 25
    bad = atelier("tenants", "budget", "--tenant", "acme")
    assert bad.returncode != 0 and "--monthly" in bad.stderr
    cleared = atelier("tenants", "budget", "--tenant", "acme", "--clear")
    assert cleared.returncode == 0 and "monthly budget none" in cleared.stdout

    created = atelier("keys", "create", "--tenant", "acme")
    assert created.returncode == 0, created.stderr
    prefix = created.stdout.strip()[:8]
    listed = atelier("keys", "list", "--tenant", "acme")
    assert listed.returncode == 0 and f"{prefix}..." in listed.stdout and "the tenant's only" in listed.stdout
    limited = atelier("keys", "budget", "--tenant", "acme", "--key-prefix", prefix, "--daily", "3")
    assert limited.returncode == 0, limited.stderr
    assert f"key {prefix}... of tenant acme: budgets daily 3 USD" in limited.stdout
    assert atelier("keys", "create", "--tenant", "acme").returncode == 0
    ambiguous = atelier("keys", "budget", "--tenant", "acme", "--key-prefix", "atl_", "--daily", "3")
    assert ambiguous.returncode != 0 and "keys list" in ambiguous.stderr
