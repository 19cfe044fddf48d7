"""The Runway simulator, driven over real HTTP exactly as Runway's docs tell a client to."""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
import runwayml
from runwayml.types.task_retrieve_response import Cancelled, Failed, Pending, Running, Succeeded

from providers.sandbox.base import SimConfig
from providers.sandbox.media import png
from providers.sandbox.runway import RunwaySimulator
from providers.sandbox.serve import serving

KEY = "key_" + "ab" * 64
HEADERS = {"Authorization": f"Bearer {KEY}", "X-Runway-Version": "2024-11-06"}
IMAGE = "https://example.com/bunny.jpg"
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def i2v(**kw: Any) -> dict[str, Any]:
    return {"model": "gen4_turbo", "promptImage": IMAGE, "ratio": "1280:720",
            "promptText": "a bunny in a meadow"} | kw


def jwt_claims(url: str) -> dict[str, Any]:
    """The (unverified) payload of the ``_jwt`` on a Runway output URL."""
    token = parse_qs(urlsplit(url).query)["_jwt"][0]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    return claims


@dataclass
class Env:
    sim: RunwaySimulator
    base: str
    http: httpx.AsyncClient

    async def create(self, body: dict[str, Any], endpoint: str = "image_to_video",
                     headers: dict[str, str] | None = None) -> httpx.Response:
        hdrs = HEADERS if headers is None else headers
        return await self.http.post(f"/v1/{endpoint}", json=body, headers=hdrs)

    async def task(self, task_id: str) -> httpx.Response:
        return await self.http.get(f"/v1/tasks/{task_id}", headers=HEADERS)

    async def wait(self, task_id: str, within: float = 10) -> dict[str, Any]:
        deadline = time.time() + within
        while time.time() < deadline:
            r = await self.task(task_id)
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            if body["status"] in TERMINAL:
                return body
            await asyncio.sleep(0.05)
        raise AssertionError("task did not finish")


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = RunwaySimulator(SimConfig(queue_seconds=0.1, run_seconds=0.3, api_keys=[KEY]))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        yield Env(sim, base, http)


async def test_image_to_video_success_real_mp4(env: Env) -> None:
    r = await env.create(i2v(promptText="a bunny [sim:queue=0.3] [sim:run=0.5]"))
    assert r.status_code == 200
    assert list(r.json()) == ["id"]
    task_id = r.json()["id"]
    assert str(uuid.UUID(task_id)) == task_id

    statuses: list[str] = []
    while True:
        body = (await env.task(task_id)).json()
        assert body["id"] == task_id and body["createdAt"].endswith("Z")
        if not statuses or statuses[-1] != body["status"]:
            statuses.append(body["status"])
        if body["status"] == "RUNNING":
            assert isinstance(body["progress"], float) and 0 <= body["progress"] < 1
        else:
            assert "progress" not in body
        if body["status"] not in TERMINAL:
            assert body["estimatedCost"] == {"credits": 50.0} and "cost" not in body
        if body["status"] in TERMINAL:
            break
        await asyncio.sleep(0.03)
    assert statuses == ["PENDING", "RUNNING", "SUCCEEDED"]
    assert body["cost"] == {"credits": 50} and "estimatedCost" not in body  # gen4_turbo: 5/s, 10 s
    (url,) = body["output"]
    payload = jwt_claims(url)
    assert payload["bucket"] == "runway-task-artifacts" and payload["exp"] > time.time()

    got = await env.http.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "video/mp4"
    assert got.content[4:8] == b"ftyp"

    other = (await env.create(i2v(promptText="another one"))).json()["id"]
    url2 = (await env.wait(other))["output"][0]
    assert (await env.http.get(url2)).content not in (b"", got.content)


