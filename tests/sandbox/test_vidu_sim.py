"""The Vidu simulator, driven over HTTP as Vidu's docs say, with signed callbacks to a loopback receiver."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from providers.sandbox.base import SimConfig
from providers.sandbox.serve import serving
from providers.sandbox.vidu import ViduSimulator

TOKEN = "vda_sandbox_token_0123456789"
AUTH = {"Authorization": f"Token {TOKEN}"}
IMAGE = "https://example.com/rabbit.png"


def t2v(prompt: str = "A rabbit in a spacesuit waves at the camera", **kw: Any) -> dict[str, Any]:
    return {"model": "viduq1", "style": "general", "prompt": prompt, "duration": 5, "seed": 0,
            "aspect_ratio": "16:9", "resolution": "1080p", "movement_amplitude": "auto", "bgm": False,
            "payload": "atelier:job_123"} | kw


def expected_signature(token: str, method: str, path: str, query: dict[str, str], date: str, nonce: str) -> str:
    """Vidu's documented callback signature, recomputed from the reference (APISIX hmac-auth layout)."""
    canonical_query = "&".join(f"{k}={query[k]}" for k in sorted(query))
    signing = (method + "\n" + path + "\n" + canonical_query + "\n" + "vidu" + "\n" + date + "\n"
               + "Date:" + date + "\n" + "x-request-nonce:" + nonce + "\n")
    return base64.b64encode(hmac.new(token.encode(), signing.encode(), hashlib.sha256).digest()).decode()


