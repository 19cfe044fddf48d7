"""The Volcengine Ark simulator (Seedance video tasks, Seedream images), driven over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from providers.sandbox.base import SimConfig
from providers.sandbox.doubao import DoubaoSimulator
from providers.sandbox.serve import serving

KEY = "ark-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TASKS = "/api/v3/contents/generations/tasks"
IMAGES = "/api/v3/images/generations"
PRO = "doubao-seedance-1-0-pro-250528"
PRO15 = "doubao-seedance-1-5-pro-251215"
SEEDREAM = "doubao-seedream-4-0-250828"
FIRST = "https://example.com/first.png"
LAST = "https://example.com/last.png"


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def image(url: str = FIRST, role: str | None = "first_frame") -> dict[str, Any]:
    item: dict[str, Any] = {"type": "image_url", "image_url": {"url": url}}
    return item | ({"role": role} if role else {})


@dataclass
class Env:
    sim: DoubaoSimulator
    base: str
    http: httpx.AsyncClient

    async def create(self, *content: dict[str, Any], model: str = PRO, **body: Any) -> httpx.Response:
        items = list(content) or [text("A kitten yawns at the camera --ratio 16:9")]
        return await self.http.post(TASKS, json={"model": model, "content": items} | body, headers=AUTH)

    async def task_id(self, *content: dict[str, Any], **body: Any) -> str:
        r = await self.create(*content, **body)
        assert r.status_code == 200, r.text
        task_id: str = r.json()["id"]
        return task_id

    async def get(self, task_id: str) -> httpx.Response:
        return await self.http.get(f"{TASKS}/{task_id}", headers=AUTH)

    async def wait(self, task_id: str, within: float = 5.0) -> dict[str, Any]:
        deadline = time.time() + within
        while time.time() < deadline:
            body: dict[str, Any] = (await self.get(task_id)).json()
            if body["status"] in ("succeeded", "failed", "cancelled", "expired"):
                return body
            await asyncio.sleep(0.03)
        raise AssertionError("task did not finish")

    async def images(self, **body: Any) -> httpx.Response:
        return await self.http.post(IMAGES, json={"model": SEEDREAM, "prompt": "three frames: morning, noon, evening",
                                                  "size": "2K"} | body, headers=AUTH)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = DoubaoSimulator(SimConfig(queue_seconds=0.08, run_seconds=0.15, output_ttl_seconds=86400, api_keys=[KEY]))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        yield Env(sim, base, http)


def ark_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["code"] == code and "Request id: " in err["message"] and {"param", "type"} <= set(err)
    return err


class Receiver:
    """A callback endpoint that answers ``statuses`` in turn (then 200), after ``delay`` seconds."""

    def __init__(self, statuses: tuple[int, ...] = (), delay: float = 0.0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.statuses = list(statuses)
        self.delay = delay

        async def hook(request: Request) -> Response:
            self.bodies.append(await request.json())
            if self.delay:
                await asyncio.sleep(self.delay)
            return JSONResponse({}, status_code=self.statuses.pop(0) if self.statuses else 200)

        self.app = Starlette(routes=[Route("/hooks/ark/{job}", hook, methods=["POST"])])

    async def wait_for(self, n: int, within: float = 5.0) -> None:
        for _ in range(int(within / 0.02)):
            if len(self.bodies) >= n:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # give unexpected extras a chance to arrive


# -- video tasks ----------------------------------------------------------------------


async def test_video_task_lifecycle(env: Env) -> None:
    task_id = await env.task_id(
        text("A kitten yawns --ratio 16:9 --resolution 1080p --duration 5 --camerafixed false --watermark false "
             "[sim:run=0.4]"),
        image(FIRST, "first_frame"), image(LAST, "last_frame"), return_last_frame=True)
    assert task_id.startswith("cgt-")
    queued = (await env.get(task_id)).json()
    assert queued["status"] == "queued" and queued["error"] is None and "content" not in queued
    assert isinstance(queued["created_at"], int) and queued["created_at"] <= time.time()
    status = "queued"
    while status == "queued":
        status = (await env.get(task_id)).json()["status"]
    assert status == "running"

    done = await env.wait(task_id)
    assert done["status"] == "succeeded" and done["model"] == PRO
    assert (done["ratio"], done["resolution"], done["duration"], done["framespersecond"]) == ("16:9", "1080p", 5, 24)
    assert done["usage"]["completion_tokens"] == done["usage"]["total_tokens"] > 200_000
    assert done["updated_at"] >= done["created_at"]
    url = done["content"]["video_url"]
    query = parse_qs(urlsplit(url).query)
    assert query["X-Tos-Expires"] == ["86400"] and query["X-Tos-Algorithm"] == ["TOS4-HMAC-SHA256"]
    video = await env.http.get(url)
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"
    last = await env.http.get(done["content"]["last_frame_url"])
    assert last.content[:4] == b"\x89PNG"
    assert (await env.get(task_id)).json()["content"]["video_url"] == url  # fixed per task

    other = await env.wait(await env.task_id())
    assert (await env.http.get(other["content"]["video_url"])).content != video.content
    assert "last_frame_url" not in other["content"]
    assert env.sim.stats.creations == 2


async def test_text_flags_and_body_fields(env: Env) -> None:
    t = await env.wait(await env.task_id(text("a fox --rt 9:16 --dur 10 --rs 480p --seed 42 --fps 24 --cf true")))
    assert (t["ratio"], t["duration"], t["resolution"], t["seed"]) == ("9:16", 10, "480p", 42)
    f = await env.wait(await env.task_id(text("a fox --frames 29")))
    assert f["frames"] == 29 and "duration" not in f
    i2v = (await env.get(await env.task_id(text("a fox"), image(role=None)))).json()
    assert i2v["ratio"] == "adaptive" and i2v["resolution"] == "1080p"

    # Newer models take the same parameters as top-level fields; 1.0 models refuse them.
    newer = (await env.get(await env.task_id(text("a fox"), model=PRO15, resolution="720p", duration=8,
                                             ratio="1:1", generate_audio=True))).json()
    assert (newer["resolution"], newer["duration"], newer["ratio"], newer["generate_audio"]) == ("720p", 8, "1:1", True)
    err = ark_error(await env.create(text("a fox"), resolution="720p"), 400, "InvalidParameter")
    assert err["param"] == "resolution" and "--flags" in err["message"]
    env.sim.config.extra["legacy_body_params"] = "ignore"
    ignored = (await env.get(await env.task_id(text("a fox"), resolution="720p"))).json()
    assert ignored["resolution"] == "1080p"

    both = (text("a fox --resolution 480p"),)
    assert (await env.get(await env.task_id(*both, model=PRO15, resolution="720p"))).json()["resolution"] == "720p"
    env.sim.config.extra["param_conflict"] = "flags_wins"
    assert (await env.get(await env.task_id(*both, model=PRO15, resolution="720p"))).json()["resolution"] == "480p"
    env.sim.config.extra["param_conflict"] = "error"
    ark_error(await env.create(*both, model=PRO15, resolution="720p"), 400, "InvalidParameter")

    bad_flags = ["--ratio 2:1", "--duration 7", "--duration five", "--resolution 4k", "--frames 30", "--fps 30",
                 "--watermark maybe", "--seed -2", "--duration 5 --frames 29"]
    for flags in bad_flags:
        err = ark_error(await env.create(text(f"a fox {flags}")), 400, "InvalidParameter")
        assert err["param"] in ("ratio", "duration", "resolution", "frames", "framespersecond", "watermark", "seed")
    ark_error(await env.create(text("a fox"), model=PRO15, duration=13), 400, "InvalidParameter")
    ark_error(await env.create(text("a fox"), model=PRO15, generate_audio="yes"), 400, "InvalidParameter")


async def test_content_role_rules(env: Env) -> None:
    lite_i2v, seedance2 = "doubao-seedance-1-0-lite-i2v-250428", "doubao-seedance-2-0-260128"
    refs = [image(f"https://example.com/r{i}.png", "reference_image") for i in range(4)]
    accepted: list[tuple[list[dict[str, Any]], str]] = [
        ([text("x"), image(role=None)], PRO),
        ([text("x"), image("data:image/png;base64,iVBORw0KGgo=", "first_frame")], PRO),
        ([text("x"), *refs], lite_i2v),
        ([text("x"), image(role="reference_image"),
          {"type": "video_url", "video_url": {"url": "https://example.com/v.mp4"}, "role": "reference_video"}],
         seedance2),
    ]
    for content, model in accepted:
        assert (await env.create(*content, model=model)).status_code == 200, (content, model)
    refused: list[tuple[list[dict[str, Any]], str]] = [
        ([text("x"), image(role=None), image(LAST, role=None)], PRO),  # both roles are required
        ([text("x"), image(role="first_frame"), image(LAST, role=None)], PRO),
        ([text("x"), image(role="last_frame")], PRO),
        ([text("x"), image(role="reference_image")], PRO),
        ([text("x"), image(role="first_frame"), image(LAST, "reference_image")], lite_i2v),
        ([text("x"), *refs, image("https://example.com/r5.png", "reference_image")], lite_i2v),
        ([text("x")], lite_i2v),
        ([text("x"), image()], "doubao-seedance-1-0-lite-t2v-250428"),
        ([text("x"), image(role="middle")], PRO),
        ([text("x"), image("ftp://example.com/a.png")], PRO),
        ([text("x"), {"type": "video_url", "video_url": {"url": "https://e.com/v.mp4"}, "role": "reference_video"}],
         PRO),
        ([image()], PRO),
        ([text("x"), text("y")], PRO),
    ]
    for content, model in refused:
        ark_error(await env.create(*content, model=model), 400, "InvalidParameter")
    r = await env.http.post(TASKS, json={"model": PRO}, headers=AUTH)
    assert ark_error(r, 400, "MissingParameter")["param"] == "content"
    ark_error(await env.create(model="doubao-seedance-9-0"), 404, "InvalidEndpointOrModel.NotFound")
    ark_error(await env.create(callback_url="nowhere"), 400, "InvalidParameter")
    assert env.sim.stats.creations == len(accepted)


async def test_account_errors_moderation_429_and_routes(env: Env) -> None:
    ark_error(await env.http.post(TASKS, json={}), 401, "AuthenticationError")
    ark_error(await env.http.get(f"{TASKS}/cgt-x", headers={"Authorization": "Bearer nope"}), 401,
              "AuthenticationError")
    err = ark_error(await env.create(text("a kitten [sim:sensitive]")), 400, "InputTextSensitiveContentDetected")
    assert err["type"] == "BadRequest"
    ark_error(await env.create(text("x [sim:image_sensitive]"), image()), 400, "InputImageSensitiveContentDetected")
    ark_error(await env.create(text("x [sim:quota]")), 429, "QuotaExceeded")
    ark_error(await env.create(text("x [sim:overloaded]")), 429, "ServerOverloaded")
    env.sim.config.extra["not_open_models"] = [PRO]
    ark_error(await env.create(), 404, "ModelNotOpen")
    env.sim.config.extra.update(not_open_models=[], account_overdue=True)
    ark_error(await env.create(), 403, "AccountOverdueError")
    env.sim.config.extra.update(account_overdue=False, rpm=1)
    await env.task_id()
    ark_error(await env.create(), 429, "RateLimitExceeded.EndpointRPMExceeded")
    await env.task_id(model=PRO15)  # the limit is per model
    env.sim.config.extra["rpm"] = None

    await env.http.post("/_sim/faults", json=[{"kind": "429", "route": "create", "retry_after": 2},
                                              {"kind": "500", "route": "get"}])
    r = await env.create()
    ark_error(r, 429, "RateLimitExceeded.EndpointRPMExceeded")
    assert r.headers["retry-after"] == "2"
    task_id = await env.task_id()
    ark_error(await env.get(task_id), 500, "InternalServiceError")
    assert (await env.get(task_id)).status_code == 200
    assert env.sim.stats.creations == 3

    ark_error(await env.http.get("/api/v3/nothing", headers=AUTH), 404, "NotFound")
    ark_error(await env.http.put(f"{TASKS}/cgt-x", headers=AUTH), 405, "MethodNotAllowed")
    r = await env.http.post(TASKS, content=b"{nope", headers=AUTH)
    ark_error(r, 400, "InvalidParameter")


async def test_region_and_endpoint_ids(env: Env) -> None:
    env.sim.config.extra["endpoints"] = {"ep-20250601-abcde": PRO}
    assert (await env.create(model="ep-20250601-abcde")).status_code == 200
    env.sim.config.extra["region"] = "byteplus"
    ark_error(await env.create(model=PRO), 404, "InvalidEndpointOrModel.NotFound")
    for model in ("seedance-1-0-pro-250528", "dreamina-seedance-2-0-260128"):
        assert (await env.create(model=model)).status_code == 200, model
    ark_error(await env.images(), 404, "InvalidEndpointOrModel.NotFound")
    assert (await env.images(model="seedream-4-0-250828")).status_code == 200
    ark_error(await env.images(model="seedream-5-0-pro-260628"), 404, "InvalidEndpointOrModel.NotFound")


async def test_asynchronous_failures(env: Env) -> None:
    out = await env.wait(await env.task_id(text("a kitten [sim:output_sensitive]")))
    assert out["status"] == "failed" and out["error"]["code"] == "OutputVideoSensitiveContentDetected"
    assert out["error"]["message"] and "content" not in out and "usage" not in out
    internal = await env.wait(await env.task_id(text("a kitten [sim:fail]")))
    assert internal["error"]["code"] == "InternalServiceError"
    env.sim.config.extra["output_moderation_code"] = "OutputVideoSensitiveContentDetected.Violence"
    other = await env.wait(await env.task_id(text("a kitten [sim:output_sensitive]")))
    assert other["error"]["code"] == "OutputVideoSensitiveContentDetected.Violence"


async def test_delete_cancels_queued_refuses_running_deletes_finished(env: Env) -> None:
    queued = await env.task_id(text("slow [sim:queue=2]"))
    r = await env.http.delete(f"{TASKS}/{queued}", headers=AUTH)
    assert r.status_code == 200 and r.json() == {}
    cancelled = (await env.get(queued)).json()
    assert cancelled["status"] == "cancelled" and "content" not in cancelled
    assert (await env.wait(queued))["status"] == "cancelled"

    running = await env.task_id(text("busy [sim:run=2]"))
    await asyncio.sleep(0.15)
    err = ark_error(await env.http.delete(f"{TASKS}/{running}", headers=AUTH), 400, "InvalidAction.TaskRunning")
    assert "running" in err["message"]
    assert (await env.get(running)).json()["status"] == "running"

    done = await env.task_id()
    await env.wait(done)
    assert (await env.http.delete(f"{TASKS}/{done}", headers=AUTH)).status_code == 200
    ark_error(await env.get(done), 404, "ResourceNotFound")
    ark_error(await env.http.delete(f"{TASKS}/{done}", headers=AUTH), 404, "ResourceNotFound")
    # The cancelled record is deleted automatically after a while (24 h by default).
    env.sim.config.extra["cancelled_retention_seconds"] = 0
    ark_error(await env.get(queued), 404, "ResourceNotFound")


async def test_list_filters_paging_and_reconcile(env: Env) -> None:
    ids = [await env.task_id(text(f"clip {i}")) for i in range(4)]
    ids.append(await env.task_id(text("clip 4"), model=PRO15))
    slow = await env.task_id(text("slow [sim:queue=5]"))
    await env.wait(ids[-1])

    page1 = (await env.http.get(TASKS, params={"page_num": 1, "page_size": 2}, headers=AUTH)).json()
    assert page1["total"] == 6 and [t["id"] for t in page1["items"]] == [slow, ids[4]]  # newest first
    page3 = (await env.http.get(TASKS, params={"page_num": 3, "page_size": 2}, headers=AUTH)).json()
    assert [t["id"] for t in page3["items"]] == ids[1::-1]
    empty = (await env.http.get(TASKS, params={"page_num": 4, "page_size": 2}, headers=AUTH)).json()
    assert empty == {"total": 6, "items": []}

    queued = (await env.http.get(TASKS, params={"filter.status": "queued"}, headers=AUTH)).json()
    assert [t["id"] for t in queued["items"]] == [slow]
    chosen = (await env.http.get(f"{TASKS}?filter.task_ids={ids[0]}&filter.task_ids={ids[2]}", headers=AUTH)).json()
    assert {t["id"] for t in chosen["items"]} == {ids[0], ids[2]} and chosen["total"] == 2
    by_model = (await env.http.get(TASKS, params={"filter.model": PRO15}, headers=AUTH)).json()
    assert [t["id"] for t in by_model["items"]] == [ids[4]]
    assert by_model["items"][0]["status"] == "succeeded" and "video_url" in by_model["items"][0]["content"]

    ark_error(await env.http.get(TASKS, params={"page_size": 0}, headers=AUTH), 400, "InvalidParameter")
    ark_error(await env.http.get(TASKS, params={"page_size": 501}, headers=AUTH), 400, "InvalidParameter")
    env.sim.config.extra["retention_seconds"] = 0  # only the last 7 days are kept
    assert (await env.http.get(TASKS, headers=AUTH)).json() == {"total": 0, "items": []}
    ark_error(await env.get(ids[0]), 404, "ResourceNotFound")
    env.sim.config.extra["retention_seconds"] = 7 * 86400

    # A create whose answer was lost is found again by model and echoed parameters.
    await env.http.post("/_sim/faults", json=[{"kind": "504", "route": "create", "after_effect": True}])
    r = await env.create(text("a lost kitten --ratio 4:3 --duration 10"))
    assert r.status_code == 504
    found = (await env.http.get(TASKS, params={"filter.model": PRO, "page_size": 1}, headers=AUTH)).json()["items"]
    assert len(found) == 1 and (found[0]["ratio"], found[0]["duration"]) == ("4:3", 10)
    assert env.sim.stats.creations == 7



async def test_video_urls_expire_while_the_task_stays(env: Env) -> None:
    env.sim.config.output_ttl_seconds = 0.4
    done = await env.wait(await env.task_id())
    url = done["content"]["video_url"]
    assert (await env.http.get(url)).status_code == 200
    forged = url.replace("X-Tos-Expires=1", "X-Tos-Expires=86400")
    r = await env.http.get(forged)
    assert r.status_code == 403 and b"SignatureDoesNotMatch" in r.content
    await asyncio.sleep(0.45)
    r = await env.http.get(url)
    assert r.status_code == 403 and b"<Code>AccessDenied</Code>" in r.content
    again = (await env.get(done["id"])).json()
    assert again["status"] == "succeeded" and again["content"]["video_url"] == url  # queryable, URL dead

    env.sim.config.output_ttl_seconds = 86400
    fresh = (await env.wait(await env.task_id()))["content"]["video_url"]
    await env.http.post("/_sim/expire-files")
    assert (await env.http.get(fresh)).status_code == 403


async def test_flex_tier_task_expires_in_the_queue(env: Env) -> None:
    task_id = await env.task_id(text("x [sim:queue=1.3]"), service_tier="flex", execution_expires_after=1)
    first = (await env.get(task_id)).json()
    assert first["status"] == "queued" and first["service_tier"] == "flex" and first["execution_expires_after"] == 1
    assert (await env.wait(task_id))["status"] == "expired"
    ark_error(await env.create(service_tier="batch"), 400, "InvalidParameter")


async def test_callbacks_on_each_status_change(env: Env) -> None:
    rx = Receiver()
    async with serving(rx.app) as rx_base:
        url = f"{rx_base}/hooks/ark/job_1?t=secret"
        task_id = await env.task_id(callback_url=url)
        await rx.wait_for(3)
        assert [b["status"] for b in rx.bodies] == ["queued", "running", "succeeded"]
        assert rx.bodies[-1] == (await env.get(task_id)).json()  # identical to GET

        rx.bodies.clear()
        await env.task_id(text("x [sim:output_sensitive]"), callback_url=url)
        await rx.wait_for(3)
        assert [b["status"] for b in rx.bodies] == ["queued", "running", "failed"]
        assert rx.bodies[-1]["error"]["code"] == "OutputVideoSensitiveContentDetected"

        rx.bodies.clear()
        cancelled = await env.task_id(text("x [sim:queue=1]"), callback_url=url)
        await rx.wait_for(1)
        await env.http.delete(f"{TASKS}/{cancelled}", headers=AUTH)
        await asyncio.sleep(0.3)
        assert [b["status"] for b in rx.bodies] == ["queued"]  # cancelled is not sent by default

        rx.bodies.clear()
        env.sim.config.extra["callback_on_cancel"] = True
        cancelled = await env.task_id(text("x [sim:queue=1]"), callback_url=url)
        await rx.wait_for(1)
        await env.http.delete(f"{TASKS}/{cancelled}", headers=AUTH)
        await rx.wait_for(2)
        assert [b["status"] for b in rx.bodies] == ["queued", "cancelled"]


async def test_callback_retries_on_errors_and_slow_answers(env: Env) -> None:
    env.sim.config.extra.update(callback_retry_delay=0.05, callback_timeout=0.15)
    rx = Receiver(statuses=(500, 500, 500, 500))
    async with serving(rx.app) as rx_base:
        task_id = await env.task_id(text("x [sim:run=0.6]"), callback_url=f"{rx_base}/hooks/ark/job_2")
        await rx.wait_for(6)
        assert [b["status"] for b in rx.bodies] == ["queued"] * 4 + ["running", "succeeded"]
        assert [e["attempt"] for e in env.sim.callback_log if e["id"] == task_id] == [1, 2, 3, 4, 1, 1]

    slow = Receiver(delay=0.3)
    async with serving(slow.app) as rx_base:
        task_id = await env.task_id(text("x [sim:queue=3]"), callback_url=f"{rx_base}/hooks/ark/job_3")
        await slow.wait_for(4, within=3)
        await asyncio.sleep(0.15)  # the last attempt's timeout
        attempts = [e for e in env.sim.callback_log if e["id"] == task_id]
        assert len(attempts) == 4 and all(e.get("error") == "ReadTimeout" for e in attempts)
        await env.http.delete(f"{TASKS}/{task_id}", headers=AUTH)


# -- images (synchronous) -----------------------------------------------------------


async def test_image_generation_url_b64_and_expiry(env: Env) -> None:
    r = await env.images(response_format="url", watermark=False)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == SEEDREAM and isinstance(body["created"], int)
    assert len(body["data"]) == 1 and body["data"][0]["size"] == "2048x2048"
    assert body["usage"] == {"generated_images": 1, "output_tokens": 16384, "total_tokens": 16384}
    url = body["data"][0]["url"]
    assert parse_qs(urlsplit(url).query)["X-Tos-Expires"] == ["86400"]
    got = await env.http.get(url)
    assert got.status_code == 200 and got.content[:4] == b"\x89PNG"

    b64 = (await env.images(response_format="b64_json", size="1280x720")).json()
    item = b64["data"][0]
    assert "url" not in item and item["size"] == "1280x720"
    assert base64.b64decode(item["b64_json"])[:4] == b"\x89PNG"
    assert env.sim.stats.creations == 2 and env.sim.billed_images == 2

    env.sim.config.extra["image_timestamp_field"] = "created_at"
    assert "created_at" in (await env.images()).json()

    env.sim.config.output_ttl_seconds = 0.3
    url = (await env.images()).json()["data"][0]["url"]
    assert (await env.http.get(url)).status_code == 200
    r = await env.http.get(url.replace("X-Tos-Signature=", "X-Tos-Signature=0"))
    assert r.status_code == 403 and b"SignatureDoesNotMatch" in r.content
    await asyncio.sleep(0.35)
    assert (await env.http.get(url)).status_code == 403


async def test_group_output_with_partial_failures_inside_200(env: Env) -> None:
    r = await env.images(prompt="a comic strip [sim:images=3] [sim:partial=1]", sequential_image_generation="auto",
                         sequential_image_generation_options={"max_images": 5},
                         image=["https://example.com/a.png", "https://example.com/b.png"])
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 3
    assert "url" in data[0] and "url" in data[2]
    assert data[1] == {"error": {"code": "OutputImageSensitiveContentDetected", "message": data[1]["error"]["message"]}}
    assert r.json()["usage"]["generated_images"] == 2 and env.sim.billed_images == 2

    capped = (await env.images(prompt="many [sim:images=9]", sequential_image_generation="auto",
                               sequential_image_generation_options={"max_images": 2})).json()
    assert len(capped["data"]) == 2
    default = (await env.images(prompt="last fails [sim:partial]", sequential_image_generation="auto")).json()
    assert len(default["data"]) == 4 and "error" in default["data"][-1]
    all_failed = await env.images(prompt="none [sim:images=2] [sim:partial=0,1]", sequential_image_generation="auto")
    assert all_failed.status_code == 200 and all("error" in d for d in all_failed.json()["data"])
    assert all_failed.json()["usage"]["generated_images"] == 0
    assert env.sim.stats.creations == 3  # the all-failed request billed nothing


async def test_image_errors(env: Env) -> None:
    env.sim.config.run_seconds = 0.01
    ark_error(await env.images(prompt="x [sim:sensitive]"), 400, "InputTextSensitiveContentDetected")
    ark_error(await env.images(prompt="x [sim:output_sensitive]"), 400, "OutputImageSensitiveContentDetected")
    ark_error(await env.images(prompt="x [sim:fail]"), 500, "InternalServiceError")
    ark_error(await env.images(prompt=""), 400, "MissingParameter")
    invalid: list[dict[str, Any]] = [
        {"size": "3K"},
        {"size": "100x100"},
        {"size": "8200x500"},
        {"response_format": "png"},
        {"image": ["ftp://example.com/a.png"]},
        {"image": [f"https://example.com/{i}.png" for i in range(15)]},
        {"sequential_image_generation": "always"},
        {"sequential_image_generation": "auto", "sequential_image_generation_options": {"max_images": 16}},
        {"sequential_image_generation": "auto", "image": [FIRST] * 14,
         "sequential_image_generation_options": {"max_images": 2}},
        {"model": "doubao-seedream-3-0-t2i-250415", "image": FIRST, "size": "1024x1024"},
        {"model": "doubao-seedream-3-0-t2i-250415", "size": "1024x1024", "sequential_image_generation": "auto"},
        {"model": "doubao-seededit-3-0-i2i-250628", "size": "adaptive"},
        {"watermark": "no"},
        {"stream": True},
    ]
    for body in invalid:
        ark_error(await env.images(**body), 400, "InvalidParameter")
    ok = await env.images(model="doubao-seededit-3-0-i2i-250628", image=FIRST, size="adaptive")
    assert ok.status_code == 200, ok.text
    ark_error(await env.http.post(IMAGES, json={"model": SEEDREAM, "prompt": "x"}), 401, "AuthenticationError")
    assert env.sim.stats.creations == 1


async def test_image_after_effect_fault_shows_one_billed_generation(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[{"kind": "504", "route": "images", "after_effect": True},
                                              {"kind": "429", "route": "images"}])
    throttled = await env.images(prompt="a lighthouse")
    ark_error(throttled, 429, "RateLimitExceeded.EndpointRPMExceeded")
    assert env.sim.stats.creations == 0  # a 429 made nothing
    lost = await env.images(prompt="a lighthouse")
    assert lost.status_code == 504
    assert env.sim.stats.creations == 1 and env.sim.billed_images == 1  # generated and billed all the same
    assert (await env.images(prompt="a lighthouse")).status_code == 200
    stats = (await env.http.get("/_sim/stats")).json()
    assert stats["creations"] == 2 and len(stats["duplicate_identities"]) == 1  # a blind retry pays twice
