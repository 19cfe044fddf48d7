"""The Ideogram simulator, driven over real HTTP as Ideogram's API reference tells a client to."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from providers.sandbox.base import SimConfig
from providers.sandbox.ideogram import IdeogramSimulator
from providers.sandbox.media import png
from providers.sandbox.serve import serving
from providers.sandbox.stability import image_size

KEY = "ideogram-test-key"
AUTH = {"Api-Key": KEY}
V3 = "/v1/ideogram-v3"
IMAGE = png("source", 256, 256)


def img(name: str = "image", data: bytes = IMAGE) -> tuple[str, tuple[str, bytes, str]]:
    return name, (f"{name}.png", data, "image/png")


@dataclass
class Env:
    sim: IdeogramSimulator
    http: httpx.AsyncClient

    async def post(self, path: str, fields: dict[str, str], files: list[Any] | None = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.post(path, data=fields, files=files or [("none", ("", b""))],
                                    headers=AUTH if headers is None else headers)

    async def wait(self, path: str) -> dict[str, Any]:
        for _ in range(100):
            body: dict[str, Any] = (await self.http.get(path, headers=AUTH)).json()
            if body["status"] != "pending":
                return body
            await asyncio.sleep(0.03)
        raise AssertionError("generation never finished")


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = IdeogramSimulator(SimConfig(queue_seconds=0.05, run_seconds=0.1, api_keys=[KEY]))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        yield Env(sim, http)


async def test_generate_multipart_real_images(env: Env) -> None:
    started = time.monotonic()
    r = await env.post(f"{V3}/generate", {"prompt": "a poster that says HELLO", "num_images": "2",
                                          "aspect_ratio": "16x9", "magic_prompt": "OFF", "seed": "7",
                                          "rendering_speed": "TURBO"})
    assert time.monotonic() - started >= 0.1  # synchronous: held while rendering
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"created", "data"}
    assert datetime.fromisoformat(body["created"]).tzinfo is not None  # an ISO string, not unix
    assert len(body["data"]) == 2
    shas = set()
    for item in body["data"]:
        assert item | {"url": None} == {"url": None, "prompt": "a poster that says HELLO", "resolution": "1312x736",
                                        "is_image_safe": True, "seed": 7, "style_type": "GENERAL"}
        query = parse_qs(urlsplit(item["url"]).query)
        assert "/api/images/ephemeral/" in item["url"] and int(query["exp"][0]) > time.time()
        assert len(query["sig"][0]) == 64
        got = await env.http.get(item["url"])  # no key: the URL is pre-signed
        assert got.status_code == 200 and got.headers["content-type"] == "image/png"
        assert image_size(got.content) == (1312 // 16, 736 // 16)
        shas.add(hashlib.sha256(got.content).hexdigest())
    assert len(shas) == 2
    assert env.sim.stats.creations == 1 and env.sim.images_billed == 2


async def test_generate_json_magic_prompt_and_options(env: Env) -> None:
    r = await env.http.post(f"{V3}/generate", headers=AUTH, json={
        "prompt": "a cat", "resolution": "1024x1024", "style_type": "REALISTIC", "negative_prompt": "dogs",
        "style_preset": "WATERCOLOR", "color_palette": {"name": "PASTEL"}})
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]
    assert item["prompt"] != "a cat" and item["prompt"].startswith("a cat")  # Magic Prompt (AUTO) rewrote it
    assert item["style_type"] == "REALISTIC" and item["resolution"] == "1024x1024"
    assert 0 <= item["seed"] <= 2147483647


async def test_each_operation_requires_its_inputs(env: Env) -> None:
    mask = png("mask", 256, 256)
    cases: list[tuple[str, dict[str, str], list[Any], str]] = [
        ("remix", {"prompt": "as a watercolour", "image_weight": "70", "aspect_ratio": "3x2"}, [img()], "1248x832"),
        ("reframe", {"resolution": "1536x640"}, [img()], "1536x640"),
        ("replace-background", {"prompt": "marble countertop"}, [img()], "256x256"),
        ("inpaint", {"prompt": "a red hat"}, [img(), img("mask", mask)], "256x256"),
        ("edit", {"prompt": "a red hat"}, [img(), img("mask", mask)], "256x256"),
    ]
    for op, fields, files, resolution in cases:
        r = await env.post(f"{V3}/{op}", fields, files)
        assert r.status_code == 200, (op, r.text)
        (item,) = r.json()["data"]
        assert item["resolution"] == resolution and item["is_image_safe"] is True
        assert image_size((await env.http.get(item["url"])).content) is not None
        no_image = await env.post(f"{V3}/{op}", fields)
        assert no_image.status_code == 400 and "image" in no_image.json()["error"], op
    assert env.sim.stats.creations == len(cases)

    missing = [("remix", {}, [img()], "prompt"), ("reframe", {}, [img()], "resolution"),
               ("replace-background", {}, [img()], "prompt"), ("inpaint", {"prompt": "x"}, [img()], "mask")]
    for op, fields, files, name in missing:
        r = await env.post(f"{V3}/{op}", fields, files)
        assert r.status_code == 400 and name in r.json()["error"], (op, r.text)
    small_mask = await env.post(f"{V3}/inpaint", {"prompt": "x"}, [img(), img("mask", png("m", 64, 64))])
    assert small_mask.status_code == 400 and "mask" in small_mask.json()["error"]
    as_text = await env.post(f"{V3}/remix", {"prompt": "x", "image": "https://example.com/a.png"})
    assert as_text.status_code == 400 and "file upload" in as_text.json()["error"]
    not_an_image = await env.post(f"{V3}/remix", {"prompt": "x"}, [("image", ("a.txt", b"text", "text/plain"))])
    assert not_an_image.status_code == 400 and "image" in not_an_image.json()["error"]
    as_json = await env.http.post(f"{V3}/remix", json={"prompt": "x"}, headers=AUTH)
    assert as_json.status_code == 400 and "multipart" in as_json.json()["error"]
    assert env.sim.stats.creations == len(cases)


async def test_malformed_options_are_refused(env: Env) -> None:
    bad = [
        ({"prompt": "x", "aspect_ratio": "1x1", "resolution": "1024x1024"}, "aspect_ratio"),
        ({"prompt": "x", "num_images": "9"}, "num_images"),
        ({"prompt": "x", "seed": "2147483648"}, "seed"),
        ({"prompt": "x", "resolution": "1000x1000"}, "resolution"),
        ({"prompt": "x", "aspect_ratio": "7x5"}, "aspect_ratio"),
        ({"prompt": "x", "rendering_speed": "FAST"}, "rendering_speed"),
        ({"prompt": "x", "magic_prompt": "MAYBE"}, "magic_prompt"),
        ({"prompt": "x", "style_type": "ANIME"}, "style_type"),
        ({"prompt": "x", "style_codes": "AB12CD34", "style_type": "GENERAL"}, "style_codes"),
        ({"prompt": "x", "style_codes": "nothex!!"}, "style_codes"),
        ({"prompt": "  "}, "prompt"),
    ]
    for fields, name in bad:
        r = await env.post(f"{V3}/generate", fields)
        assert r.status_code == 400 and name in r.json()["error"], (fields, r.text)
    refs = [("style_reference_images", ("s.png", b"not an image", "image/png"))]
    assert (await env.post(f"{V3}/generate", {"prompt": "x"}, refs)).status_code == 400
    assert (await env.http.post(f"{V3}/generate", content=b"{", headers=AUTH | {
        "content-type": "application/json"})).status_code == 400
    assert (await env.post(f"{V3}/generate", {"prompt": "x", "rendering_speed": "BALANCED"})).status_code == 200
    env.sim.config.extra["rendering_speeds"] = ["FLASH", "TURBO", "DEFAULT", "QUALITY"]  # the CONFLICT
    assert (await env.post(f"{V3}/generate", {"prompt": "x", "rendering_speed": "BALANCED"})).status_code == 400
    assert (await env.post(f"{V3}/generate", {"prompt": "x"}, headers={})).status_code == 401
    assert (await env.post(f"{V3}/remix", {"prompt": "x"}, [img()], headers={"Api-Key": "wrong"})).status_code == 403
    assert env.sim.stats.creations == 1


async def test_unsafe_images_inside_200(env: Env) -> None:
    r = await env.post(f"{V3}/generate", {"prompt": "x [sim:unsafe=1]", "num_images": "3"})
    assert r.status_code == 200
    data = r.json()["data"]
    assert [d["is_image_safe"] for d in data] == [False, True, True]
    assert data[0]["url"] is None and all(d["url"] for d in data[1:])
    every = await env.post(f"{V3}/generate", {"prompt": "x [sim:unsafe]", "num_images": "2"})
    assert every.status_code == 200
    assert all(d["is_image_safe"] is False and d["url"] is None for d in every.json()["data"])
    assert env.sim.stats.creations == 2 and env.sim.images_billed == 5


async def test_safety_quota_and_inflight_limits(env: Env) -> None:
    r = await env.post(f"{V3}/generate", {"prompt": "x [sim:safety]"})
    assert r.status_code == 422 and r.json() == {"error": "Prompt provided failed safety check due to the "
                                                           "inclusion of prohibited content."}
    env.sim.config.extra["banned_words"] = ["forbidden"]
    assert (await env.post(f"{V3}/generate", {"prompt": "a Forbidden scene"})).status_code == 422
    env.sim.config.extra["image_quota"] = 1
    assert (await env.post(f"{V3}/generate", {"prompt": "x", "num_images": "2"})).status_code == 402
    v2 = await env.post("/v2/image/generate/ideogram-3", {"prompt": "x", "num_images": "2"})
    assert v2.status_code == 402 and v2.json()["reject_reason"] == "insufficient_funds"
    env.sim.config.extra |= {"image_quota": None, "max_inflight": 1}

    first = asyncio.create_task(env.post(f"{V3}/generate", {"prompt": "x [sim:run=1]"}))
    while env.sim.inflight == 0:
        await asyncio.sleep(0.01)
    refused = await env.post(f"{V3}/generate", {"prompt": "x"})
    assert refused.status_code == 429 and "reject_reason" not in refused.json()
    refused = await env.post("/v2/image/generate/ideogram-3", {"prompt": "x"})
    assert refused.status_code == 429
    assert refused.json()["reject_reason"] == "inflight_limit" and refused.json()["max_inflight_requests"] == 1
    assert (await first).status_code == 200
    assert (await env.post(f"{V3}/generate", {"prompt": "x"})).status_code == 200  # the slot is free again
    assert env.sim.stats.creations == 2


async def test_result_urls_expire(env: Env) -> None:
    env.sim.config.output_ttl_seconds = 0.6
    url = (await env.post(f"{V3}/generate", {"prompt": "x"})).json()["data"][0]["url"]
    assert (await env.http.get(url)).status_code == 200
    forged = url.replace("sig=", "sig=0")
    assert (await env.http.get(forged)).status_code == 404
    await asyncio.sleep(0.65)
    assert (await env.http.get(url)).status_code == 404
    env.sim.config.output_ttl_seconds = 60
    url = (await env.post(f"{V3}/generate", {"prompt": "x"})).json()["data"][0]["url"]
    await env.http.post("/_sim/expire-files")
    assert (await env.http.get(url)).status_code == 404


async def test_injected_faults_and_ambiguous_outcome(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[{"kind": "429", "route": "generate"},
                                              {"kind": "503", "route": "remix"}])
    r = await env.post(f"{V3}/generate", {"prompt": "x"})
    assert r.status_code == 429 and "error" in r.json()
    assert (await env.post(f"{V3}/remix", {"prompt": "x"}, [img()])).status_code == 503
    assert env.sim.stats.creations == 0
    await env.http.post("/_sim/faults", json=[{"kind": "502", "route": "generate", "after_effect": True}])
    assert (await env.post(f"{V3}/generate", {"prompt": "costly"})).status_code == 502
    assert env.sim.stats.creations == 1 and env.sim.images_billed == 1  # billed although the answer was lost
    # A read timeout after the body was sent is an unknown outcome: the image was generated all the same.
    await env.http.post("/_sim/faults", json=[{"kind": "timeout", "route": "generate", "after_effect": True,
                                              "delay": 0.5}])
    with pytest.raises(httpx.ReadTimeout):
        await env.http.post(f"{V3}/generate", json={"prompt": "slow"}, headers=AUTH, timeout=0.3)
    assert env.sim.stats.creations == 2


# -- asynchronous routes and signed webhooks ---------------------------------------------------


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
            return JSONResponse({"error": "later"}, status_code=500)
        return JSONResponse({"ok": True})

    async with serving(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as base:
        rec.url = f"{base}/hook"
        yield rec


def verify(headers: dict[str, str], raw: bytes, jwks: dict[str, Any], max_age: int = 300) -> bool:
    """Ideogram's documented check: Ed25519 over id\\nuser\\nts\\nsha256hex(body), hex signature."""
    h = {k.lower(): v for k, v in headers.items()}
    ts = h["x-ideogram-webhook-timestamp"]
    if abs(time.time() - int(ts)) > max_age:
        return False
    msg = "\n".join([h["x-ideogram-webhook-generation-id"], h["x-ideogram-webhook-user-id"], ts,
                     hashlib.sha256(raw).hexdigest()]).encode()
    sig = bytes.fromhex(h["x-ideogram-webhook-signature"])
    for k in sorted(jwks["keys"], key=lambda k: k.get("kid") != h.get("x-ideogram-webhook-key-id")):
        if k.get("crv") != "Ed25519":
            continue
        x = base64.urlsafe_b64decode(k["x"] + "=" * (-len(k["x"]) % 4))
        try:
            Ed25519PublicKey.from_public_bytes(x).verify(sig, msg)
            return True
        except InvalidSignature:
            pass
    return False