async def test_the_official_runwayml_client_reads_every_state(env: Env) -> None:
    client = runwayml.AsyncRunwayML(api_key=KEY, base_url=env.base, max_retries=0)
    created = await client.image_to_video.create(model="gen4_turbo", prompt_image=IMAGE, ratio="1280:720",
                                                 prompt_text="a bunny [sim:queue=0.2] [sim:run=0.4]",
                                                 duration=5)
    seen: list[Any] = []
    while not seen or seen[-1].status not in TERMINAL:
        task = await client.tasks.retrieve(created.id)
        if not seen or seen[-1].status != task.status:
            seen.append(task)
        await asyncio.sleep(0.05)
    pending, running, done = seen
    assert isinstance(pending, Pending) and pending.estimated_cost.credits == 25.0
    assert isinstance(running, Running) and 0 <= running.progress < 1 and running.estimated_cost.credits == 25.0
    assert isinstance(done, Succeeded) and done.cost.credits == 25
    assert (await env.http.get(done.output[0])).headers["content-type"] == "video/mp4"

    failing = await client.image_to_video.create(model="gen4_turbo", prompt_image=IMAGE, ratio="1280:720",
                                                 prompt_text="x [sim:fail]")
    await env.wait(failing.id)
    failed = await client.tasks.retrieve(failing.id)
    assert isinstance(failed, Failed) and failed.failure_code == "INTERNAL.BAD_OUTPUT.CODE01"
    assert failed.cost.credits == 0  # refunded

    env.sim.config.run_seconds = 5
    slow = await client.image_to_video.create(model="gen4_turbo", prompt_image=IMAGE, ratio="1280:720")
    await client.tasks.delete(slow.id)
    cancelled = await client.tasks.retrieve(slow.id)
    assert isinstance(cancelled, Cancelled) and cancelled.cost.credits == 0
    await client.close()


async def test_final_cost_follows_refunds(env: Env) -> None:
    env.sim.config.extra["credit_balance"] = 1000
    env.sim.config.run_seconds = 5
    running = (await env.create(i2v())).json()["id"]
    queued = (await env.create(i2v(promptText="later [sim:queue=5]"))).json()["id"]
    safety = (await env.create(i2v(promptText="x [sim:safety] [sim:run=0.1]"))).json()["id"]
    other = (await env.create(i2v(promptText="x [sim:fail] [sim:run=0.1]"))).json()["id"]
    await asyncio.sleep(0.2)
    assert (await env.task(running)).json()["status"] == "RUNNING"
    for task_id in (running, queued):
        assert (await env.http.delete(f"/v1/tasks/{task_id}", headers=HEADERS)).status_code == 204
    costs = {t: (await env.wait(t))["cost"]["credits"] for t in (running, queued, safety, other)}
    assert costs == {running: 50, queued: 0, safety: 50, other: 0}  # SAFETY.INPUT is not refunded
    org = (await env.http.get("/v1/organization", headers=HEADERS)).json()
    assert org["creditBalance"] == 1000 - 100


async def test_text_to_video_and_other_models(env: Env) -> None:
    r = await env.create({"model": "gen4.5", "promptText": "a city at night", "ratio": "720:1280",
                          "duration": 5}, "text_to_video")
    assert r.status_code == 200, r.text
    assert (await env.wait(r.json()["id"]))["status"] == "SUCCEEDED"
    ok = [
        ({"model": "veo3.1_fast", "promptText": "waves", "ratio": "1920:1080", "duration": 6, "audio": True},
         "text_to_video"),
        (i2v(model="veo3.1", ratio="1080:1920", duration=8,
             promptImage=[{"uri": IMAGE, "position": "first"}, {"uri": IMAGE, "position": "last"}]),
         "image_to_video"),
        (i2v(model="gen4.5", duration=10, seed=42, contentModeration={"publicFigureThreshold": "low"}),
         "image_to_video"),
        (i2v(promptImage="data:image/png;base64," + base64.b64encode(png("x")).decode(), promptText=None),
         "image_to_video"),
    ]
    for body, endpoint in ok:
        r = await env.create({k: v for k, v in body.items() if v is not None}, endpoint)
        assert r.status_code == 200, (body, r.text)


