"""The Veo (Gemini API) adapter against the Veo simulator, through the real API and worker."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from orchestrator.cli.devstack import Stack
from providers.sandbox import media
from providers.sandbox.serve import serving
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

KEY = {"x-goog-api-key": "sandbox-key"}


async def veo_job(client: httpx.AsyncClient, **input_fields: Any) -> dict[str, Any]:
    model = input_fields.pop("model", "veo-3.0-generate-001")
    body: dict[str, Any] = {"prompt": "timelapse of clouds"} | input_fields
    return await submit(client, provider="veo", kind="video", model=model, input=body)


def operation_id(job: dict[str, Any]) -> str:
    return str(job["provider_task_id"]).rsplit("/", 1)[-1]


def sim_operation(stack: Stack, job: dict[str, Any]) -> Any:
    return stack.simulators["veo"].tasks[operation_id(job)]  # type: ignore[attr-defined]


async def test_success_stores_the_file_behind_the_keyed_redirect(stack):
    async with api(stack) as client:
        job = await veo_job(client, aspect_ratio="16:9", duration_seconds=8, resolution="1080p")
        done = await wait_for(client, job["id"])
        assert done["status"] == "succeeded", done
        assert done["provider_task_id"].startswith("models/veo-3.0-generate-001/operations/")
        assert done["progress"] == 100 and done["attempts"] == 1
        (output,) = done["outputs"]
        assert output["content_type"] == "video/mp4"
        stored = (await client.get(output["url"])).content
    (file_id,) = sim_operation(stack, done).data["files"]
    async with httpx.AsyncClient() as raw:
        uri = f"{stack.simulator_url('veo')}/v1beta/files/{file_id}:download?alt=media"
        assert (await raw.get(uri)).status_code == 403  # the file needs the key
        served = await raw.get(uri, headers=KEY, follow_redirects=True)
    assert served.status_code == 200
    assert hashlib.sha256(served.content).hexdigest() == output["sha256"] == hashlib.sha256(stored).hexdigest()
    assert (await sim_stats(stack, "veo"))["requests"]["file"] == 2  # our keyless probe + the worker


async def test_content_filtered_operation_is_a_failure_with_the_reasons(stack):
    async with api(stack) as client:
        done = await wait_for(client, (await veo_job(client, prompt="clouds [sim:filtered]"))["id"])
    assert done["status"] == "failed", done
    assert done["error"]["code"] == "provider_content_filtered"
    assert "issue with the audio" in done["error"]["message"]
    detail = done["error"]["provider_detail"]
    assert detail["raiMediaFilteredCount"] == 1 and "not been charged" in detail["raiMediaFilteredReasons"][0]
    assert done["outputs"] == []


@pytest.mark.parametrize(("directive", "grpc", "text"), [("[sim:fail]", 13, "internal error"),
                                                          ("[sim:fail=3]", 3, "safety policy")])
async def test_done_with_error_is_a_failure(stack, directive, grpc, text):
    async with api(stack) as client:
        done = await wait_for(client, (await veo_job(client, prompt=f"clouds {directive}"))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_failed"
    assert text in done["error"]["message"] and f"gRPC code {grpc}" in done["error"]["message"]
    assert done["error"]["provider_detail"]["error"]["code"] == grpc


async def test_veo2_two_samples_one_filtered_keeps_the_survivor(stack):
    async with api(stack) as client:
        job = await veo_job(client, model="veo-2.0-generate-001", prompt="clouds [sim:partial]", num_outputs=2,
                            duration_seconds=5)
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    (output,) = done["outputs"]
    assert output["metadata"] == {"rai_media_filtered_count": 1}


async def test_two_samples_are_two_outputs(stack):
    async with api(stack) as client:
        job = await veo_job(client, model="veo-2.0-generate-001", num_outputs=2, duration_seconds=6,
                            aspect_ratio="9:16")
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    assert len(done["outputs"]) == 2 and len({o["sha256"] for o in done["outputs"]}) == 2


async def test_image_url_is_fetched_and_sent_inline(stack):
    png = media.png("first frame")
    hits: list[str] = []

    async def image(request: Request) -> Response:
        hits.append(request.url.path)
        return Response(png, media_type="image/png")

    app = Starlette(routes=[Route("/frame.png", image)])
    async with serving(app) as base, api(stack) as client:
        job = await veo_job(client, model="veo-3.1-generate-preview", image_url=f"{base}/frame.png",
                            options={"personGeneration": "allow_adult"})
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    assert hits == ["/frame.png"]
    created = list(stack.simulators["veo"].stats.created_by_identity)
    assert len(created) == 1 and base64.b64encode(png).decode() in created[0] and '"image/png"' in created[0]


async def test_unreachable_image_fails_before_anything_is_created(stack):
    async def missing(request: Request) -> Response:
        return Response(b"gone", status_code=404)

    async with serving(Starlette(routes=[Route("/x.png", missing)])) as base, api(stack) as client:
        done = await wait_for(client, (await veo_job(client, image_url=f"{base}/x.png"))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "input_image_unavailable"
    assert (await sim_stats(stack, "veo"))["requests"] == {}


async def test_429_burst_on_create_ends_in_success_with_one_creation(stack):
    await sim_faults(stack, "veo", {"kind": "429", "route": "create", "count": 2, "retry_after": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await veo_job(client))["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 3
    stats = await sim_stats(stack, "veo")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"create:429": 2}


async def test_errors_while_polling_and_downloading_are_retried(stack):
    await sim_faults(stack, "veo", {"kind": "429", "route": "get", "count": 1},
                     {"kind": "503", "route": "get", "count": 1},
                     {"kind": "503", "route": "download", "count": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await veo_job(client))["id"])
    assert done["status"] == "succeeded", done
    assert (await sim_stats(stack, "veo"))["creations"] == 1


@pytest.mark.parametrize(
    ("model", "fields", "field"),
    [
        ("veo-3.0-generate-001", {"duration_seconds": 5}, "input.duration_seconds"),
        ("veo-2.0-generate-001", {"duration_seconds": 4}, "input.duration_seconds"),
        ("veo-3.0-generate-001", {"resolution": "1080p", "duration_seconds": 4}, "input.duration_seconds"),
        ("veo-3.0-generate-001", {"resolution": "4k"}, "input.resolution"),
        ("veo-2.0-generate-001", {"resolution": "1080p"}, "input.resolution"),
        ("veo-3.0-generate-001", {"aspect_ratio": "1:1"}, "input.aspect_ratio"),
        ("veo-3.0-generate-001", {"options": {"aspectRatio": "4:3"}}, "input.options.aspectRatio"),
        ("veo-3.0-generate-001", {"num_outputs": 2}, "input.num_outputs"),
        ("veo-2.0-generate-001", {"seed": 7}, "input.seed"),
        ("veo-3.0-generate-001", {"options": {"generateAudio": False}}, "input.options.generateAudio"),
        ("veo-3.0-generate-001", {"options": {"durationSeconds": "8"}}, "input.options.durationSeconds"),
        ("veo-3.0-generate-001", {"options": {"personGeneration": "allow_adult"}},
         "input.options.personGeneration"),
        ("veo-3.0-generate-001", {"options": {"lastFrame": {"bytesBase64Encoded": "AA==",
                                                            "mimeType": "image/png"}}},
         "input.options.lastFrame"),
        ("veo-3.1-generate-preview", {"options": {"video": {"uri": "https://x.test/v"}}, "duration_seconds": 6},
         "input.duration_seconds"),
        ("veo-3.1-generate-preview", {"options": {"image": {"gcsUri": "gs://b/i.png"}}}, "input.options.image"),
        ("veo-3.0-generate-001", {"options": {"sampleCount": 1, "foo": 1}}, "input.options.foo"),
        ("veo-3.0-generate-001", {"prompt": None}, "input.prompt"),
        ("veo-x", {}, "model"),
    ],
)
async def test_bad_input_is_rejected_before_any_provider_request(stack, model, fields, field):
    body: dict[str, Any] = {"prompt": "clouds"} | fields
    if body.get("prompt") is None:
        body.pop("prompt")
    async with api(stack) as client:
        resp = await client.post("/v1/jobs", json={"provider": "veo", "kind": "video", "model": model,
                                                   "input": body})
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert field in [e["field"] for e in resp.json()["errors"]]
    assert (await sim_stats(stack, "veo"))["requests"] == {}


async def test_native_options_and_seed_reach_the_provider(stack):
    async with api(stack) as client:
        job = await veo_job(client, model="veo-3.1-fast-generate-preview", seed=42, negative_prompt="rain",
                            resolution="3840x2160", options={"enhancePrompt": False})
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded", done
    (created,) = stack.simulators["veo"].stats.created_by_identity
    for fragment in ('"seed": 42', '"negativePrompt": "rain"', '"resolution": "4k"', '"enhancePrompt": false'):
        assert fragment in created
    assert '"durationSeconds"' not in created  # not asked for: the provider's default (8 s) applies


async def test_cancel_is_local_and_the_note_says_the_provider_was_not_told(stack):
    async with api(stack) as client:
        job = await veo_job(client, prompt="slow clouds [sim:run=30]")
        await wait_for(client, job["id"], {"running"})
        resp = await client.post(f"/v1/jobs/{job['id']}/cancel")
        assert resp.status_code == 200 and resp.json()["status"] == "canceled"
        for _ in range(50):
            job = (await client.get(f"/v1/jobs/{job['id']}")).json()
            if job["note"] and "no cancel endpoint" in job["note"]:
                break
            await asyncio.sleep(0.1)
    assert job["status"] == "canceled" and "veo has no cancel endpoint" in job["note"]


async def test_ambiguous_create_fails_without_resubmitting(stack):
    # Veo has no list endpoint: the operation that was created cannot be found, and is not paid for twice.
    await sim_faults(stack, "veo", {"kind": "500", "route": "create", "count": 1, "after_effect": True})
    async with api(stack) as client:
        done = await wait_for(client, (await veo_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown"
    stats = await sim_stats(stack, "veo")
    assert stats["creations"] == 1 and stats["requests"]["create"] == 1


async def test_expired_file_fails_the_job_as_expired(stack):
    stack.simulators["veo"].config.output_ttl_seconds = 0.0
    async with api(stack) as client:
        done = await wait_for(client, (await veo_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired"


async def test_download_headers_give_the_key_only_to_googles_host(stack):
    from orchestrator.services.runtime import Runtime
    from providers.contract import CallContext

    rt = await Runtime.open(stack.settings)
    try:
        veo = rt.registry.get("veo")
        assert veo is not None
        ctx = CallContext(http=rt.http, api_key="AIza-test")
        base = stack.simulator_url("veo")
        assert veo.download_headers(ctx, f"{base}/v1beta/files/abc:download?alt=media") == {
            "x-goog-api-key": "AIza-test"}
        assert veo.download_headers(
            ctx, "https://generativelanguage.googleapis.com/v1beta/files/abc:download?alt=media") == {
            "x-goog-api-key": "AIza-test"}
        assert veo.download_headers(ctx, "https://storage.googleapis.com/bucket/abc.mp4?sig=1") == {}
    finally:
        await rt.close()


def test_operation_shapes_beyond_the_simulator():
    from providers.contract import ProviderSettings
    from providers.veo import VeoProvider

    veo = VeoProvider(ProviderSettings(name="veo", base_url="https://generativelanguage.googleapis.com"))
    assert veo.parse_operation({"name": "models/m/operations/1", "done": False}).state == "running"
    assert veo.parse_operation({"name": "models/m/operations/1", "done": "soon"}).state == "unknown"
    named = veo.parse_operation({"done": True, "response": {"generateVideoResponse": {
        "generatedSamples": [{"video": {"uri": "files/abc"}}]}}})
    assert [o.url for o in named.outputs] == [
        "https://generativelanguage.googleapis.com/v1beta/files/abc:download?alt=media"]
    legacy = veo.parse_operation({"done": True, "response": {"generatedVideos": [
        {"video": {"encodedVideo": "AAAA", "encoding": "video/mp4"}}]}})
    assert [o.url for o in legacy.outputs] == ["data:video/mp4;base64,AAAA"]
    empty = veo.parse_operation({"done": True, "response": {"generateVideoResponse": {}}})
    assert empty.state == "failed" and empty.error_code == "provider_no_output"


async def test_api_version_v1_is_used_on_every_route(stack):
    """``ATELIER_VEO_API_VERSION=v1``: create, poll and file download all go through ``/v1``."""
    from providers.contract import CallContext, GenerationRequest, MediaInput, MediaKind, ProviderSettings, TaskRef
    from providers.veo import VeoProvider

    base = stack.simulator_url("veo")
    veo = VeoProvider(ProviderSettings(name="veo", base_url=base, api_keys=["sandbox-key"],
                                       extra={"api_version": "v1"}))
    request = GenerationRequest(kind=MediaKind.video, model="veo-3.0-fast-generate-001",
                                input=MediaInput(prompt="a lighthouse at dusk [sim:run=0.2]"))
    async with httpx.AsyncClient() as http:
        ctx = CallContext(http=http, api_key="sandbox-key")
        created = await veo.submit(ctx, request)
        assert sim_operation(stack, {"provider_task_id": created.task_id}).data["api_version"] == "v1"
        status = await veo.fetch(ctx, TaskRef(task_id=created.task_id, request=request))
        for _ in range(50):
            if status.state == "succeeded":
                break
            await asyncio.sleep(0.1)
            status = await veo.fetch(ctx, TaskRef(task_id=created.task_id, request=request))
        assert status.state == "succeeded", status
        (url,) = [o.url for o in status.outputs]
        assert "/v1/files/" in url and "/v1beta/" not in url, url
    with pytest.raises(ValueError, match="v1beta, v1"):
        VeoProvider(ProviderSettings(name="veo", base_url=base, extra={"api_version": "v2"}))