@dataclass
class Env:
    sim: ViduSimulator
    http: httpx.AsyncClient

    async def create(self, body: dict[str, Any], endpoint: str = "text2video",
                     headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.post(f"/ent/v2/{endpoint}", json=body, headers=AUTH if headers is None else headers)

    async def task_id(self, body: dict[str, Any], endpoint: str = "text2video") -> str:
        r = await self.create(body, endpoint)
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "created"
        return str(r.json()["task_id"])

    async def get(self, task_id: str) -> dict[str, Any]:
        r = await self.http.get(f"/ent/v2/tasks/{task_id}/creations", headers=AUTH)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def wait(self, task_id: str, within: float = 5) -> dict[str, Any]:
        deadline = time.time() + within
        while time.time() < deadline:
            body = await self.get(task_id)
            if body["state"] in ("success", "failed"):
                return body
            await asyncio.sleep(0.03)
        raise AssertionError("task did not finish")


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = ViduSimulator(SimConfig(queue_seconds=0.2, run_seconds=0.2, api_keys=[TOKEN]))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        yield Env(sim, http)


async def test_text_to_video_success(env: Env) -> None:
    r = await env.create(t2v())
    assert r.status_code == 200, r.text
    created = r.json()
    assert re.fullmatch(r"\d{18}", created["task_id"]) and created["state"] == "created"
    assert created["payload"] == "atelier:job_123" and created["style"] == "general" and created["images"] == []
    assert created["seed"] > 0 and created["credits"] > 0 and created["created_at"].endswith("Z")
    assert {created[k] for k in ("model", "duration", "resolution")} == {"viduq1", 5, "1080p"}

    states: list[str] = []
    while not states or states[-1] not in ("success", "failed"):
        body = await env.get(created["task_id"])
        assert body["id"] == created["task_id"] and body["payload"] == "atelier:job_123"
        if not states or states[-1] != body["state"]:
            states.append(body["state"])
        await asyncio.sleep(0.02)
    assert states == ["created", "queueing", "processing", "success"]
    assert body["err_code"] == "" and body["credits"] == created["credits"]
    (creation,) = body["creations"]
    assert re.fullmatch(r"\d{18}", creation["id"])
    video = await env.http.get(creation["url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4" and video.content[4:8] == b"ftyp"
    marked = await env.http.get(creation["watermarked_url"])
    assert marked.content[4:8] == b"ftyp" and marked.content != video.content
    assert (await env.http.get(creation["cover_url"])).content[:4] == b"\x89PNG"
    assert env.sim.stats.creations == 1


async def test_image_endpoints(env: Env) -> None:
    ok: list[tuple[str, dict[str, Any]]] = [("img2video", {"model": "viduq2", "images": [IMAGE], "prompt": "waves"}),
          ("start-end2video", {"model": "vidu2.0", "images": [IMAGE, "data:image/png;base64,iVBORw0KGgo="],
                               "duration": 4}),
          ("reference2video", {"model": "viduq1", "images": [IMAGE] * 3, "prompt": "the same rabbit"})]
    ids = []
    for endpoint, body in ok:
        r = await env.create(body, endpoint)
        assert r.status_code == 200, (endpoint, r.text)
        assert "style" not in r.json() and r.json()["images"] == body["images"]
        ids.append(r.json()["task_id"])
    done = await asyncio.gather(*(env.wait(i) for i in ids))
    assert [d["state"] for d in done] == ["success"] * 3


async def test_validation_errors(env: Env) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("text2video", t2v(prompt=""), "FieldLacking"),
        ("text2video", t2v(images=[IMAGE]), "FieldUnwanted"),
        ("img2video", {"model": "viduq1"}, "FieldLacking"),
        ("start-end2video", {"model": "viduq1", "images": [IMAGE] * 3}, "FieldItemCountOutOfRange"),
        ("reference2video", {"model": "viduq1", "prompt": "x", "images": [IMAGE] * 8}, "FieldItemCountOutOfRange"),
        ("reference2video", {"model": "viduq1", "images": [IMAGE]}, "FieldLacking"),
        ("img2video", {"model": "viduq1", "images": ["ftp://example.com/a.png"]}, "ImageFormatInvalid"),
        ("text2video", t2v(model="vidu9"), "ModelUnavailable"),
        ("text2video", t2v(duration=8), "FieldInvalid"),  # viduq1 does 5 s
        ("text2video", t2v(resolution="4k"), "FieldInvalid"),
        ("text2video", t2v(prompt="x" * 5001), "FieldInvalid"),
        ("text2video", t2v(callback_url="not a url"), "FieldInvalid"),
    ]
    for endpoint, body, reason in cases:
        r = await env.create(body, endpoint)
        assert r.status_code == 400, (body, r.text)
        err = r.json()
        assert err["code"] == 400 and err["reason"] == reason and err["message"], (body, err)
        assert err["metadata"]["trace_id"]
    assert env.sim.stats.creations == 0


async def test_token_scheme(env: Env) -> None:
    r = await env.create(t2v(), headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 401 and r.json()["reason"] == "Unauthorized" and r.json()["code"] == 401
    r = await env.create(t2v(), headers={"Authorization": "Token wrong"})
    assert r.status_code == 401
    r = await env.http.get("/ent/v2/tasks/1/creations")
    assert r.status_code == 401


async def test_failures_and_content_refusals(env: Env) -> None:
    failed = await env.wait(await env.task_id(t2v("x [sim:fail]")))
    assert failed["state"] == "failed" and failed["err_code"] == "InternalServiceFailure" and failed["creations"] == []
    filtered = await env.wait(await env.task_id(t2v("x [sim:filtered]")))
    assert filtered["state"] == "failed" and filtered["err_code"] == "CreationPolicyViolation"
    r = await env.create(t2v("x [sim:blocked]"))
    assert r.status_code == 400 and r.json()["reason"] == "TaskPromptPolicyViolation"
    assert env.sim.stats.creations == 2
    missing = await env.http.get("/ent/v2/tasks/800000000000000000/creations", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["reason"] == "TaskNotFound"


async def test_cancel(env: Env) -> None:
    queued = await env.task_id(t2v("x [sim:queue=3]"))
    r = await env.http.post(f"/ent/v2/tasks/{queued}/cancel", json={"id": queued}, headers=AUTH)
    assert r.status_code == 200 and r.json() == {}
    cancelled = await env.get(queued)
    assert cancelled["state"] == "failed" and cancelled["err_code"] == "UserCancelled"

    running = await env.task_id(t2v("x [sim:queue=0.05] [sim:run=3]"))
    await asyncio.sleep(0.1)
    assert (await env.get(running))["state"] == "processing"
    r = await env.http.post(f"/ent/v2/tasks/{running}/cancel", json={"id": running}, headers=AUTH)
    assert r.status_code == 400
    assert r.json()["reason"] == "BadRequest" and r.json()["message"] == "task state is scheduled, can not cancel"
    r = await env.http.post(f"/ent/v2/tasks/{queued}/cancel", json={"id": running}, headers=AUTH)
    assert r.status_code == 400
    r = await env.http.post("/ent/v2/tasks/800000000000000000/cancel", json={}, headers=AUTH)
    assert r.status_code == 404 and r.json()["reason"] == "TaskNotFound"


async def test_429_then_success_with_one_creation(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[{"kind": "429", "route": "create", "retry_after": 2}])
    r = await env.create(t2v())
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert r.json()["code"] == 429 and r.json()["reason"] == "TooManyRequests"
    assert (await env.create(t2v())).status_code == 200
    assert env.sim.stats.creations == 1
    env.sim.config.extra["max_concurrent"] = 1
    r = await env.create(t2v())
    assert r.status_code == 429 and r.json()["reason"] == "QuotaExceeded"
    env.sim.config.extra.update(max_concurrent=None, credit_balance=env.sim.credits_used)
    r = await env.create(t2v())
    assert r.status_code == 400 and r.json()["reason"] == "CreditInsufficient"


async def test_urls_expire_and_are_fresh_on_each_get(env: Env) -> None:
    env.sim.config.output_ttl_seconds = 0.4
    task_id = await env.task_id(t2v())
    url = (await env.wait(task_id))["creations"][0]["url"]
    assert (await env.http.get(url)).status_code == 200
    assert (await env.http.get(re.sub(r"expires=\d+", "expires=9999999999", url))).status_code == 403
    await asyncio.sleep(0.5)
    assert (await env.http.get(url)).status_code == 403
    fresh = (await env.get(task_id))["creations"][0]["url"]
    assert (await env.http.get(fresh)).status_code == 200

    env.sim.config.output_ttl_seconds = 3600
    again = (await env.get(task_id))["creations"][0]["url"]
    await env.http.post("/_sim/expire-files")
    assert (await env.http.get(again)).status_code == 403
    env.sim.config.extra["fresh_urls"] = False
    stable = (await env.get(task_id))["creations"][0]["url"]
    assert (await env.get(task_id))["creations"][0]["url"] == stable


async def test_off_peak_waits_longer(env: Env) -> None:
    env.sim.config.extra["off_peak_queue_seconds"] = 0.5
    task_id = await env.task_id(t2v(off_peak=True))
    await asyncio.sleep(0.4)
    body = await env.get(task_id)
    assert body["state"] == "queueing" and body["off_peak"] is True


@dataclass
class Receiver:
    fail_terminal: int = 0
    calls: list[dict[str, Any]] = field(default_factory=list)
    answered: Counter[str] = field(default_factory=Counter)

    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.json()
            self.calls.append({"path": request.url.path, "query": dict(request.query_params),
                               "headers": dict(request.headers), "body": body})
            if body["state"] in ("success", "failed") and self.answered[body["state"]] < self.fail_terminal:
                self.answered[body["state"]] += 1
                return JSONResponse({"error": "try later"}, status_code=500)
            return JSONResponse({"ok": True})

        return Starlette(routes=[Route("/hooks/vidu", hook, methods=["POST"])])

    async def wait_for(self, n: int, within: float = 5) -> None:
        for _ in range(int(within / 0.02)):
            if len(self.calls) >= n:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # give unexpected extras a chance to arrive


def verified(call: dict[str, Any], token: str = TOKEN) -> bool:
    h = call["headers"]
    assert h["x-hmac-signed-headers"] == "Date;x-request-nonce" and h["x-hmac-algorithm"] == "hmac-sha256"
    assert h["x-hmac-access-key"] == "vidu" and h["x-request-nonce"]
    assert abs(parsedate_to_datetime(h["date"]).timestamp() - time.time()) < 60
    want = expected_signature(token, "POST", call["path"], call["query"], h["date"], h["x-request-nonce"])
    return hmac.compare_digest(want, h["x-hmac-signature"])


async def test_signed_callbacks_to_a_loopback_receiver(env: Env) -> None:
    rx = Receiver(fail_terminal=1)
    async with serving(rx.app()) as rx_base:
        url = f"{rx_base}/hooks/vidu?job=job_123&a=1"
        task_id = await env.task_id(t2v(callback_url=url))
        await rx.wait_for(3)
        assert [c["body"]["state"] for c in rx.calls] == ["processing", "success", "success"]  # one retry
        assert all(c["body"]["id"] == task_id and c["body"]["payload"] == "atelier:job_123" for c in rx.calls)
        assert rx.calls[-1]["body"]["creations"][0]["url"]
        assert all(verified(c) for c in rx.calls)
        assert len({c["headers"]["x-request-nonce"] for c in rx.calls}) == 3
        # A forger without the API token cannot produce the signature.
        assert not verified(rx.calls[0], token="someone-elses-token")
        forged = dict(rx.calls[0], query={"job": "job_999", "a": "1"})
        assert not verified(forged)

        rx.calls.clear()
        await env.task_id(t2v("x [sim:filtered]", callback_url=url))
        await rx.wait_for(3)
        assert [c["body"]["err_code"] for c in rx.calls] == ["", "CreationPolicyViolation", "CreationPolicyViolation"]

        rx.calls.clear()
        rx.answered.clear()
        queued = await env.task_id(t2v("x [sim:queue=3]", callback_url=url))
        assert (await env.http.post(f"/ent/v2/tasks/{queued}/cancel", json={"id": queued}, headers=AUTH)).json() == {}
        await rx.wait_for(2)
        assert [(c["body"]["state"], c["body"]["err_code"]) for c in rx.calls] == [("failed", "UserCancelled")] * 2


async def test_callback_signing_knobs(env: Env) -> None:
    rx = Receiver()
    env.sim.config.extra["callback_trailing_newline"] = False
    async with serving(rx.app()) as rx_base:
        await env.task_id(t2v(callback_url=f"{rx_base}/hooks/vidu"))
        await rx.wait_for(2)
    assert len(rx.calls) == 2 and not any(verified(c) for c in rx.calls)  # the other newline variant
    h = rx.calls[0]["headers"]
    signing = (f"POST\n/hooks/vidu\n\nvidu\n{h['date']}\nDate:{h['date']}\n"
               f"x-request-nonce:{h['x-request-nonce']}")
    digest = hmac.new(TOKEN.encode(), signing.encode(), hashlib.sha256).digest()
    assert base64.b64encode(digest).decode() == h["x-hmac-signature"]
    assert json.loads(json.dumps(rx.calls[-1]["body"]))["state"] == "success"