async def wait_hits(rec: Receiver, n: int) -> None:
    for _ in range(100):
        if len(rec.hits) >= n:
            return
        await asyncio.sleep(0.03)
    raise AssertionError(f"got {len(rec.hits)} webhook(s), wanted {n}")


async def test_v4_async_generate_with_signed_webhook(env: Env, receiver: Receiver) -> None:
    r = await env.http.post("/v1/ideogram-v4/async/generate", params={"webhook_url": receiver.url},
                            headers=AUTH, json={"text_prompt": "a neon sign [sim:run=0.5]", "seed": 5})
    assert r.status_code == 200, r.text
    gen_id = r.json()["generation_id"]
    assert list(r.json()) == ["generation_id"] and env.sim.stats.creations == 1
    pending = (await env.http.get(f"/v1/generations/{gen_id}", headers=AUTH)).json()
    assert pending["status"] == "pending" and "data" not in pending
    done = await env.wait(f"/v1/generations/{gen_id}")
    assert done["status"] == "completed" and done["response_type"] == "url"
    (item,) = done["data"]
    assert item["seed"] == 5 and image_size((await env.http.get(item["url"])).content) == (64, 64)

    await wait_hits(receiver, 1)
    headers, raw = receiver.hits[0]
    jwks = (await env.http.get("/v1/.well-known/jwks.json")).json()  # no auth needed
    assert jwks["keys"][0]["kty"] == "OKP" and jwks["keys"][0]["kid"] == headers["x-ideogram-webhook-key-id"]
    assert verify(headers, raw, jwks)
    assert headers["x-ideogram-webhook-generation-id"] == gen_id
    assert headers["x-ideogram-webhook-signature"] == headers["x-ideogram-webhook-signature"].lower()
    assert json.loads(raw)["data"] == done["data"]  # the body mirrors the result
    assert not verify(headers, raw.replace(b"completed", b"failed!!!"), jwks)


