"""The OpenAI Images simulator, driven over real HTTP: once with the official ``openai`` SDK, then raw."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from providers.sandbox import media
from providers.sandbox.base import SimConfig
from providers.sandbox.openai_images import OpenAIImagesSimulator
from providers.sandbox.serve import serving

KEY = "sk-test-images-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
RUN = 0.05


@dataclass
class Env:
    sim: OpenAIImagesSimulator
    base: str
    http: httpx.AsyncClient

    async def generate(self, timeout: float = 10, **body: Any) -> httpx.Response:
        return await self.http.post("/v1/images/generations", json={"prompt": "a red fox"} | body, timeout=timeout)

    async def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = (await self.http.get("/_sim/stats")).json()
        return stats


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = OpenAIImagesSimulator(SimConfig(run_seconds=RUN, api_keys=[KEY]))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as http:
        yield Env(sim, base, http)


def png_dims(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def rgba_png(width: int, height: int) -> bytes:
    """A fully transparent RGBA PNG: an edit mask."""
    raw = (b"\x00" + b"\x00\x00\x00\x00" * width) * height

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


# -- the official SDK ---------------------------------------------------------------


async def test_official_sdk_generate_edit_and_dalle_url(env: Env) -> None:
    client = openai.AsyncOpenAI(base_url=f"{env.base}/v1", api_key=KEY, max_retries=0)
    try:
        result = await client.images.generate(model="gpt-image-2", prompt="a watercolor lighthouse",
                                              size="1536x1024", quality="low", n=2)
        assert result.data is not None and len(result.data) == 2
        images = [base64.b64decode(d.b64_json or "") for d in result.data]
        assert [png_dims(i) for i in images] == [(48, 32), (48, 32)]
        assert images[0] != images[1]
        assert (result.size, result.quality, result.background, result.output_format) == \
            ("1536x1024", "low", "opaque", "png")
        assert result.usage is not None and result.usage.output_tokens == 2 * 400
        assert result.usage.total_tokens == result.usage.input_tokens + result.usage.output_tokens

        room, chair = media.png("room", 32, 32), media.png("chair", 32, 32)
        edited = await client.images.edit(
            model="gpt-image-1.5", prompt="put the chair by the window",
            image=[("room.png", room, "image/png"), ("chair.png", chair, "image/png")],
            mask=("mask.png", rgba_png(32, 32), "image/png"), input_fidelity="high", output_format="jpeg")
        assert edited.data is not None and edited.output_format == "jpeg"
        assert base64.b64decode(edited.data[0].b64_json or "")[:3] == b"\xff\xd8\xff"
        assert edited.usage is not None and edited.usage.input_tokens_details.image_tokens > 0

        dalle = await client.images.generate(model="dall-e-3", prompt="a cat [sim:run=0.01]", size="1792x1024")
        assert dalle.data is not None and dalle.usage is None
        url, revised = dalle.data[0].url or "", dalle.data[0].revised_prompt or ""
        assert "se=" in url and "sig=" in url and "[sim:" not in revised and "a cat" in revised
        fetched = await env.http.get(url)
        assert fetched.status_code == 200 and png_dims(fetched.content) == (56, 32)

        with pytest.raises(openai.BadRequestError) as refused:
            await client.images.generate(model="gpt-image-1", prompt="something [sim:refuse]")
        assert refused.value.code == "moderation_blocked"
    finally:
        await client.close()
    assert env.sim.stats.creations == 3


async def test_official_sdk_stream(env: Env) -> None:
    client = openai.AsyncOpenAI(base_url=f"{env.base}/v1", api_key=KEY, max_retries=0)
    try:
        stream = await client.images.generate(model="gpt-image-1-mini", prompt="a kite", stream=True,
                                              partial_images=2)
        kinds = [event.type async for event in stream]
    finally:
        await client.close()
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]


# -- raw HTTP: happy paths ----------------------------------------------------------------


async def test_synchronous_answer_takes_the_run_time(env: Env) -> None:
    started = time.monotonic()
    r = await env.generate(model="gpt-image-1", prompt="slow one [sim:run=0.4]")
    assert r.status_code == 200 and time.monotonic() - started >= 0.4
    assert r.headers["x-request-id"].startswith("req_") and int(r.headers["openai-processing-ms"]) >= 400
    body = r.json()
    assert set(body) == {"created", "background", "output_format", "quality", "size", "data", "usage"}
    assert body["size"] == "1024x1024" and body["quality"] == "medium"  # "auto" resolved
    assert body["usage"]["output_tokens"] == 1056


async def test_gpt_image_2_free_sizes_and_formats(env: Env) -> None:
    r = await env.generate(model="gpt-image-2", size="3840x2160", output_format="webp", background="transparent")
    assert r.status_code == 200, r.text
    data = base64.b64decode(r.json()["data"][0]["b64_json"])
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert r.json()["size"] == "3840x2160" and r.json()["background"] == "transparent"


async def test_dalle_b64_and_defaults(env: Env) -> None:
    r = await env.generate(model="dall-e-3", response_format="b64_json", quality="hd", style="natural")
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"created", "data"} and "revised_prompt" in body["data"][0]
    assert png_dims(base64.b64decode(body["data"][0]["b64_json"])) == (32, 32)
    # A gpt-image-only field picks gpt-image-1 when model is omitted; without one it is dall-e-2 (retired).
    r = await env.http.post("/v1/images/generations", json={"prompt": "x", "output_format": "png"})
    assert r.status_code == 200 and "usage" in r.json()
    r = await env.http.post("/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "dall-e-2" in r.json()["error"]["message"]


async def test_json_edit_with_image_urls(env: Env) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(media.png("p", 16, 16)).decode()
    body = {"model": "gpt-image-1", "prompt": "blend them",
            "images": [{"image_url": data_url}, {"image_url": "https://example.com/a.png"}, {"file_id": "file-1"}]}
    r = await env.http.post("/v1/images/edits", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens_details"]["image_tokens"] == 3 * 323
    env.sim.config.extra["json_edits"] = False
    r = await env.http.post("/v1/images/edits", json=body)
    assert r.status_code == 400


async def test_stream_output_refusal_is_an_error_event(env: Env) -> None:
    r = await env.generate(model="gpt-image-1", prompt="x [sim:refuse=output]", stream=True, partial_images=1)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert [name for name, _ in events] == ["image_generation.partial_image", "error"]
    assert events[1][1]["error"]["code"] == "moderation_blocked"
    assert (await env.stats())["creations"] == 0


# -- validation and errors -------------------------------------------------------------------


VALIDATION_CASES: list[tuple[dict[str, Any], str, str]] = [
    ({"model": "dall-e-3", "n": 2}, "n", "integer_above_max_value"),
    ({"model": "gpt-image-1", "n": 11}, "n", "integer_above_max_value"),
    ({"model": "gpt-image-1", "n": "2"}, "n", "invalid_type"),
    ({"model": "gpt-image-1", "response_format": "b64_json"}, "response_format", "unknown_parameter"),
    ({"model": "gpt-image-1", "style": "vivid"}, "style", "unknown_parameter"),
    ({"model": "dall-e-3", "output_format": "png"}, "output_format", "unknown_parameter"),
    ({"model": "gpt-image-1", "size": "1792x1024"}, "size", "invalid_value"),
    ({"model": "dall-e-3", "size": "auto"}, "size", "invalid_value"),
    ({"model": "gpt-image-2", "size": "1000x1000"}, "size", "invalid_value"),
    ({"model": "gpt-image-2", "size": "3840x1024"}, "size", "invalid_value"),
    ({"model": "gpt-image-2", "size": "4096x2048"}, "size", "invalid_value"),
    ({"model": "gpt-image-1", "quality": "hd"}, "quality", "invalid_value"),
    ({"model": "dall-e-3", "quality": "high"}, "quality", "invalid_value"),
    ({"model": "gpt-image-1", "background": "transparent", "output_format": "jpeg"}, "background",
     "invalid_value"),
    ({"model": "gpt-image-1", "output_compression": 101}, "output_compression", "integer_above_max_value"),
    ({"model": "gpt-image-1", "prompt": None}, "prompt", "missing_required_parameter"),
    ({"model": "dall-e-3", "prompt": "x" * 4001}, "prompt", "string_above_max_length"),
    ({"model": "gpt-image-1", "seed": 1}, "seed", "unknown_parameter"),
]


async def test_generation_validation(env: Env) -> None:
    for body, param, code in VALIDATION_CASES:
        r = await env.generate(**body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code), body
    assert (await env.stats())["creations"] == 0


async def test_edit_validation(env: Env) -> None:
    image = media.png("i", 32, 32)

    async def edit(model: str, files: list[tuple[str, tuple[str, bytes, str]]], **data: str) -> dict[str, Any]:
        r = await env.http.post("/v1/images/edits", data={"model": model, "prompt": "p", **data}, files=files)
        assert r.status_code == 400, r.text
        error: dict[str, Any] = r.json()["error"]
        return error

    one = [("image", ("i.png", image, "image/png"))]
    assert (await edit("dall-e-3", one))["param"] == "model"
    assert "multipart/form-data" in (await edit("gpt-image-1", []))["message"]  # form-urlencoded
    only_mask = [("mask", ("m.png", rgba_png(32, 32), "image/png"))]
    assert (await edit("gpt-image-1", only_mask))["code"] == "missing_required_parameter"
    assert (await edit("gpt-image-1", [("image[]", ("i.png", image, "image/png"))] * 17))["code"] == \
        "array_above_max_length"
    assert (await edit("gpt-image-1", [("image", ("a.txt", b"hello", "text/plain"))]))["param"] == "image"
    assert "alpha" in (await edit("gpt-image-1", [*one, ("mask", ("m.png", image, "image/png"))]))["message"]
    small_mask = ("mask", ("m.png", rgba_png(16, 16), "image/png"))
    assert "dimensions" in (await edit("gpt-image-1", [*one, small_mask]))["message"]
    assert (await edit("gpt-image-1-mini", one, input_fidelity="high"))["param"] == "input_fidelity"
    env.sim.config.extra["gpt_image_2_input_fidelity"] = False
    assert (await edit("gpt-image-2", one, input_fidelity="high"))["code"] == "unknown_parameter"
    assert (await edit("gpt-image-1", one, n="two"))["code"] == "invalid_type"
    # image[N] parts are accepted, as gateways do.
    r = await env.http.post("/v1/images/edits", data={"model": "gpt-image-1", "prompt": "p"},
                            files=[("image[0]", ("a.png", image, "image/png")), ("image[1]", ("b.png", image,
                                                                                             "image/png"))])
    assert r.status_code == 200


async def test_auth_and_organization_verification(env: Env) -> None:
    r = await env.http.post("/v1/images/generations", json={"prompt": "x"}, headers={"Authorization": ""})
    assert r.status_code == 401 and "didn't provide an API key" in r.json()["error"]["message"]
    r = await env.http.post("/v1/images/generations", json={"prompt": "x"},
                            headers={"Authorization": "Bearer sk-wrong-key-123456"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    env.sim.config.extra["unverified_keys"] = [KEY]
    r = await env.generate(model="gpt-image-2")
    assert r.status_code == 403 and "must be verified" in r.json()["error"]["message"]
    assert (await env.generate(model="dall-e-3")).status_code == 200  # DALL·E needs no verification
    env.sim.config.extra["unverified_status"] = 400
    assert (await env.generate(model="gpt-image-1")).status_code == 400


async def test_refusals(env: Env) -> None:
    started = time.monotonic()
    r = await env.generate(model="gpt-image-2", prompt="bad [sim:refuse]")
    assert r.status_code == 400
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("image_generation_user_error", "moderation_blocked")
    assert error["moderation_details"]["moderation_stage"] == "input"
    assert "rejected by the safety system" in error["message"]
    r = await env.generate(model="dall-e-3", prompt="bad [sim:refuse]")
    assert r.status_code == 400
    assert (r.json()["error"]["type"], r.json()["error"]["code"]) == \
        ("invalid_request_error", "content_policy_violation")
    assert time.monotonic() - started < 0.5
    started = time.monotonic()
    r = await env.generate(model="gpt-image-1", prompt="bad [sim:refuse=output] [sim:run=0.3]")
    assert r.status_code == 400 and r.json()["error"]["moderation_details"]["moderation_stage"] == "output"
    assert time.monotonic() - started >= 0.3  # refused after generating
    assert (await env.stats())["creations"] == 0  # refusals are not billed
    env.sim.config.extra["bill_output_refusals"] = True
    await env.generate(model="gpt-image-1", prompt="bad [sim:refuse=output]")
    assert (await env.stats())["creations"] == 1


async def test_timeout_after_generating_is_billed_once(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[{"kind": "timeout", "route": "generate", "after_effect": True,
                                               "delay": 1}])
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await env.generate(model="gpt-image-1", timeout=0.3)
    assert time.monotonic() - started < 0.9
    stats = await env.stats()
    assert stats["creations"] == 1 and stats["faults_injected"] == {"generate:timeout": 1}


async def test_500_after_generating_and_retry_bills_twice(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[{"kind": "500", "route": "generate", "after_effect": True}])
    r = await env.generate(model="gpt-image-1", prompt="same prompt")
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    r = await env.generate(model="gpt-image-1", prompt="same prompt")
    assert r.status_code == 200
    stats = await env.stats()
    assert stats["creations"] == 2 and len(stats["duplicate_identities"]) == 1


async def test_dropped_connection_after_generating(env: Env) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        await env.generate(model="gpt-image-1", prompt="x [sim:drop]")
    assert (await env.stats())["creations"] == 1


async def test_injected_gateway_errors_before_generating(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[{"kind": "502", "route": "edit"}, {"kind": "503", "route": "*"}])
    r = await env.http.post("/v1/images/edits", data={"model": "gpt-image-1", "prompt": "p"},
                            files=[("image", ("a.png", media.png("a"), "image/png"))])
    assert r.status_code == 502 and "cloudflare" in r.text
    r = await env.generate()
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"
    assert (await env.stats())["creations"] == 0


async def test_rate_limits(env: Env) -> None:
    env.sim.config.extra["images_per_minute"] = 3
    assert (await env.generate(model="gpt-image-1", n=2)).status_code == 200
    r = await env.generate(model="gpt-image-1", n=2)
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and "images per min" in r.json()["error"]["message"]
    assert 0 < int(r.headers["retry-after-ms"]) <= 60_000 and int(r.headers["retry-after"]) <= 60
    assert r.headers["x-should-retry"] == "true"
    assert (await env.generate(model="gpt-image-1", n=1)).status_code == 200  # fits the remaining budget
    assert (await env.generate(model="gpt-image-2", n=2)).status_code == 200  # limits are per model

    await env.http.post("/_sim/faults", json=[{"kind": "429", "route": "generate", "retry_after": 2}])
    r = await env.generate(model="gpt-image-2")
    assert r.status_code == 429
    assert (r.headers["retry-after"], r.headers["retry-after-ms"]) == ("2", "2000")
    env.sim.config.extra["rate_limit_kind"] = "insufficient_quota"
    await env.http.post("/_sim/faults", json=[{"kind": "429", "route": "generate"}])
    r = await env.generate(model="gpt-image-2")
    assert r.json()["error"]["code"] == "insufficient_quota" and r.headers["x-should-retry"] == "false"


async def test_dalle_url_expires(env: Env) -> None:
    env.sim.config.output_ttl_seconds = 0.3
    url = (await env.generate(model="dall-e-3")).json()["data"][0]["url"]
    assert (await env.http.get(url, headers={"Authorization": ""})).status_code == 200  # pre-signed: no key
    await asyncio.sleep(0.35)
    gone = await env.http.get(url)
    assert gone.status_code == 404 and b"BlobNotFound" in gone.content

    env.sim.config.extra["expired_url_status"] = 403
    env.sim.config.output_ttl_seconds = 3600
    url = (await env.generate(model="dall-e-3")).json()["data"][0]["url"]
    assert (await env.http.get(url)).status_code == 200
    await env.http.post("/_sim/expire-files")
    denied = await env.http.get(url)
    assert denied.status_code == 403 and b"AuthenticationFailed" in denied.content