@pytest.mark.parametrize(
    ("body", "endpoint", "field"),
    [
        (i2v(ratio="16:9"), "image_to_video", "ratio"),
        (i2v(duration=11), "image_to_video", "duration"),
        (i2v(duration="5"), "image_to_video", "duration"),
        (i2v(model="gen4.5", duration=None), "image_to_video", "duration"),
        (i2v(model="veo3.1", ratio="1280:720", duration=5), "image_to_video", "duration"),
        (i2v(model="gen2"), "image_to_video", "model"),
        (i2v(model="gen3a_turbo", ratio="1280:768", duration=5), "image_to_video", "model"),  # removed
        (i2v(promptImage=None), "image_to_video", "promptImage"),
        (i2v(promptImage="http://example.com/a.jpg"), "image_to_video", "promptImage"),
        (i2v(promptImage="https://10.0.0.1/a.jpg"), "image_to_video", "promptImage"),
        (i2v(promptImage="data:image/gif;base64,R0lGOD"), "image_to_video", "promptImage"),
        (i2v(promptImage=[{"uri": IMAGE, "position": "last"}]), "image_to_video", "promptImage.0.position"),
        (i2v(promptText="x" * 1001), "image_to_video", "promptText"),
        (i2v(seed=-1), "image_to_video", "seed"),
        ({"model": "gen4_turbo", "promptText": "x", "ratio": "1280:720"}, "text_to_video", "model"),
        ({"model": "gen4.5", "promptText": "x", "ratio": "960:960", "duration": 5}, "text_to_video", "ratio"),
        ({"model": "veo3.1", "ratio": "1280:720"}, "text_to_video", "promptText"),
    ],
)
async def test_validation_400(env: Env, body: dict[str, Any], endpoint: str, field: str) -> None:
    r = await env.create({k: v for k, v in body.items() if v is not None}, endpoint)
    assert r.status_code == 400, r.text
    err = r.json()
    assert isinstance(err["error"], str) and field.split(".")[0] in err["error"]
    assert err["issues"][0]["path"] == [field]
    assert env.sim.stats.creations == 0


async def test_legacy_model_knob_and_lenient_urls(env: Env) -> None:
    env.sim.config.extra.update(legacy_models=True, strict_asset_urls=False)
    r = await env.create(i2v(model="gen3a_turbo", ratio="1280:768", duration=5,
                             promptImage="http://127.0.0.1:9/a.png"))
    assert r.status_code == 200, r.text