async def test_async_failures_and_unsafe(env: Env, receiver: Receiver) -> None:
    failed = await env.http.post("/v1/ideogram-v4/async/generate", headers=AUTH, json={"prompt": "x [sim:fail]"})
    assert (await env.wait(f"/v1/generations/{failed.json()['generation_id']}"))["status"] == "failed"
    unsafe = await env.http.post("/v1/ideogram-v4/async/generate", headers=AUTH, json={"prompt": "x [sim:unsafe]"})
    done = await env.wait(f"/v1/generations/{unsafe.json()['generation_id']}")
    assert done["status"] == "completed" and done["data"][0] == done["data"][0] | {"url": None, "is_image_safe": False}
    missing = await env.http.post("/v1/ideogram-v4/async/generate", headers=AUTH, json={"seed": 1})
    assert missing.status_code == 400 and "text_prompt" in missing.json()["error"]
    assert (await env.http.get("/v1/generations/nope", headers=AUTH)).status_code == 404
    env.sim.config.extra["strict_webhook_urls"] = True  # the real API refuses loopback/http webhooks
    refused = await env.http.post("/v1/ideogram-v4/async/generate", params={"webhook_url": receiver.url},
                                  headers=AUTH, json={"text_prompt": "x"})
    assert refused.status_code == 400 and "webhook_url" in refused.json()["error"]


