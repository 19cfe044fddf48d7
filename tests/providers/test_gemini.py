"""The Gemini image / Imagen adapter against the Gemini simulator, through the real API and worker.

Gemini answers the image inline and keeps nothing, so where a test compares bytes or reads what the
adapter sent, the adapter talks to the simulator through a recording reverse proxy (real HTTP both
ways): the stored output must be exactly the image the simulator answered.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.cli.devstack import Stack, dev_stack
from providers.gemini import parse_generate_content
from providers.sandbox import media
from providers.sandbox.serve import serving
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

FLASH = "gemini-2.5-flash-image"
PRO = "gemini-3-pro-image-preview"
IMAGEN = "imagen-4.0-generate-001"


@dataclass
class Exchange:
    path: str
    headers: dict[str, str]
    request: dict[str, Any]
    status: int
    answer: bytes


class Recorder:
    """A reverse proxy in front of the simulator that keeps each request and answer."""

    def __init__(self) -> None:
        self.target = ""
        self.exchanges: list[Exchange] = []
        self.app = Starlette(routes=[Route("/{path:path}", self.forward, methods=["POST"])])

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k in ("x-goog-api-key", "authorization",
                                                                     "content-type")}
        async with httpx.AsyncClient(timeout=30) as client:
            answer = await client.post(self.target + request.url.path, content=body, headers=headers)
        self.exchanges.append(Exchange(request.url.path, headers, json.loads(body), answer.status_code,
                                       answer.content))
        return Response(answer.content, status_code=answer.status_code,
                        media_type=answer.headers.get("content-type"))

    def only(self) -> Exchange:
        (exchange,) = self.exchanges
        return exchange


@contextlib.asynccontextmanager
async def recorded_stack(redis_url: str, **extra: Any) -> AsyncIterator[tuple[Stack, Recorder]]:
    recorder = Recorder()
    async with serving(recorder.app) as proxy:
        providers_file = {"gemini": {"base_url": proxy, "api_keys": ["sandbox-key"], "extra": extra}}
        async with dev_stack(redis_url=redis_url, log_format="text", providers_file=providers_file) as stack:
            recorder.target = stack.simulator_url("gemini")
            yield stack, recorder


async def gemini_job(client: httpx.AsyncClient, model: str = FLASH, **body: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"prompt": "a red fox in the snow"} | body.pop("input", {})
    job = await submit(client, provider="gemini", kind="image", model=model, input=fields, **body)
    return await wait_for(client, job["id"])


def image_parts(answer: bytes) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = json.loads(answer)["candidates"][0]["content"]["parts"]
    return [p for p in parts if "inlineData" in p and not p.get("thought")]


async def stored(client: httpx.AsyncClient, output: dict[str, Any]) -> bytes:
    served = await client.get(output["url"])
    assert served.status_code == 200
    assert hashlib.sha256(served.content).hexdigest() == output["sha256"]
    return served.content


# -- success ------------------------------------------------------------------------------------


async def test_success_stores_the_image_the_simulator_answered(redis_url: str) -> None:
    async with recorded_stack(redis_url) as (stack, recorder), api(stack) as client:
        done = await gemini_job(client, input={"aspect_ratio": "16:9", "resolution": "1k", "seed": 7})
        assert done["status"] == "succeeded", done
        (output,) = done["outputs"]
        data = await stored(client, output)
        assert done["attempts"] == 1 and (await sim_stats(stack, "gemini"))["creations"] == 1
    exchange = recorder.only()
    assert exchange.path == f"/v1beta/models/{FLASH}:generateContent"
    assert exchange.headers["x-goog-api-key"] == "sandbox-key"
    assert exchange.request == {
        "contents": [{"role": "user", "parts": [{"text": "a red fox in the snow"}]}],
        "generationConfig": {"responseModalities": ["IMAGE"], "seed": 7, "imageConfig": {"aspectRatio": "16:9"}},
    }  # no imageSize for 2.5 Flash, which has no size choice
    (part,) = image_parts(exchange.answer)
    assert data == base64.b64decode(part["inlineData"]["data"])
    answer = json.loads(exchange.answer)
    assert done["provider_task_id"] == answer["responseId"] and done["provider_status"] == "STOP"
    assert output["content_type"] == "image/png" and output["width"] > output["height"]
    meta = output["metadata"]
    assert meta["usage_metadata"] == answer["usageMetadata"] and meta["model_version"] == FLASH
    assert meta["usage_metadata"]["candidatesTokensDetails"] == [{"modality": "IMAGE", "tokenCount": 1290}]


async def test_gemini_3_skips_thought_images_and_keeps_the_text(redis_url: str) -> None:
    async with recorded_stack(redis_url, api_version="v1") as (stack, recorder), api(stack) as client:
        stack.simulators["gemini"].config.extra["snake_case_inline_data"] = True  # as some gateways answer
        done = await gemini_job(client, PRO, input={
            "prompt": "a lighthouse at dusk [sim:thought=2]", "resolution": "2048x2048",
            "options": {"responseModalities": ["TEXT", "IMAGE"], "personGeneration": "ALLOW_ADULT"}})
        assert done["status"] == "succeeded", done
        (output,) = done["outputs"]
        data = await stored(client, output)
    exchange = recorder.only()
    assert exchange.path == f"/v1/models/{PRO}:generateContent"
    config = exchange.request["generationConfig"]
    assert config == {"responseModalities": ["TEXT", "IMAGE"],
                      "imageConfig": {"imageSize": "2K", "personGeneration": "ALLOW_ADULT"}}
    parts = json.loads(exchange.answer)["candidates"][0]["content"]["parts"]
    assert [bool(p.get("thought")) for p in parts] == [False, True, True, False]
    assert data == base64.b64decode(parts[-1]["inline_data"]["data"])  # the final image, not a thought
    assert (output["width"], output["height"]) == (64, 64)  # a 2K image at the simulator's 1/32 scale
    meta = output["metadata"]
    assert meta["text"] == "Here is the image you asked for." and meta["thought_signature"]
    assert meta["usage_metadata"]["thoughtsTokenCount"] > 0


async def test_a_replicate_image_and_option_images_are_sent_inline(redis_url: str) -> None:
    second = media.png("a second reference")

    async def reference(request: Request) -> Response:
        return Response(second, media_type="image/png")

    async with recorded_stack(redis_url) as (stack, recorder), api(stack) as client, \
            serving(Starlette(routes=[Route("/ref.png", reference)])) as images:
        source = await wait_for(client, (await submit(client, input={"prompt": "a glass bottle"}))["id"])
        assert source["status"] == "succeeded", source
        source_bytes = await stored(client, source["outputs"][0])
        done = await gemini_job(client, PRO, source={"job_id": source["id"]}, input={
            "prompt": "put this bottle on a marble counter", "options": {"images": [f"{images}/ref.png"]}})
        assert done["status"] == "succeeded", done
        assert done["source"] == {"job_id": source["id"], "output": 0} and done["operation"] == "generate"
    text, first, other = recorder.only().request["contents"][0]["parts"]
    assert text == {"text": "put this bottle on a marble counter"}
    assert first["inline_data"]["mime_type"] == other["inline_data"]["mime_type"] == "image/png"
    assert base64.b64decode(first["inline_data"]["data"]) == source_bytes  # the source's stored output
    assert base64.b64decode(other["inline_data"]["data"]) == second


# -- answers without an image (HTTP 200) ------------------------------------------------------------


@pytest.mark.parametrize(("directive", "code", "raw", "text"), [
    ("[sim:block=PROHIBITED_CONTENT]", "content_policy", "blockReason=PROHIBITED_CONTENT", "blocked the prompt"),
    ("[sim:block]", "content_policy", "blockReason=SAFETY", "blocked the prompt"),
    ("[sim:finish=IMAGE_SAFETY]", "content_policy", "IMAGE_SAFETY", "refused to draw"),
    ("[sim:finish=NO_IMAGE]", "provider_no_output", "NO_IMAGE", "without an image"),
    ("[sim:text_only]", "provider_no_output", "STOP", "describe the scene in words"),
])
async def test_no_image_in_a_200_fails_the_job(stack: Stack, directive: str, code: str, raw: str,
                                                text: str) -> None:
    async with api(stack) as client:
        done = await gemini_job(client, input={"prompt": f"a fox {directive}"})
    assert done["status"] == "failed", done
    assert done["error"]["code"] == code and text in done["error"]["message"]
    assert done["provider_status"] == raw and done["outputs"] == []
    assert done["attempts"] == 1 and (await sim_stats(stack, "gemini"))["creations"] == 0


# -- errors -----------------------------------------------------------------------------------------


async def test_503_and_429_then_success_bill_one_generation(stack: Stack) -> None:
    await sim_faults(stack, "gemini", {"kind": "503", "route": "generate"},
                     {"kind": "429", "route": "generate", "retry_after": 1})
    async with api(stack) as client:
        done = await gemini_job(client)
    assert done["status"] == "succeeded" and done["attempts"] == 3, done
    stats = await sim_stats(stack, "gemini")
    assert stats["creations"] == 1 and stats["requests"]["generate"] == 3
    assert stats["faults_injected"] == {"generate:503": 1, "generate:429": 1}


async def test_malformed_answer_fails_without_a_resend(stack: Stack) -> None:
    await sim_faults(stack, "gemini", {"kind": "malformed", "route": "generate", "after_effect": True})
    async with api(stack) as client:
        done = await gemini_job(client)
    assert done["status"] == "failed" and done["error"]["code"] == "provider_malformed_response", done
    assert "not resubmitted" in done["error"]["message"]
    stats = await sim_stats(stack, "gemini")
    assert stats["creations"] == 1 and stats["requests"]["generate"] == 1


@pytest.mark.parametrize("fault", [{"kind": "timeout", "delay": 1.5}, {"kind": "500"}])
async def test_ambiguous_create_is_never_resent(redis_url: str, fault: dict[str, Any]) -> None:
    providers_file = {"gemini": {"request_timeout_seconds": 0.5}}
    async with dev_stack(redis_url=redis_url, log_format="text", providers_file=providers_file) as stack, \
            api(stack) as client:
        await sim_faults(stack, "gemini", fault | {"route": "generate", "after_effect": True})
        done = await gemini_job(client, input={"prompt": "a red fox [sim:run=0.05]"})
        assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown", done
        stats = await sim_stats(stack, "gemini")
        assert stats["creations"] == 1 and stats["requests"]["generate"] == 1  # billed once, never resent

        await sim_faults(stack, "gemini", fault | {"route": "generate", "after_effect": True})
        done = await gemini_job(client, input={"prompt": "a fox [sim:run=0.05]"}, retry_unknown_submissions=True)
        assert done["status"] == "succeeded" and done["attempts"] == 2, done  # opted in: resent exactly once
        stats = await sim_stats(stack, "gemini")
        assert stats["creations"] == 3 and stats["requests"]["generate"] == 3


async def test_a_refused_key_leaves_the_pool(stack: Stack) -> None:
    stack.simulators["gemini"].config.api_keys = ["AIza-the-only-good-key"]
    async with api(stack) as client:
        done = await gemini_job(client)
    assert done["status"] == "failed" and done["error"]["code"] == "provider_auth_failed", done
    assert "API_KEY_INVALID" in done["error"]["message"]


async def test_unknown_model_at_the_provider_is_model_not_found(redis_url: str) -> None:
    async with recorded_stack(redis_url, api_version="v1alpha") as (stack, recorder), api(stack) as client:
        done = await gemini_job(client)
    assert done["status"] == "failed" and done["error"]["code"] == "model_not_found", done
    assert recorder.only().path == f"/v1alpha/models/{FLASH}:generateContent"  # the simulator serves no v1alpha


# -- Imagen 4 ---------------------------------------------------------------------------------------


async def test_imagen_on_the_gemini_api_says_where_it_is_served(stack: Stack) -> None:
    async with api(stack) as client:
        done = await gemini_job(client, IMAGEN, input={"prompt": "a ceramic mug"})
        assert done["status"] == "failed" and done["error"]["code"] == "model_not_found", done
        message = done["error"]["message"]
        assert "Vertex AI" in message and 'imagen_route = "vertex"' in message and "vertex_project" in message
        assert (await sim_stats(stack, "gemini"))["creations"] == 0

        stack.simulators["gemini"].config.extra["imagen_on_gemini_api"] = True  # e.g. a gateway still serves it
        done = await gemini_job(client, IMAGEN, input={"prompt": "a ceramic mug"})
    assert done["status"] == "succeeded" and len(done["outputs"]) == 1, done


async def test_imagen_on_vertex_keeps_the_survivors_of_the_filter(redis_url: str) -> None:
    model = "imagen-4.0-ultra-generate-001"
    async with recorded_stack(redis_url, imagen_route="vertex", vertex_project="proj") as (stack, recorder), \
            api(stack) as client:
        done = await gemini_job(client, model, input={
            "prompt": "a ceramic mug [sim:filtered=1]", "num_outputs": 3, "aspect_ratio": "16:9",
            "resolution": "2k", "seed": 5, "negative_prompt": "text",
            "options": {"personGeneration": "ALLOW_ADULT", "enhancePrompt": True}})
        assert done["status"] == "succeeded", done
        data = [await stored(client, output) for output in done["outputs"]]
        filtered = await gemini_job(client, model, input={"prompt": "a mug [sim:filtered]", "num_outputs": 2})
        assert (await sim_stats(stack, "gemini"))["creations"] == 1  # the all-filtered call is not billed
    assert filtered["status"] == "failed" and filtered["error"]["code"] == "content_policy", filtered
    assert "usage guidelines" in filtered["error"]["message"]

    exchange = recorder.exchanges[0]
    assert exchange.path == f"/v1/projects/proj/locations/us-central1/publishers/google/models/{model}:predict"
    assert exchange.headers["x-goog-api-key"] == "sandbox-key"
    assert exchange.request == {"instances": [{"prompt": "a ceramic mug [sim:filtered=1]"}], "parameters": {
        "sampleCount": 3, "aspectRatio": "16:9", "sampleImageSize": "2K", "negativePrompt": "text", "seed": 5,
        "personGeneration": "allow_adult", "enhancePrompt": True, "includeRaiReason": True}}
    predictions = json.loads(exchange.answer)["predictions"]
    assert data == [base64.b64decode(p["bytesBase64Encoded"]) for p in predictions if "bytesBase64Encoded" in p]
    meta = done["outputs"][0]["metadata"]
    assert meta["rai_filtered_count"] == 1 and meta["enhanced_prompt"].endswith("a ceramic mug [sim:filtered=1]")


# -- validation -------------------------------------------------------------------------------------


async def test_bad_input_is_refused_before_any_provider_request(stack: Stack) -> None:
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("gemini-9-image", {}, "model"),
        (FLASH, {"resolution": "2k"}, "input.resolution"),
        (FLASH, {"resolution": "1080p"}, "input.resolution"),
        (FLASH, {"aspect_ratio": "1:4"}, "input.aspect_ratio"),
        (PRO, {"options": {"imageSize": "2k"}}, "input.options.imageSize"),
        ("gemini-3.1-flash-lite-image", {"resolution": "2k"}, "input.resolution"),
        (FLASH, {"num_outputs": 2}, "input.num_outputs"),
        (FLASH, {"negative_prompt": "rain"}, "input.negative_prompt"),
        (FLASH, {"options": {"responseModalities": ["TEXT"]}}, "input.options.responseModalities"),
        (FLASH, {"options": {"personGeneration": "allow_all"}}, "input.options.personGeneration"),
        (FLASH, {"options": {"outputMimeType": "image/jpeg"}}, "input.options.outputMimeType"),
        (FLASH, {"options": {"candidateCount": 2}}, "input.options.candidateCount"),
        (FLASH, {"options": {"images": "https://x.test/a.png"}}, "input.options.images"),
        (PRO, {"options": {"images": [f"https://x.test/{i}.png" for i in range(15)]}}, "input.options.images"),
        (IMAGEN, {"image_url": "https://x.test/a.png"}, "input.image_url"),
        (IMAGEN, {"seed": 3}, "input.seed"),  # refused by the Gemini API route (Vertex takes it)
        (IMAGEN, {"aspect_ratio": "21:9"}, "input.aspect_ratio"),
        ("imagen-4.0-fast-generate-001", {"resolution": "2k"}, "input.resolution"),
        (IMAGEN, {"options": {"storageUri": "gs://b/p"}}, "input.options.storageUri"),
        (IMAGEN, {"options": {"safetySetting": "block_some"}}, "input.options.safetySetting"),
        (FLASH, {"prompt": None}, "input.prompt"),
    ]
    async with api(stack) as client:
        for model, fields, field in cases:
            body = {k: v for k, v in ({"prompt": "a fox"} | fields).items() if v is not None}
            resp = await client.post("/v1/jobs", json={"provider": "gemini", "kind": "image", "model": model,
                                                       "input": body})
            assert resp.status_code == 422, (model, fields, resp.text)
            assert field in [e["field"] for e in resp.json()["errors"]], (field, resp.json())
        video = await wait_for(client, (await submit(client, provider="veo", kind="video",
                                                     model="veo-3.0-generate-001",
                                                     input={"prompt": "clouds"}))["id"], timeout=60)
        resp = await client.post("/v1/jobs", json={"provider": "gemini", "kind": "image", "model": FLASH,
                                                   "source": {"job_id": video["id"]}, "input": {"prompt": "x"}})
        assert resp.status_code == 422 and resp.json()["errors"][0]["field"] == "source", resp.text
    assert (await sim_stats(stack, "gemini"))["requests"] == {}


# -- gateways ---------------------------------------------------------------------------------------


def test_a_gateways_markdown_image_in_the_text_is_an_output() -> None:
    png = base64.b64encode(media.png("gateway")).decode()
    status = parse_generate_content({"candidates": [{"finishReason": "STOP", "content": {"parts": [
        {"text": f"Here it is: ![image](data:image/png;base64,{png})"}]}}]})
    assert status.state == "succeeded"
    assert [(o.url, o.content_type) for o in status.outputs] == [(f"data:image/png;base64,{png}", "image/png")]
    linked = parse_generate_content({"candidates": [{"content": {"parts": [
        {"text": "![image](https://cdn.gateway.test/a.png)"}]}}]})
    assert [o.url for o in linked.outputs] == ["https://cdn.gateway.test/a.png"]
