"""The Gemini image / Imagen simulator, driven over real HTTP: once with the official google-genai SDK, then raw."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from google import genai
from google.genai import types

from providers.sandbox import media
from providers.sandbox.base import SimConfig
from providers.sandbox.gemini import GeminiImageSimulator
from providers.sandbox.serve import serving

KEY = "AIza-test-gemini-key"
RUN = 0.05
VERTEX = "/v1/projects/proj/locations/us-central1/publishers/google/models"


@dataclass
class Env:
    sim: GeminiImageSimulator
    base: str
    http: httpx.AsyncClient

    async def generate(self, prompt: str = "a red fox", model: str = "gemini-2.5-flash-image",
                       config: dict[str, Any] | None = None, parts: list[dict[str, Any]] | None = None,
                       timeout: float = 10, **body: Any) -> httpx.Response:
        payload = {"contents": [{"role": "user", "parts": [{"text": prompt}, *(parts or [])]}],
                   "generationConfig": {"responseModalities": ["IMAGE"]} | (config or {})} | body
        return await self.http.post(f"/v1beta/models/{model}:generateContent", json=payload, timeout=timeout)

    async def predict(self, prompt: str = "a ceramic mug", model: str = "imagen-4.0-generate-001",
                      path: str = VERTEX, **parameters: Any) -> httpx.Response:
        body = {"instances": [{"prompt": prompt}], "parameters": parameters}
        return await self.http.post(f"{path}/{model}:predict", json=body, headers={"Authorization": f"Bearer {KEY}"})

    async def creations(self) -> int:
        count: int = (await self.http.get("/_sim/stats")).json()["creations"]
        return count


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = GeminiImageSimulator(SimConfig(run_seconds=RUN, api_keys=[KEY]))
    async with serving(sim.app) as base, \
            httpx.AsyncClient(base_url=base, headers={"x-goog-api-key": KEY}, timeout=10) as http:
        yield Env(sim, base, http)


def png_dims(data: bytes) -> tuple[int, int]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    w, h = struct.unpack(">II", data[16:24])
    return int(w), int(h)


def image_parts(body: dict[str, Any]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = body["candidates"][0]["content"]["parts"]
    return [p for p in parts if "inlineData" in p and not p.get("thought")]


def inline_png(seed: str = "ref") -> dict[str, Any]:
    return {"inline_data": {"mime_type": "image/png", "data": base64.b64encode(media.png(seed)).decode()}}


# -- the official SDK -----------------------------------------------------------------


async def test_official_sdk_generate_content(env: Env) -> None:
    client = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=env.base))
    config = types.GenerateContentConfig(
        response_modalities=["IMAGE"],
        image_config=types.ImageConfig(aspect_ratio="16:9", image_size="2K"))
    reference = types.Part.from_bytes(data=media.png("bottle"), mime_type="image/png")
    response = await client.aio.models.generate_content(
        model="gemini-3-pro-image-preview", contents=[reference, "put this bottle on a marble counter"],
        config=config)
    assert response.candidates and response.candidates[0].finish_reason == types.FinishReason.STOP
    parts = response.candidates[0].content.parts if response.candidates[0].content else None
    assert parts is not None and len(parts) == 1  # IMAGE only: no text part
    blob = parts[0].inline_data
    assert blob is not None and blob.mime_type == "image/png" and blob.data is not None
    w, h = png_dims(blob.data)
    assert w > h and round(w / h, 1) == round(16 / 9, 1)
    assert parts[0].thought_signature  # Gemini 3 signs its parts
    usage = response.usage_metadata
    assert usage is not None and usage.prompt_tokens_details and usage.candidates_tokens_details
    assert {d.modality for d in usage.prompt_tokens_details} == {types.MediaModality.TEXT, types.MediaModality.IMAGE}
    assert usage.candidates_tokens_details[0].modality == types.MediaModality.IMAGE

    blocked = await client.aio.models.generate_content(
        model="gemini-2.5-flash-image", contents="something [sim:block=PROHIBITED_CONTENT]", config=config.model_copy(
            update={"image_config": None}))
    assert not blocked.candidates
    assert blocked.prompt_feedback and blocked.prompt_feedback.block_reason == types.BlockedReason.PROHIBITED_CONTENT

    with pytest.raises(genai.errors.ClientError) as err:
        await client.aio.models.generate_content(model="gemini-9-image", contents="x", config=config)
    assert err.value.code == 404 and err.value.status == "NOT_FOUND"
    assert await env.creations() == 1


# -- raw HTTP ------------------------------------------------------------------------


async def test_camel_case_answer_to_snake_or_camel_input(env: Env) -> None:
    started = time.monotonic()
    r = await env.http.post(
        "/v1beta/models/gemini-2.5-flash-image:generateContent",
        headers={"x-goog-api-key": ""}, params={"key": KEY},
        json={"contents": [{"parts": [{"text": "a kite [sim:run=0.3]"}, inline_png(),
                                      {"inlineData": {"mimeType": "image/jpeg", "data": base64.b64encode(
                                          b"\xff\xd8\xff\xe0").decode()}}]}],
              "generation_config": {"response_modalities": ["TEXT", "IMAGE"]}})
    assert r.status_code == 200, r.text
    assert time.monotonic() - started >= 0.3  # synchronous: answered after the run time
    assert "inline_data" not in r.text and "mime_type" not in r.text
    body = r.json()
    parts = body["candidates"][0]["content"]["parts"]
    assert "text" in parts[0] and parts[1]["inlineData"]["mimeType"] == "image/png"
    assert png_dims(base64.b64decode(parts[1]["inlineData"]["data"])) == (32, 32)  # 1024-class, 1:1
    assert "thoughtSignature" not in parts[1]
    usage = body["usageMetadata"]
    assert usage["candidatesTokensDetails"][0] == {"modality": "IMAGE", "tokenCount": 1290}
    assert usage["promptTokenCount"] >= 2 * 258
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]
    assert body["modelVersion"] == "gemini-2.5-flash-image" and body["responseId"]

    env.sim.config.extra["snake_case_inline_data"] = True
    r = await env.generate()
    assert "inline_data" in r.json()["candidates"][0]["content"]["parts"][0]


async def test_models_sizes_and_thought_images(env: Env) -> None:
    r = await env.generate("tall [sim:thought=2]", "gemini-3.1-flash-image",
                           {"imageConfig": {"aspectRatio": "1:4", "imageSize": "0.5K"}})
    assert r.status_code == 200, r.text
    parts = r.json()["candidates"][0]["content"]["parts"]
    assert [bool(p.get("thought")) for p in parts] == [True, True, False]
    w, h = png_dims(base64.b64decode(parts[-1]["inlineData"]["data"]))
    assert h == 4 * w
    assert r.json()["usageMetadata"]["thoughtsTokenCount"] > 0
    r = await env.generate("a [sim:thought]", "gemini-2.5-flash-image")
    assert len(r.json()["candidates"][0]["content"]["parts"]) == 1  # 2.5 Flash does not think
    r = await env.generate("wide", "gemini-3-pro-image", {"imageConfig": {"imageSize": "4K"}})
    assert png_dims(base64.b64decode(image_parts(r.json())[0]["inlineData"]["data"])) == (128, 128)
    assert r.json()["usageMetadata"]["candidatesTokensDetails"][0]["tokenCount"] == 2000


async def test_no_image_answers_are_http_200(env: Env) -> None:
    started = time.monotonic()
    r = await env.generate("x [sim:block] [sim:run=1]")
    assert r.status_code == 200 and time.monotonic() - started < 0.8  # prompt blocks are immediate
    assert r.json()["promptFeedback"] == {"blockReason": "SAFETY"} and "candidates" not in r.json()

    r = await env.generate("x [sim:finish=IMAGE_SAFETY]")
    candidate = r.json()["candidates"][0]
    assert candidate["finishReason"] == "IMAGE_SAFETY" and "content" not in candidate
    r = await env.generate("x [sim:finish=NO_IMAGE]", config={"responseModalities": ["TEXT", "IMAGE"]})
    candidate = r.json()["candidates"][0]
    assert candidate["finishReason"] == "NO_IMAGE"
    assert [list(p) for p in candidate["content"]["parts"]] == [["text"]]
    for prompt, config in (("x [sim:text_only]", None), ("x", {"responseModalities": ["TEXT"]})):
        r = await env.generate(prompt, config=config)
        candidate = r.json()["candidates"][0]
        assert candidate["finishReason"] == "STOP" and "inlineData" not in str(candidate)
    assert await env.creations() == 0


async def test_validation(env: Env) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"config": {"imageConfig": {"imageSize": "2K"}}}, "Image size is not supported"),
        ({"model": "gemini-3-pro-image", "config": {"imageConfig": {"imageSize": "2k"}}}, "upper-case K"),
        ({"model": "gemini-3-pro-image", "config": {"imageConfig": {"imageSize": "0.5K"}}}, "Unsupported image size"),
        ({"config": {"imageConfig": {"aspectRatio": "1:4"}}}, "Unsupported aspect ratio"),
        ({"config": {"imageConfig": {"outputMimeType": "image/jpeg"}}}, 'Unknown name "outputMimeType"'),
        ({"config": {"imageConfig": {"personGeneration": "allow_all"}}}, "person_generation"),
        ({"config": {"responseModalities": ["image"]}}, "response_modalities[0]"),
        ({"config": {"candidateCount": 2}}, "Multiple candidates"),
        ({"config": {"sampleCount": 2}}, 'Unknown name "sampleCount"'),
        ({"parts": [{"inline_data": {"mime_type": "application/pdf", "data": "AAAA"}}]}, "Unsupported MIME type"),
        ({"parts": [{"inline_data": {"mime_type": "image/png", "data": "not base64!"}}]}, "Base64 decoding failed"),
        ({"parts": [{"image": "x"}]}, 'Unknown name "image"'),
        ({"model": "gemini-3-pro-image", "parts": [inline_png(str(i)) for i in range(15)]}, "at most 14"),
        ({"extra": 1}, 'Unknown name "extra"'),
    ]
    for case, fragment in cases:
        r = await env.generate(**case)
        assert r.status_code == 400, (case, r.text)
        error = r.json()["error"]
        assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
        assert fragment in error["message"], (fragment, error["message"])
    r = await env.http.post("/v1beta/models/gemini-2.5-flash-image:generateContent", json={"contents": []})
    assert r.status_code == 400 and "contents is not specified" in r.json()["error"]["message"]
    assert await env.creations() == 0
    env.sim.config.extra["image_size_on_flash_2_5"] = "ignore"
    assert (await env.generate(config={"imageConfig": {"imageSize": "2K"}})).status_code == 200
    ok = await env.generate(model="gemini-3.1-flash-image", config={"imageConfig": {"aspectRatio": "1:4"}})
    assert ok.status_code == 200


async def test_auth_and_vertex(env: Env) -> None:
    url = "/v1beta/models/gemini-2.5-flash-image:generateContent"
    body = {"contents": [{"parts": [{"text": "x"}]}]}
    r = await env.http.post(url, json=body, headers={"x-goog-api-key": ""})
    assert r.status_code == 403 and r.json()["error"]["status"] == "PERMISSION_DENIED"
    r = await env.http.post(url, json=body, headers={"x-goog-api-key": "wrong"})
    assert r.status_code == 400 and r.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    r = await env.http.post(url, json=body, headers={"x-goog-api-key": "", "Authorization": "Bearer ya29.token"})
    assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"

    vertex = f"{VERTEX}/gemini-2.5-flash-image:generateContent"
    jpeg_config = {"generationConfig": {"responseModalities": ["IMAGE"],
                                        "imageConfig": {"outputMimeType": "image/jpeg"}}}
    r = await env.http.post(vertex, json=body | jpeg_config, headers={"x-goog-api-key": ""})
    assert r.status_code == 401
    r = await env.http.post(vertex, json=body | jpeg_config,
                            headers={"x-goog-api-key": "", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    part = image_parts(r.json())[0]["inlineData"]
    assert part["mimeType"] == "image/jpeg" and base64.b64decode(part["data"])[:3] == b"\xff\xd8\xff"
    r = await env.http.post(f"{VERTEX}/gemini-9:generateContent", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "Publisher Model" in r.json()["error"]["message"]


async def test_timeout_after_generating_is_billed_once(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[{"kind": "timeout", "route": "generate", "after_effect": True,
                                               "delay": 1}])
    with pytest.raises(httpx.ReadTimeout):
        await env.generate(timeout=0.3)
    assert await env.creations() == 1
    await env.http.post("/_sim/faults", json=[{"kind": "500", "route": "generate", "after_effect": True}])
    r = await env.generate()
    assert r.status_code == 500 and r.json()["error"]["status"] == "INTERNAL"
    with pytest.raises(httpx.RemoteProtocolError):
        await env.generate("x [sim:drop]")
    stats = (await env.http.get("/_sim/stats")).json()
    assert stats["creations"] == 3 and sum(stats["duplicate_identities"].values()) == 2  # same request twice


async def test_errors_and_rate_limits(env: Env) -> None:
    await env.http.post("/_sim/faults", json=[{"kind": "429", "route": "generate", "retry_after": 7},
                                              {"kind": "503", "route": "generate"}])
    r = await env.generate()
    assert r.status_code == 429 and r.json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    details = {d["@type"].rsplit(".", 1)[1]: d for d in r.json()["error"]["details"]}
    assert details["RetryInfo"]["retryDelay"] == "7s" and "QuotaFailure" in details
    assert "retry-after" not in r.headers
    r = await env.generate()
    assert r.status_code == 503 and r.json()["error"] == {
        "code": 503, "message": "The model is overloaded. Please try again later.", "status": "UNAVAILABLE"}

    env.sim.config.extra |= {"images_per_minute": 1, "retry_after_header": True}
    assert (await env.generate()).status_code == 200
    r = await env.generate()
    assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60
    assert (await env.generate(model="gemini-3-pro-image")).status_code == 200  # per model
    assert await env.creations() == 2


async def test_imagen_predict(env: Env) -> None:
    r = await env.predict(sampleCount=3, aspectRatio="16:9", sampleImageSize="2K", enhancePrompt=True)
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert len(predictions) == 3 and {p["mimeType"] for p in predictions} == {"image/png"}
    images = [base64.b64decode(p["bytesBase64Encoded"]) for p in predictions]
    assert len(set(images)) == 3 and png_dims(images[0])[0] > png_dims(images[0])[1]
    assert predictions[0]["prompt"].endswith("a ceramic mug")

    r = await env.predict("x [sim:filtered=1]", sampleCount=2, includeRaiReason=True,
                          outputOptions={"mimeType": "image/jpeg"}, personGeneration="ALLOW_ADULT")
    predictions = r.json()["predictions"]
    assert "bytesBase64Encoded" in predictions[0] and predictions[0]["mimeType"] == "image/jpeg"
    assert list(predictions[1]) == ["raiFilteredReason"]
    r = await env.predict("x [sim:filtered=1]", sampleCount=2)
    assert len(r.json()["predictions"]) == 1  # filtered samples are simply missing
    r = await env.predict("x [sim:filtered]", sampleCount=2)
    assert r.status_code == 200 and r.json() == {}
    assert await env.creations() == 3  # all-filtered is not billed

    for params in ({"sampleCount": 5}, {"sampleImageSize": "2K", "model": "imagen-4.0-fast-generate-001"},
                   {"aspectRatio": "21:9"}, {"safetySetting": "block_some"}, {"seeds": 1}):
        model = params.pop("model", "imagen-4.0-ultra-generate-001")
        r = await env.predict(model=str(model), **params)
        assert r.status_code == 400, (params, r.text)
    env.sim.config.extra["imagen_strict_enum_case"] = True
    assert (await env.predict(personGeneration="ALLOW_ADULT")).status_code == 400
    assert (await env.predict(personGeneration="allow_adult")).status_code == 200


async def test_imagen_retired_on_the_gemini_api(env: Env) -> None:
    body = {"instances": [{"prompt": "x"}], "parameters": {"sampleCount": 1}}
    r = await env.http.post("/v1beta/models/imagen-4.0-generate-001:predict", json=body)
    assert r.status_code == 404 and "not supported for predict" in r.json()["error"]["message"]
    r = await env.http.post("/v1beta/models/gemini-2.5-flash-image:predict", json=body)
    assert r.status_code == 404
    env.sim.config.extra["imagen_on_gemini_api"] = True
    r = await env.http.post("/v1beta/models/imagen-4.0-generate-001:predict", json=body)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1
    r = await env.http.post("/v1beta/models/imagen-4.0-generate-001:generateContent",
                            json={"contents": [{"parts": [{"text": "x"}]}]})
    assert r.status_code == 404 and "generateContent" in r.json()["error"]["message"]