async def test_v2_routes_sync_and_async(env: Env, receiver: Receiver) -> None:
    sync = await env.post("/v2/image/generate/ideogram-4-5", {"prompt": "x", "seed": "9"})
    assert sync.status_code == 200, sync.text
    body = sync.json()
    assert body["seed"] == 9 and body["generation_id"] and body["response_type"] == "url" and body["data"]
    v4 = await env.http.post("/v1/ideogram-v4/generate", headers=AUTH, json={"prompt": "x"})
    assert v4.json()["response_type"] == "url" and v4.json()["data"][0]["url"]

    queued = await env.post("/v2/image/remix/ideogram-3", {"prompt": "x", "async": "true"}, [img()])
    assert set(queued.json()) == {"generation_id", "seed"}
    done = await env.wait(f"/v2/generations/{queued.json()['generation_id']}")
    assert done["status"] == "completed" and done["data"][0]["seed"] == queued.json()["seed"]

    hooked = await env.post("/v2/image/replace-background/ideogram-3",
                            {"prompt": "a beach", "webhook_url": receiver.url}, [img()])
    assert hooked.status_code == 200
    await wait_hits(receiver, 1)
    assert verify(*receiver.hits[0], env.sim.jwks())
    assert json.loads(receiver.hits[0][1])["generation_id"] == hooked.json()["generation_id"]
    assert (await env.post("/v2/image/generate/ideogram-9", {"prompt": "x"})).status_code == 404
    assert env.sim.stats.creations == 4


async def test_webhook_retries_and_duplicates(env: Env, receiver: Receiver) -> None:
    env.sim.config.extra |= {"webhook_retry_delay": 0.05, "webhook_duplicate": True}
    receiver.fail_first = 1
    await env.http.post("/v1/ideogram-v4/async/generate", params={"webhook_url": receiver.url},
                        headers=AUTH, json={"text_prompt": "x"})
    await wait_hits(receiver, 3)  # one failed delivery retried, then a duplicate
    assert len({raw for _, raw in receiver.hits}) == 1
    assert all(verify(h, raw, env.sim.jwks()) for h, raw in receiver.hits)
