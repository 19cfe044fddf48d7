"""The BFL FLUX simulator, driven over real HTTP as BFL's API reference tells a client to."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from providers.sandbox.base import SimConfig
from providers.sandbox.bfl import BflSimulator
from providers.sandbox.media import png
from providers.sandbox.serve import serving
from providers.sandbox.stability import image_size, sniff_image

KEY = "bfl_test_key"
OTHER = "3f2a5c4e-0000-4000-8000-000000000000"  # UUID-shaped keys exist too
THIRD = "bfl_third_key"
AUTH = {"x-key": KEY}
TERMINAL = ("Ready", "Error", "Request Moderated", "Content Moderated", "Task not found")


@dataclass
class Env:
    sim: BflSimulator
    base: str
    http: httpx.AsyncClient

    async def submit(self, model: str, body: dict[str, Any], key: str = KEY) -> httpx.Response:
        return await self.http.post(f"/v1/{model}", json=body, headers={"x-key": key})

    async def poll(self, url: str, within: float = 5.0) -> dict[str, Any]:
        for _ in range(int(within / 0.03)):
            r = await self.http.get(url, headers=AUTH)
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            if body["status"] in TERMINAL:
                return body
            await asyncio.sleep(0.03)
        raise AssertionError("task never finished")


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = BflSimulator(SimConfig(queue_seconds=0.05, run_seconds=0.15, output_ttl_seconds=600,
                                 api_keys=[KEY, OTHER, THIRD]))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        yield Env(sim, base, http)


def b64_png(seed: str, w: int, h: int) -> str:
    return base64.b64encode(png(seed, w, h)).decode()


async def test_submit_poll_ready_real_jpeg(env: Env) -> None:
    r = await env.submit("flux-2-pro", {"prompt": "Studio photo of a ceramic mug", "width": 1024, "height": 768,
                                        "seed": 42, "safety_tolerance": 2})
    assert r.status_code == 200, r.text
    sub = r.json()
    assert set(sub) == {"id", "polling_url", "cost", "input_mp", "output_mp"}
    assert sub["cost"] == 3.0 and sub["input_mp"] == 0.0 and sub["output_mp"] == 0.79
    # The polling URL is on another path than the submit host's /v1: poll it as given.
    assert sub["polling_url"] == f"{env.base}/api.eu1/v1/get_result?id={sub['id']}"
    statuses = []
    while True:
        body = (await env.http.get(sub["polling_url"], headers=AUTH)).json()
        assert set(body) == {"id", "status", "result", "progress", "details", "preview"}
        statuses.append(body["status"])
        if body["status"] == "Pending" and body["progress"] is not None:
            assert 0 <= body["progress"] < 1
        if body["status"] != "Pending":
            break
        await asyncio.sleep(0.02)
    assert statuses[0] == "Pending" and statuses[-1] == "Ready"
    result = body["result"]
    assert result["prompt"] == "Studio photo of a ceramic mug" and result["seed"] == 42
    sample = await env.http.get(result["sample"])  # pre-signed: no key
    assert sample.status_code == 200 and sample.headers["content-type"] == "image/jpeg"
    assert sniff_image(sample.content) == "jpeg" and image_size(sample.content) == (64, 48)
    same = await env.http.get(f"/v1/get_result?id={sub['id']}", headers=AUTH)  # the global host knows it too
    assert same.json()["result"]["sample"] == result["sample"]
    assert env.sim.stats.creations == 1
    assert (await env.http.get("/v1/credits", headers=AUTH)).json()["credits"] == 1e6 - 3.0


async def test_model_routes_and_their_inputs(env: Env) -> None:
    ok: list[tuple[str, dict[str, Any], tuple[int, int] | None]] = [
        ("flux-pro-1.1", {"prompt": "x", "width": 1440, "height": 256, "output_format": "png"}, (90, 16)),
        ("flux-dev", {"prompt": "x"}, (64, 48)),
        ("flux-pro-1.1-ultra", {"prompt": "x", "aspect_ratio": "21:9", "raw": True, "output_format": "webp"}, None),
        ("flux-kontext-pro", {"prompt": "add a hat", "input_image": b64_png("in", 64, 64)}, None),
        ("flux-kontext-max", {"prompt": "add a hat", "input_image": "https://example.com/in.png"}, None),
        ("flux-2-max", {"prompt": "x", "input_image": b64_png("a", 100, 100),
                        "input_image_8": "https://example.com/8.png"}, None),
        ("flux-2-flex", {"prompt": "x", "steps": 30, "guidance": 4.5}, None),
        ("flux-2-klein-4b", {"prompt": "x"}, None),
        ("flux-pro-1.0-fill", {"image": b64_png("f", 64, 64), "mask": b64_png("m", 64, 64), "prompt": "x"}, None),
        ("flux-pro-1.0-expand", {"image": b64_png("e", 64, 64), "top": 256}, None),
        ("flux-pro-1.1-ultra-finetuned", {"prompt": "x", "finetune_id": "ft-1"}, None),
    ]
    subs = []
    for model, body, _ in ok:
        r = await env.submit(model, body)
        assert r.status_code == 200, (model, r.text)
        subs.append(r.json())
    assert subs[3]["input_mp"] == 0.0 and subs[5]["input_mp"] == 1.01  # base64 read, URL counted as 1 MP
    for (model, body, size), sub in zip(ok, subs, strict=True):
        done = await env.poll(sub["polling_url"])
        assert done["status"] == "Ready", model
        data = (await env.http.get(done["result"]["sample"])).content
        assert sniff_image(data) == (body.get("output_format") or "jpeg")
        if size is not None:
            assert image_size(data) == size
    ultra = image_size((await env.http.get((await env.poll(subs[2]["polling_url"]))["result"]["sample"])).content)
    assert ultra is not None and ultra[0] / ultra[1] == pytest.approx(21 / 9, rel=0.05)
    unknown = await env.submit("flux-9-ultra", {"prompt": "x"})
    assert unknown.status_code == 404 and unknown.json() == {"detail": "Not Found"}


async def test_malformed_input_gets_fastapi_422(env: Env) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("flux-pro-1.1", {"prompt": "x", "width": 1000}, "width"),  # not a multiple of 32
        ("flux-pro-1.1", {"prompt": "x", "height": 2048}, "height"),
        ("flux-pro-1.1", {"prompt": "x", "safety_tolerance": 7}, "safety_tolerance"),
        ("flux-2-pro", {"prompt": "x", "safety_tolerance": 6}, "safety_tolerance"),
        ("flux-2-pro", {"prompt": "x", "width": 1000}, "width"),  # multiple of 16
        ("flux-2-pro", {"prompt": "x", "width": 4096, "height": 4096}, "width"),  # over 4 MP
        ("flux-2-pro", {"width": 1024}, "prompt"),
        ("flux-2-pro", {"prompt": "x", "output_format": "gif"}, "output_format"),
        ("flux-2-pro", {"prompt": "x", "input_image": "not base64!"}, "input_image"),
        ("flux-2-flex", {"prompt": "x", "steps": 51}, "steps"),
        ("flux-pro-1.1-ultra", {"prompt": "x", "aspect_ratio": "4:1"}, "aspect_ratio"),
        ("flux-kontext-pro", {}, "prompt"),
        ("flux-pro-1.0-fill", {"prompt": "x"}, "image"),
        ("flux-pro-1.1-ultra-finetuned", {"prompt": "x"}, "finetune_id"),
        ("flux-2-pro", {"prompt": "x", "webhook_url": "not a url"}, "webhook_url"),
        ("flux-2-pro", {"prompt": "x", "seed": "42"}, "seed"),
    ]
    for model, body, name in cases:
        r = await env.submit(model, body)
        assert r.status_code == 422, (model, body, r.text)
        (item,) = r.json()["detail"]
        assert item["loc"] == ["body", name] and item["msg"] and item["type"], (model, item)
    bad_json = await env.http.post("/v1/flux-2-pro", content=b"{", headers=AUTH | {"content-type": "application/json"})
    assert bad_json.status_code == 422 and bad_json.json()["detail"][0]["type"] == "json_invalid"
    assert (await env.http.post("/v1/flux-2-pro", json=[1], headers=AUTH)).status_code == 422
    no_key = await env.http.post("/v1/flux-2-pro", json={"prompt": "x"})
    assert no_key.status_code == 403 and no_key.json() == {"detail": "Not authenticated"}
    assert (await env.submit("flux-2-pro", {"prompt": "x"}, key="wrong")).status_code == 401
    no_id = await env.http.get("/v1/get_result", headers=AUTH)
    assert no_id.status_code == 422 and no_id.json()["detail"][0]["loc"] == ["query", "id"]
    assert env.sim.stats.creations == 0


async def test_moderation_error_and_odd_statuses(env: Env) -> None:
    req = (await env.submit("flux-2-pro", {"prompt": "x [sim:request_moderated]"})).json()
    assert req["cost"] == 3.0  # the submit succeeds and reports a cost even though it will be refused
    out = (await env.submit("flux-pro-1.1", {"prompt": "x [sim:content_moderated]"})).json()
    err = (await env.submit("flux-dev", {"prompt": "x [sim:fail]"})).json()
    odd = (await env.submit("flux-2-max", {"prompt": "x [sim:status=Generating] [sim:run=0.3]"})).json()
    moderated = await env.poll(req["polling_url"])
    assert moderated["status"] == "Request Moderated" and moderated["result"] is None
    assert moderated["details"] == {"Moderation Reasons": ["Derivative Works Filter"]}
    assert (await env.poll(out["polling_url"]))["status"] == "Content Moderated"
    assert (await env.poll(err["polling_url"]))["status"] == "Error"

    seen = set()
    for _ in range(40):
        status = (await env.http.get(odd["polling_url"], headers=AUTH)).json()["status"]
        seen.add(status)
        if status == "Ready":
            break
        await asyncio.sleep(0.03)
    assert seen >= {"Generating", "Ready"}  # an unknown status string, then done

    gone = await env.http.get("/v1/get_result?id=00000000-0000-0000-0000-000000000000", headers=AUTH)
    assert gone.status_code == 200 and gone.json()["status"] == "Task not found"
    env.sim.config.extra["not_found_status_code"] = 404
    assert (await env.http.get("/v1/get_result?id=nope", headers=AUTH)).status_code == 404
    env.sim.config.extra["task_ttl_seconds"] = 0
    assert (await env.http.get(req["polling_url"], headers=AUTH)).status_code == 404


async def test_progress_scale_knob(env: Env) -> None:
    env.sim.config.extra["progress_scale"] = 100
    sub = (await env.submit("flux-2-pro", {"prompt": "x [sim:queue=0] [sim:run=3]"})).json()
    await asyncio.sleep(0.3)
    progress = (await env.http.get(sub["polling_url"], headers=AUTH)).json()["progress"]
    assert 5 <= progress < 100  # percent, not a 0-1 fraction


async def test_sample_url_expires(env: Env) -> None:
    assert BflSimulator().config.output_ttl_seconds == 600  # the documented 10 minutes
    env.sim.config.output_ttl_seconds = 0.6
    sub = (await env.submit("flux-2-pro", {"prompt": "x"})).json()
    url = (await env.poll(sub["polling_url"]))["result"]["sample"]
    assert (await env.http.get(url)).status_code == 200
    await asyncio.sleep(0.65)
    assert (await env.http.get(url)).status_code == 404  # 10 minutes after Ready, in real life


async def test_polling_url_on_another_host(env: Env) -> None:
    def may_send_key(url: str, base: str) -> bool:
        """A client's allow-list: https under bfl.ai, or the configured base URL's own host."""
        host = urlsplit(url).hostname or ""
        return host == urlsplit(base).hostname or (urlsplit(url).scheme == "https" and host.endswith(".bfl.ai"))

    env.sim.config.extra["polling_base_url"] = "https://gateway.eu1.bfl.ai"
    sub = (await env.submit("flux-2-pro", {"prompt": "x"})).json()
    assert sub["polling_url"] == f"https://gateway.eu1.bfl.ai/api.eu1/v1/get_result?id={sub['id']}"
    assert may_send_key(sub["polling_url"], env.base)
    env.sim.config.extra["polling_base_url"] = "https://bfl.ai.attacker.example"
    hostile = (await env.submit("flux-2-pro", {"prompt": "x"})).json()
    assert not may_send_key(hostile["polling_url"], env.base)

    env.sim.config.extra |= {"polling_base_url": None, "polling_path_prefix": "/api.us1", "strict_region": True}
    regional = (await env.submit("flux-2-pro", {"prompt": "x"})).json()
    assert urlsplit(regional["polling_url"]).path == "/api.us1/v1/get_result"
    assert (await env.poll(regional["polling_url"]))["status"] == "Ready"
    elsewhere = await env.http.get(f"/api.eu1/v1/get_result?id={regional['id']}", headers=AUTH)
    assert elsewhere.json()["status"] == "Task not found"  # a rebuilt URL on another region misses the task


async def test_active_task_cap(env: Env) -> None:
    slow = {"prompt": "x [sim:queue=0] [sim:run=60]"}  # still active when the test ends
    for _ in range(24):
        assert (await env.submit("flux-2-pro", slow)).status_code == 200
    capped = await env.submit("flux-dev", {"prompt": "x"})
    assert capped.status_code == 429 and "24" in capped.json()["detail"]
    assert "retry-after" not in capped.headers
    assert (await env.submit("flux-dev", {"prompt": "x"}, key=OTHER)).status_code == 200  # per key
    env.sim.config.extra["retry_after"] = 5
    assert (await env.submit("flux-dev", {"prompt": "x"})).headers["retry-after"] == "5"
    for _ in range(6):
        assert (await env.submit("flux-kontext-max", slow, key=OTHER)).status_code == 200
    kontext = await env.submit("flux-kontext-max", slow, key=OTHER)
    assert kontext.status_code == 429 and "6" in kontext.json()["detail"]
    assert env.sim.stats.creations == 24 + 1 + 6

    env.sim.config.extra["active_task_limit"] = 2
    short = {"prompt": "x [sim:queue=0] [sim:run=0.3]"}
    for _ in range(2):
        assert (await env.submit("flux-dev", short, key=THIRD)).status_code == 200
    assert (await env.submit("flux-dev", short, key=THIRD)).status_code == 429
    await asyncio.sleep(0.35)  # finished tasks free their slots, polled or not
    assert (await env.submit("flux-dev", short, key=THIRD)).status_code == 200


async def test_credits_and_injected_faults(env: Env) -> None:
    env.sim.config.extra["credits"] = 5.0
    assert (await env.submit("flux-2-pro", {"prompt": "x"})).status_code == 200
    broke = await env.submit("flux-2-pro", {"prompt": "x"})
    assert broke.status_code == 402 and "credits" in broke.json()["detail"]
    env.sim.config.extra["credits"] = 1e6
    await env.http.post("/_sim/faults", json=[{"kind": "429", "route": "submit"},
                                              {"kind": "502", "route": "submit", "after_effect": True}])
    assert (await env.submit("flux-2-pro", {"prompt": "x"})).status_code == 429
    assert env.sim.stats.creations == 1
    assert (await env.submit("flux-2-pro", {"prompt": "costly"})).status_code == 502
    assert env.sim.stats.creations == 2 and env.sim.credits_used == 6.0  # created and charged, answer lost


# -- webhooks --------------------------------------------------------------------------------


@dataclass
class Receiver:
    url: str
    hits: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    fail_first: int = 0


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver(url="")

    async def hook(request: Request) -> Response:
        rec.hits.append((dict(request.headers), await request.body()))
        if rec.fail_first > 0:
            rec.fail_first -= 1
            return JSONResponse({"error": "later"}, status_code=503)
        return JSONResponse({"ok": True})

    async with serving(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as base:
        rec.url = f"{base}/hook"
        yield rec


async def wait_hits(rec: Receiver, n: int) -> None:
    for _ in range(100):
        if len(rec.hits) >= n:
            return
        await asyncio.sleep(0.03)
    raise AssertionError(f"got {len(rec.hits)} webhook(s), wanted {n}")


def verify(headers: dict[str, str], raw: bytes, secret: str) -> bool:
    """The X-BFL-Signature scheme: ``sha256=`` + hex HMAC-SHA256(secret, raw body)."""
    expected = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers.get("x-bfl-signature", ""), expected)


async def test_webhook_signed_with_the_job_secret(env: Env, receiver: Receiver) -> None:
    env.sim.config.extra["webhook_retry_delays"] = [0.05]
    receiver.fail_first = 1
    r = await env.submit("flux-2-pro", {"prompt": "a mug", "webhook_url": receiver.url,
                                        "webhook_secret": "s3cr3t"})
    sub = r.json()
    assert set(sub) == {"id", "status", "webhook_url", "cost", "input_mp", "output_mp"}  # no polling_url
    assert sub["status"] == "Pending" and sub["webhook_url"] == receiver.url
    await wait_hits(receiver, 2)  # the first delivery got a 503 and was retried
    headers, raw = receiver.hits[1]
    assert receiver.hits[0][1] == raw
    assert verify(headers, raw, "s3cr3t") and not verify(headers, raw, "other")
    body = json.loads(raw)
    assert body["id"] == sub["id"] and body["status"] == "Ready" and isinstance(body["timestamp"], int)
    # A webhook is only a hint: the poll answers the same result.
    polled = (await env.http.get(f"/v1/get_result?id={sub['id']}", headers=AUTH)).json()
    assert polled["result"] == body["result"]
    assert (await env.http.get(body["result"]["sample"])).status_code == 200


async def test_webhook_variants(env: Env, receiver: Receiver) -> None:
    await env.submit("flux-2-pro", {"prompt": "x [sim:content_moderated]", "webhook_url": receiver.url})
    await wait_hits(receiver, 1)
    headers, raw = receiver.hits[0]
    assert "x-bfl-signature" not in headers  # no secret, no signature
    assert json.loads(raw)["details"] == {"Moderation Reasons": ["NSFW"]}
    await env.submit("flux-2-pro", {"prompt": "x [sim:fail]", "webhook_url": receiver.url, "webhook_secret": "k"})
    await wait_hits(receiver, 2)
    failed = json.loads(receiver.hits[1][1])
    assert failed["status"] == "Error" and failed["error"] and failed["message"]
    env.sim.config.extra |= {"webhook_signature": False, "webhook_response_polling_url": True}
    sub = (await env.submit("flux-2-pro", {"prompt": "x", "webhook_url": receiver.url,
                                           "webhook_secret": "k"})).json()
    assert sub["polling_url"].endswith(f"/v1/get_result?id={sub['id']}")
    await wait_hits(receiver, 3)
    assert "x-bfl-signature" not in receiver.hits[2][0]
    env.sim.config.extra["strict_webhook_urls"] = True
    refused = await env.submit("flux-2-pro", {"prompt": "x", "webhook_url": receiver.url})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == ["body", "webhook_url"]
