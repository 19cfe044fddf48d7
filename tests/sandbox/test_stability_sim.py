"""The Stability simulator, driven over real HTTP as Stability's v2beta docs tell a client to."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from providers.sandbox.base import SimConfig
from providers.sandbox.media import png
from providers.sandbox.serve import serving
from providers.sandbox.stability import StabilitySimulator, image_size, sniff_image

KEY = "sk-" + "a" * 48
OTHER = "sk-" + "b" * 48
AUTH = {"Authorization": f"Bearer {KEY}", "Accept": "image/*"}
JSON = {"Authorization": f"Bearer {KEY}", "Accept": "application/json"}
GEN = "/v2beta/stable-image/generate"
# Multipart is mandatory even without files: clients add an empty part, as Stability's examples do.
NONE = {"none": ("", b"")}


@dataclass
class Env:
    sim: StabilitySimulator
    http: httpx.AsyncClient

    async def post(self, path: str, fields: dict[str, str], files: dict[str, Any] | None = None,
                   headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.post(path, data=fields, files=files or NONE, headers=headers or AUTH)

    async def wait(self, gen_id: str, headers: dict[str, str] | None = None) -> httpx.Response:
        for _ in range(100):
            r = await self.http.get(f"/v2beta/results/{gen_id}", headers=headers or AUTH)
            if r.status_code != 202:
                return r
            assert r.json() == {"id": gen_id, "status": "in-progress"}
            await asyncio.sleep(0.03)
        raise AssertionError("result never finished")


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = StabilitySimulator(SimConfig(queue_seconds=0.05, run_seconds=0.1, api_keys=[KEY, OTHER]))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, timeout=10) as http:
        yield Env(sim, http)


def assert_error(r: httpx.Response, status: int, name: str, mentions: str = "") -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"id", "name", "errors"} and len(body["id"]) == 32
    assert body["name"] == name and mentions in body["errors"][0]


async def test_core_answers_real_png_bytes_with_headers(env: Env) -> None:
    started = time.monotonic()
    r = await env.post(f"{GEN}/core", {"prompt": "a lighthouse on a cliff", "aspect_ratio": "1:1"})
    assert time.monotonic() - started >= 0.1  # synchronous: held while rendering
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["finish-reason"] == "SUCCESS" and int(r.headers["seed"]) > 0
    assert r.headers["x-request-id"]
    assert image_size(r.content) == (1216 // 16, 1216 // 16)  # 1.5 MP at 1:1
    again = await env.post(f"{GEN}/core", {"prompt": "a lighthouse on a cliff", "aspect_ratio": "1:1"})
    assert again.content != r.content  # every generation is new and billed again
    assert env.sim.stats.creations == 2 and env.sim.credits_used == 6.0
    assert env.sim.stats.as_dict()["duplicate_identities"]  # the same request, generated twice


async def test_output_formats_and_json_answers(env: Env) -> None:
    r = await env.post(f"{GEN}/ultra", {"prompt": "a fox", "output_format": "jpeg", "seed": "42",
                                        "aspect_ratio": "16:9"}, headers=JSON)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json; type=image/jpeg"
    assert "finish-reason" not in r.headers and "seed" not in r.headers
    body = r.json()
    assert body["finish_reason"] == "SUCCESS" and body["seed"] == 42
    data = base64.b64decode(body["image"])
    assert sniff_image(data) == "jpeg" and data.endswith(b"\xff\xd9")
    w, h = image_size(data) or (0, 0)
    assert w > h  # 16:9
    webp = await env.post(f"{GEN}/sd3", {"prompt": "a fox", "output_format": "webp", "model": "sd3.5-medium"})
    assert webp.headers["content-type"] == "image/webp" and sniff_image(webp.content) == "webp"
    assert image_size(webp.content) == (64, 64)


async def test_sd3_models_and_image_to_image(env: Env) -> None:
    source = png("source", 320, 192)
    for model in ("sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium", "sd3.5-flash"):
        r = await env.post(f"{GEN}/sd3", {"prompt": "x", "model": model})
        assert r.status_code == 200, (model, r.text)
    assert_error(await env.post(f"{GEN}/sd3", {"prompt": "x", "model": "sd4"}), 400, "bad_request", "model")
    env.sim.config.extra["sd3_models"] = ["sd3.5-large"]
    assert_error(await env.post(f"{GEN}/sd3", {"prompt": "x", "model": "sd3.5-flash"}), 400, "bad_request")

    i2i = {"prompt": "x", "mode": "image-to-image", "strength": "0.6"}
    assert_error(await env.post(f"{GEN}/sd3", i2i), 400, "bad_request", "image")
    no_strength = {"prompt": "x", "mode": "image-to-image"}
    assert_error(await env.post(f"{GEN}/sd3", no_strength, files={"image": ("a.png", source, "image/png")}),
                 400, "bad_request", "strength")
    r = await env.post(f"{GEN}/sd3", i2i, files={"image": ("a.png", source, "image/png")})
    assert r.status_code == 200 and image_size(r.content) == (20, 12)
    ultra = await env.post(f"{GEN}/ultra", {"prompt": "x", "strength": "0.3"},
                           files={"image": ("a.png", source, "image/png")})
    assert ultra.status_code == 200 and image_size(ultra.content) == (20, 12)
    not_image = await env.post(f"{GEN}/ultra", {"prompt": "x", "strength": "0.3"},
                               files={"image": ("a.txt", b"hello", "text/plain")})
    assert_error(not_image, 400, "bad_request", "image")


async def test_malformed_requests_are_refused(env: Env) -> None:
    json_body = await env.http.post(f"{GEN}/core", json={"prompt": "x"}, headers=AUTH)
    assert_error(json_body, 400, "bad_request", "multipart/form-data")
    urlencoded = await env.http.post(f"{GEN}/core", data={"prompt": "x"}, headers=AUTH)
    assert_error(urlencoded, 400, "bad_request", "multipart/form-data")
    assert_error(await env.post(f"{GEN}/core", {}), 400, "bad_request", "prompt")
    assert_error(await env.post(f"{GEN}/core", {"prompt": "x" * 10_001}), 400, "bad_request", "prompt")
    assert_error(await env.post(f"{GEN}/core", {"prompt": "x", "output_format": "gif"}), 400, "bad_request",
                 "output_format")
    assert_error(await env.post(f"{GEN}/core", {"prompt": "x", "aspect_ratio": "4:3"}), 400, "bad_request",
                 "aspect_ratio")
    assert_error(await env.post(f"{GEN}/core", {"prompt": "x", "seed": "4294967295"}), 400, "bad_request", "seed")
    assert_error(await env.post(f"{GEN}/sd3", {"prompt": "x", "cfg_scale": "11"}), 400, "bad_request", "cfg_scale")
    big = await env.post(f"{GEN}/core", {"prompt": "x"},
                         files={"image": ("big.png", b"\0" * (10 * 1024 * 1024 + 1), "image/png")})
    assert_error(big, 413, "payload_too_large")
    assert_error(await env.post(f"{GEN}/turbo", {"prompt": "x"}), 404, "not_found")
    assert_error(await env.post(f"{GEN}/core", {"prompt": "x"}, headers={"Accept": "image/*"}), 401,
                 "unauthorized")
    env.sim.config.extra["error_message_field"] = "message"
    alt = (await env.post(f"{GEN}/core", {})).json()
    assert "errors" not in alt and "prompt" in alt["message"]
    assert env.sim.stats.creations == 0 and env.sim.credits_used == 0


async def test_content_filtered_inside_200_is_not_charged(env: Env) -> None:
    r = await env.post(f"{GEN}/core", {"prompt": "something dubious [sim:filtered]"})
    assert r.status_code == 200
    assert r.headers["finish-reason"] == "CONTENT_FILTERED"
    assert sniff_image(r.content) == "png"  # the blurred image is still there
    j = await env.post(f"{GEN}/ultra", {"prompt": "dubious [sim:filtered]", "output_format": "webp"}, headers=JSON)
    assert j.json()["finish_reason"] == "CONTENT_FILTERED"
    assert sniff_image(base64.b64decode(j.json()["image"])) == "webp"
    assert env.sim.stats.creations == 2 and env.sim.credits_used == 0


async def test_refusals_before_generation(env: Env) -> None:
    assert_error(await env.post(f"{GEN}/core", {"prompt": "x [sim:moderated]"}), 403, "content_moderation",
                 "content moderation")
    assert_error(await env.post(f"{GEN}/core", {"prompt": "x [sim:reject]"}), 422, "invalid_language")
    assert_error(await env.post(f"{GEN}/core", {"prompt": "x [sim:fail]"}), 500, "internal_error")
    env.sim.config.extra["credits"] = 5
    assert (await env.post(f"{GEN}/core", {"prompt": "x"})).status_code == 200
    assert_error(await env.post(f"{GEN}/core", {"prompt": "x"}), 402, "payment_required", "credits")
    assert env.sim.stats.creations == 1 and env.sim.credits_used == 3.0


async def test_rate_limit_locks_the_key_out(env: Env) -> None:
    env.sim.config.extra |= {"rate_limit": 3, "rate_window": 10, "lockout_seconds": 0.8}
    for _ in range(3):
        assert (await env.post(f"{GEN}/core", {"prompt": "x"})).status_code == 200
    assert_error(await env.post(f"{GEN}/core", {"prompt": "x"}), 429, "rate_limit_exceeded", "rate limit")
    assert (await env.post(f"{GEN}/core", {"prompt": "x"})).status_code == 429  # still locked out
    other = {"Authorization": f"Bearer {OTHER}"}
    assert (await env.post(f"{GEN}/core", {"prompt": "x"}, headers=other)).status_code == 200  # per key
    await asyncio.sleep(0.85)
    assert (await env.post(f"{GEN}/core", {"prompt": "x"})).status_code == 200


async def test_injected_faults(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[{"kind": "429", "route": "generate", "retry_after": 2}])
    r = await env.post(f"{GEN}/core", {"prompt": "x"})
    assert r.headers["retry-after"] == "2"
    assert_error(r, 429, "rate_limit_exceeded")
    assert (await env.post(f"{GEN}/core", {"prompt": "x"})).status_code == 200
    assert env.sim.stats.creations == 1
    await env.http.post("/_sim/faults", json=[{"kind": "502", "route": "generate", "after_effect": True}])
    assert (await env.post(f"{GEN}/core", {"prompt": "costly"})).status_code == 502
    assert env.sim.stats.creations == 2 and env.sim.credits_used == 6.0  # generated and billed, answer lost


async def test_async_creative_upscale(env: Env) -> None:
    files = {"image": ("small.png", png("small", 160, 96), "image/png")}
    assert_error(await env.post("/v2beta/stable-image/upscale/creative", {}, files=files), 400, "bad_request",
                 "prompt")
    assert_error(await env.post("/v2beta/stable-image/upscale/creative", {"prompt": "x"}), 400, "bad_request",
                 "image")
    r = await env.post("/v2beta/stable-image/upscale/creative",
                       {"prompt": "crisp detail [sim:run=0.4]", "output_format": "webp"}, files=files)
    assert r.status_code == 200, r.text
    gen_id = r.json()["id"]
    assert list(r.json()) == ["id"] and len(gen_id) == 64
    first = await env.http.get(f"/v2beta/results/{gen_id}", headers=AUTH)
    assert first.status_code == 202
    assert (await env.http.get(f"/v2beta/results/{gen_id}",
                               headers={"Authorization": f"Bearer {OTHER}"})).status_code == 404
    done = await env.wait(gen_id)
    assert done.status_code == 200 and done.headers["finish-reason"] == "SUCCESS"
    assert sniff_image(done.content) == "webp" and image_size(done.content) == (40, 24)  # 4x, 1/16 per side
    as_json = await env.http.get(f"/v2beta/results/{gen_id}", headers=JSON)
    assert base64.b64decode(as_json.json()["image"]) == done.content
    env.sim.config.extra["result_json_field"] = "result"
    assert base64.b64decode((await env.http.get(f"/v2beta/results/{gen_id}", headers=JSON)).json()["result"]) \
        == done.content
    assert (await env.http.get("/v2beta/results/" + "0" * 64, headers=AUTH)).status_code == 404
    env.sim.config.extra["result_ttl_seconds"] = 0.0  # results are kept 24 h after completion
    assert_error(await env.http.get(f"/v2beta/results/{gen_id}", headers=AUTH), 404, "not_found")
    assert env.sim.stats.creations == 1 and env.sim.credits_used == 60.0


async def test_async_replace_background_and_relight(env: Env) -> None:
    path = "/v2beta/stable-image/edit/replace-background-and-relight"
    subject = {"subject_image": ("p.png", png("product", 128, 128), "image/png")}
    assert_error(await env.post(path, {"background_prompt": "a beach"}), 400, "bad_request", "subject_image")
    assert_error(await env.post(path, {}, files=subject), 400, "bad_request", "background_prompt")
    with_reference = await env.post(path, {}, files=subject | {
        "background_reference": ("bg.png", png("beach", 64, 64), "image/png")})
    assert with_reference.status_code == 200
    assert (await env.wait(with_reference.json()["id"])).status_code == 200

    filtered = await env.post(path, {"background_prompt": "beach [sim:filtered]"}, files=subject)
    env.sim.config.extra["result_json_field"] = "artifacts"
    body = (await env.wait(filtered.json()["id"], JSON)).json()
    (artifact,) = body["artifacts"]
    assert artifact["finishReason"] == "CONTENT_FILTERED" and sniff_image(base64.b64decode(artifact["base64"]))

    failed = await env.post(path, {"background_prompt": "beach [sim:fail]"}, files=subject)
    assert_error(await env.wait(failed.json()["id"]), 500, "internal_error")
    assert env.sim.credits_used == 8.0  # filtered and failed jobs are not charged