async def test_auth_and_version_header(env: Env) -> None:
    r = await env.create(i2v(), headers={"X-Runway-Version": "2024-11-06"})
    assert r.status_code == 401 and isinstance(r.json()["error"], str)
    wrong = {"Authorization": "Bearer key_wrong", "X-Runway-Version": "2024-11-06"}
    r = await env.create(i2v(), headers=wrong)
    assert r.status_code == 401 and r.json()["error"]
    r = await env.create(i2v(), headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "X-Runway-Version" in r.json()["error"]
    r = await env.create(i2v(), headers={"Authorization": f"Bearer {KEY}", "X-Runway-Version": "2023-01-01"})
    assert r.status_code == 400 and "2023-01-01" in r.json()["error"]
    r = await env.http.get("/v1/tasks/whatever", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400
    assert env.sim.stats.creations == 0
    env.sim.config.extra["api_versions"] = ["2024-11-06", "2026-01-01"]
    r = await env.create(i2v(), headers={"Authorization": f"Bearer {KEY}", "X-Runway-Version": "2026-01-01"})
    assert r.status_code == 200


async def test_throttled_directive(env: Env) -> None:
    task_id = (await env.create(i2v(promptText="slow [sim:throttled=0.5] [sim:run=1.5]"))).json()["id"]
    first = (await env.task(task_id)).json()
    assert first["status"] == "THROTTLED" and "progress" not in first
    await asyncio.sleep(0.3)
    assert (await env.task(task_id)).json()["status"] == "THROTTLED"
    await asyncio.sleep(0.3)
    assert (await env.task(task_id)).json()["status"] in ("PENDING", "RUNNING")
    assert (await env.wait(task_id))["status"] == "SUCCEEDED"
    # createdAt is the submission time, not the moment it left THROTTLED.
    created = first["createdAt"]
    assert (await env.task(task_id)).json()["createdAt"] == created


async def test_concurrency_limit_throttles_in_order(env: Env) -> None:
    env.sim.config.extra["max_concurrent_generations"] = 1
    a = (await env.create(i2v(promptText="a"))).json()["id"]
    b = (await env.create(i2v(promptText="b [sim:run=1]"))).json()["id"]
    other_model = (await env.create(i2v(model="veo3.1", ratio="1280:720"))).json()["id"]
    assert (await env.task(a)).json()["status"] == "PENDING"
    assert (await env.task(b)).json()["status"] == "THROTTLED"
    assert (await env.task(other_model)).json()["status"] == "PENDING"  # limits are per model
    assert (await env.wait(a))["status"] == "SUCCEEDED"
    assert (await env.task(b)).json()["status"] in ("PENDING", "RUNNING")
    assert (await env.wait(b))["status"] == "SUCCEEDED"
    org = (await env.http.get("/v1/organization", headers=HEADERS)).json()
    assert org["tier"]["models"]["gen4_turbo"]["maxConcurrentGenerations"] == 1
    assert org["usage"]["models"]["gen4_turbo"]["dailyGenerations"] == 2
    assert org["creditBalance"] < org["tier"]["maxMonthlyCreditSpend"]


async def test_failures(env: Env) -> None:
    a = (await env.create(i2v(promptText="x [sim:fail]"))).json()["id"]
    b = (await env.create(i2v(promptText="x [sim:fail=THIRD_PARTY.UNAVAILABLE]"))).json()["id"]
    c = (await env.create(i2v(promptText="x [sim:safety]"))).json()["id"]
    d = (await env.create(i2v(promptText="x [sim:fail=none]"))).json()["id"]
    fa, fb, fc, fd = [await env.wait(t) for t in (a, b, c, d)]
    assert fa["status"] == "FAILED" and fa["failureCode"] == "INTERNAL.BAD_OUTPUT.CODE01" and fa["failure"]
    assert fb["failureCode"] == "THIRD_PARTY.UNAVAILABLE"
    assert fc["failureCode"].startswith("SAFETY.INPUT") and "moderation" in fc["failure"]
    assert fd["failureCode"] is None and fd["failure"]
    assert "output" not in fa


async def test_cancel_and_delete(env: Env) -> None:
    env.sim.config.run_seconds = 5
    running = (await env.create(i2v())).json()["id"]
    await asyncio.sleep(0.15)
    assert (await env.task(running)).json()["status"] == "RUNNING"
    r = await env.http.delete(f"/v1/tasks/{running}", headers=HEADERS)
    assert r.status_code == 204 and r.content == b""
    assert (await env.task(running)).json()["status"] == "CANCELLED"
    # Deleting the cancelled task now removes it.
    assert (await env.http.delete(f"/v1/tasks/{running}", headers=HEADERS)).status_code == 204
    gone = await env.task(running)
    assert gone.status_code == 404 and gone.json()["error"]
    assert (await env.http.delete(f"/v1/tasks/{running}", headers=HEADERS)).status_code == 404

    throttled = (await env.create(i2v(promptText="x [sim:throttled=5]"))).json()["id"]
    assert (await env.http.delete(f"/v1/tasks/{throttled}", headers=HEADERS)).status_code == 204
    assert (await env.task(throttled)).json()["status"] == "CANCELLED"

    env.sim.config.run_seconds = 0.1
    env.sim.config.extra["deleted_task_get"] = "cancelled"
    done = (await env.create(i2v())).json()["id"]
    assert (await env.wait(done))["status"] == "SUCCEEDED"
    assert (await env.http.delete(f"/v1/tasks/{done}", headers=HEADERS)).status_code == 204
    assert (await env.task(done)).json()["status"] == "CANCELLED"

    missing = await env.task(str(uuid.uuid4()))
    assert missing.status_code == 404 and "error" in missing.json()


async def test_429_daily_limit_and_injected_faults(env: Env) -> None:
    env.sim.config.extra["max_daily_generations"] = 1
    assert (await env.create(i2v())).status_code == 200
    r = await env.create(i2v())
    assert r.status_code == 429 and isinstance(r.json()["error"], str)
    assert (await env.create(i2v(model="gen4.5", duration=5))).status_code == 200  # another model
    env.sim.config.extra["max_daily_generations"] = None

    await env.http.post("/_sim/faults", json=[
        {"kind": "429", "route": "create", "retry_after": 3},
        {"kind": "502", "route": "create"},
        {"kind": "504", "route": "get"},
    ])
    r = await env.create(i2v())
    assert r.status_code == 429 and r.headers["retry-after"] == "3" and r.json()["error"]
    r = await env.create(i2v())
    assert r.status_code == 502 and r.json()["error"]
    task_id = (await env.create(i2v())).json()["id"]
    assert (await env.task(task_id)).status_code == 504
    assert (await env.task(task_id)).status_code == 200


async def test_ambiguous_create_and_no_idempotency(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[{"kind": "504", "route": "create", "after_effect": True}])
    body = i2v(promptText="the same request twice")
    assert (await env.create(body)).status_code == 504
    assert (await env.create(body)).status_code == 200  # a blind retry bills a second task
    stats = (await env.http.get("/_sim/stats")).json()
    assert stats["creations"] == 2 and len(stats["duplicate_identities"]) == 1


async def test_credits(env: Env) -> None:
    env.sim.config.extra["credit_balance"] = 60  # gen4_turbo: 5 credits/s, 10 s by default
    assert (await env.create(i2v())).status_code == 200
    r = await env.create(i2v())
    assert r.status_code == 400 and "credits" in r.json()["error"]


async def test_output_urls_expire_and_refresh_on_fetch(env: Env) -> None:
    env.sim.config.output_ttl_seconds = 0.4
    task_id = (await env.create(i2v())).json()["id"]
    url = (await env.wait(task_id))["output"][0]
    assert (await env.http.get(url)).status_code == 200
    await asyncio.sleep(0.5)
    expired = await env.http.get(url)
    assert expired.status_code == 403 and b"AccessDenied" in expired.content
    fresh = (await env.task(task_id)).json()["output"][0]
    assert fresh != url
    assert (await env.http.get(fresh)).status_code == 200

    # A URL whose JWT was not signed by Runway does not work, whatever its exp says.
    claims = jwt_claims(fresh)
    forged = jwt.encode(claims | {"exp": time.time() + 3600}, "not-runways-signing-key-0123456789abcdef",
                        algorithm="HS256")
    assert (await env.http.get(fresh.split("?")[0] + "?_jwt=" + forged)).status_code == 403

    env.sim.config.output_ttl_seconds = 3600
    url3 = (await env.task(task_id)).json()["output"][0]
    await env.http.post("/_sim/expire-files")
    assert (await env.http.get(url3)).status_code == 403
    again = (await env.task(task_id)).json()["output"][0]
    assert (await env.http.get(again)).status_code == 200


async def test_unknown_route_and_method(env: Env) -> None:
    r = await env.http.put("/v1/tasks/abc", headers=HEADERS)
    assert r.status_code == 405 and r.json()["error"]
    r = await env.http.get("/v1/nothing", headers=HEADERS)
    assert r.status_code == 404 and r.json()["error"]
