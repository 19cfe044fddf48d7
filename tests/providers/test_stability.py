"""The Stability adapter against the Stability simulator, through the real API and worker.

Generation is synchronous (the answer is the image's bytes, or JSON base64, with a refusal possible
inside the 200); creative upscale and replace-background-and-relight are asynchronous follow-ups
polled at ``/v2beta/results/{id}``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from orchestrator.cli.devstack import Stack, dev_stack
from providers.contract import CallContext, GenerationRequest, MediaInput, MediaKind, ProviderSettings, TaskRef
from providers.errors import TaskNotFound
from providers.sandbox import media
from providers.sandbox.stability import Form, StabilitySimulator
from providers.stability import StabilityProvider
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

RUN = 0.05  # the simulator's hold time per synchronous request (seconds)


@pytest.fixture
async def stab(stack: Stack) -> Stack:
    sim(stack).config.run_seconds = RUN
    return stack


@pytest.fixture
async def json_stack(redis_url: str) -> AsyncIterator[Stack]:
    """A stack that asks Stability for JSON answers, and whose requests time out after 1 s."""
    table = {"stability": {"accept": "application/json", "request_timeout_seconds": 1.0}}
    async with dev_stack(redis_url=redis_url, log_format="text", providers_file=table) as stack:
        sim(stack).config.run_seconds = RUN
        yield stack


def sim(stack: Stack) -> StabilitySimulator:
    simulator = stack.simulators["stability"]
    assert isinstance(simulator, StabilitySimulator)
    return simulator


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def part_data(form: Form, name: str) -> bytes:
    part = form.part(name)
    assert part is not None, name
    return part.data


async def stability_job(client: httpx.AsyncClient, model: str = "stable-image-core", operation: str = "generate",
                        **fields: Any) -> dict[str, Any]:
    extra = {key: fields.pop(key) for key in ("source", "retry_unknown_submissions") if key in fields}
    body: dict[str, Any] = {"prompt": "a lighthouse on a cliff, golden hour"} | fields
    return await submit(client, provider="stability", kind="image", model=model, operation=operation,
                        input=body, **extra)


def record(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[str, Form]], list[bytes]]:
    """Every form the simulator parsed (with the last part of its path) and every image it answered."""
    forms: list[tuple[str, Form]] = []
    images: list[bytes] = []
    simulator = sim(stack)
    parse, answer = simulator._form, simulator.image_response

    async def parsed(request: Request) -> Form:
        form = await parse(request)
        forms.append((request.url.path.rsplit("/", 1)[-1], form))
        return form

    def answered(request: Request, data: bytes, *args: Any, **kwargs: Any) -> Response:
        images.append(data)
        return answer(request, data, *args, **kwargs)

    monkeypatch.setattr(simulator, "_form", parsed)
    monkeypatch.setattr(simulator, "image_response", answered)
    return forms, images


async def result_bytes(stack: Stack, generation_id: str) -> bytes:
    async with httpx.AsyncClient() as http:
        resp = await http.get(f"{stack.simulator_url('stability')}/v2beta/results/{generation_id}",
                              headers={"Authorization": "Bearer sandbox-key", "Accept": "image/*"})
    assert resp.status_code == 200
    return resp.content


# -- synchronous generation ----------------------------------------------------------------------

async def test_generate_stores_the_answered_bytes(stab: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    forms, images = record(stab, monkeypatch)
    async with api(stab) as client:
        core = await stability_job(client, aspect_ratio="16:9", seed=7, negative_prompt="fog",
                                   options={"output_format": "webp", "style_preset": "photographic"})
        sd3 = await stability_job(client, model="sd3.5-large-turbo", options={"cfg_scale": 4})
        core, sd3 = [await wait_for(client, j["id"]) for j in (core, sd3)]
        stored = [(await client.get(j["outputs"][0]["url"])).content for j in (core, sd3)]
    for done in (core, sd3):
        assert done["status"] == "succeeded" and done["progress"] == 100, done
        assert done["provider_task_id"] == done["id"] and len(done["provider_request_id"]) == 32
    assert sorted(sha(b) for b in images) == sorted(sha(b) for b in stored) == sorted(
        j["outputs"][0]["sha256"] for j in (core, sd3))
    out = core["outputs"][0]
    assert out["content_type"] == "image/webp" and (out["width"], out["height"]) == (104, 60)  # 1664x960 / 16
    assert out["metadata"] == {"operation": "generate", "finish_reason": "SUCCESS", "seed": "7"}
    sent = {path: {p.name: p.data.decode() for p in form.parts} for path, form in forms}
    assert sent["core"] == {"prompt": "a lighthouse on a cliff, golden hour", "aspect_ratio": "16:9",
                            "output_format": "webp", "style_preset": "photographic", "negative_prompt": "fog",
                            "seed": "7"}
    assert sent["sd3"] == {"prompt": "a lighthouse on a cliff, golden hour", "model": "sd3.5-large-turbo",
                           "cfg_scale": "4"}
    stats = await sim_stats(stab, "stability")
    assert stats["creations"] == 2 and stats["requests"] == {"generate": 2}


async def test_image_to_image_sends_a_source_jobs_stored_output(stab: Stack,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    forms, _ = record(stab, monkeypatch)
    async with api(stab) as client:
        source = await wait_for(client, (await submit(client))["id"])  # a replicate image job
        job = await stability_job(client, model="stable-image-ultra", source={"job_id": source["id"]},
                                  options={"strength": 0.6})
        sd3 = await stability_job(client, model="sd3.5-medium", source={"job_id": source["id"]},
                                  options={"strength": 0.3})
        done, done_sd3 = [await wait_for(client, j["id"]) for j in (job, sd3)]
    assert done["status"] == done_sd3["status"] == "succeeded", (done, done_sd3)
    assert (done["outputs"][0]["width"], done["outputs"][0]["height"]) == (2, 2)  # the 32x32 source, / 16
    sent = dict(forms)
    for path in ("ultra", "sd3"):
        assert sha(part_data(sent[path], "image")) == source["outputs"][0]["sha256"]
    assert sent["ultra"].text("strength") == "0.6" and sent["sd3"].text("mode") == "image-to-image"


async def test_content_refusals_fail_with_content_policy_and_store_nothing(stab: Stack) -> None:
    async with api(stab) as client:
        jobs = [await stability_job(client, prompt=f"something dubious {d}")
                for d in ("[sim:filtered]", "[sim:moderated]", "[sim:reject]")]
        filtered, moderated, rejected = [await wait_for(client, j["id"]) for j in jobs]
    assert filtered["status"] == "failed" and filtered["error"]["code"] == "content_policy", filtered
    assert "CONTENT_FILTERED" in filtered["error"]["message"] and filtered["outputs"] == []
    assert moderated["status"] == "failed" and moderated["error"]["code"] == "content_policy", moderated
    assert "flagged by our content moderation" in moderated["error"]["message"]
    assert rejected["status"] == "failed" and rejected["error"]["code"] == "provider_rejected_input", rejected
    assert (await sim_stats(stab, "stability"))["creations"] == 1  # the blurred one was generated (not charged)
    assert sim(stab).credits_used == 0


async def test_rate_limit_then_success_bills_one_generation(stab: Stack) -> None:
    await sim_faults(stab, "stability", {"kind": "429", "route": "generate", "count": 1, "retry_after": 1})
    async with api(stab) as client:
        done = await wait_for(client, (await stability_job(client))["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    stats = await sim_stats(stab, "stability")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"generate:429": 1}


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        ({"extra": {"credits": 0}}, "provider_insufficient_balance"),  # 402
        ({"api_keys": ["sk-not-the-sandbox-key"]}, "provider_auth_failed"),  # 401
    ],
)
async def test_account_refusals_fail_without_a_generation(stab: Stack, setup: dict[str, Any], code: str) -> None:
    sim(stab).config.extra.update(setup.get("extra", {}))
    sim(stab).config.api_keys = setup.get("api_keys", [])
    async with api(stab) as client:
        done = await wait_for(client, (await stability_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == code, done
    assert (await sim_stats(stab, "stability"))["creations"] == 0


async def test_malformed_answer_after_the_image_was_made_is_never_resent(stab: Stack) -> None:
    await sim_faults(stab, "stability", {"kind": "malformed", "route": "generate", "after_effect": True})
    async with api(stab) as client:
        done = await wait_for(client, (await stability_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_malformed_response", done
    stats = await sim_stats(stab, "stability")
    assert stats["creations"] == 1 and stats["requests"] == {"generate": 1}


async def test_json_answers_and_an_ambiguous_timeout(json_stack: Stack) -> None:
    await sim_faults(json_stack, "stability",
                     {"kind": "timeout", "route": "generate", "after_effect": True, "delay": 2.5})
    async with api(json_stack) as client:
        lost = await wait_for(client, (await stability_job(client))["id"])
        json_ok = await wait_for(client, (await stability_job(client, model="stable-image-ultra",
                                                              options={"output_format": "jpeg"}))["id"])
        filtered = await wait_for(client, (await stability_job(client, prompt="dubious [sim:filtered]"))["id"])
    assert lost["status"] == "failed" and lost["error"]["code"] == "provider_outcome_unknown", lost
    assert lost["attempts"] == 1 and "retry_unknown_submissions" in lost["error"]["message"]
    assert json_ok["status"] == "succeeded" and json_ok["outputs"][0]["content_type"] == "image/jpeg", json_ok
    assert filtered["status"] == "failed" and filtered["error"]["code"] == "content_policy", filtered
    stats = await sim_stats(json_stack, "stability")
    assert stats["creations"] == 3 and stats["requests"] == {"generate": 3}  # the lost one billed once, not resent


# -- asynchronous follow-ups -------------------------------------------------------------------

async def test_creative_upscale_of_a_replicate_image_is_polled_and_collected(
        stab: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    forms, _ = record(stab, monkeypatch)
    async with api(stab) as client:
        source = await wait_for(client, (await submit(client))["id"])
        job = await stability_job(client, operation="upscale", source={"job_id": source["id"]},
                                  prompt="a red fox, crisp fur", seed=11,
                                  options={"creativity": 0.3, "output_format": "png"})
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded" and done["operation"] == "upscale", done
    generation_id = done["provider_task_id"]
    assert len(generation_id) == 64 and generation_id in sim(stab).tasks
    assert done["outputs"][0]["sha256"] == sha(await result_bytes(stab, generation_id))
    assert done["outputs"][0]["metadata"] == {"operation": "upscale", "finish_reason": "SUCCESS", "seed": "11"}
    ((path, form),) = forms
    assert path == "creative" and sha(part_data(form, "image")) == source["outputs"][0]["sha256"]
    assert (form.text("prompt"), form.text("creativity"), form.text("seed")) == ("a red fox, crisp fur", "0.3", "11")
    stats = await sim_stats(stab, "stability")
    assert stats["creations"] == 1 and stats["requests"]["submit"] == 1 and stats["requests"]["result"] >= 2


async def test_replace_background_and_relight_of_a_stability_image(stab: Stack,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    async with api(stab) as client:
        source = await wait_for(client, (await stability_job(client, prompt="a product photo of a mug"))["id"])
        assert source["status"] == "succeeded", source
        base = stab.simulator_url("stability")
        reference = base + sim(stab).files.publish(media.png("beach", 64, 64), "image/png", "beach.png")
        forms, _ = record(stab, monkeypatch)
        ref = {"job_id": source["id"]}
        jobs = [
            await stability_job(client, operation="replace_background", source=ref, prompt="a sunny beach",
                                options={"light_source_direction": "above", "light_source_strength": 0.7,
                                         "keep_original_background": False}),
            await stability_job(client, operation="replace_background", source=ref, prompt=None,
                                options={"background_reference": reference}),
            await stability_job(client, operation="replace_background", source=ref, prompt="beach [sim:filtered]"),
            await stability_job(client, operation="upscale", source=ref, prompt="mug [sim:fail]"),
        ]
        relit, referenced, filtered, failed = await asyncio.gather(*(wait_for(client, j["id"]) for j in jobs))
    assert relit["status"] == referenced["status"] == "succeeded", (relit, referenced)
    assert relit["outputs"][0]["sha256"] == sha(await result_bytes(stab, relit["provider_task_id"]))
    assert filtered["status"] == "failed" and filtered["error"]["code"] == "content_policy", filtered
    assert failed["status"] == "failed" and failed["error"]["code"] == "provider_failed", failed
    sent = {form.text("background_prompt"): form for path, form in forms if path != "creative"}
    assert sha(part_data(sent["a sunny beach"], "subject_image")) == source["outputs"][0]["sha256"]
    assert sent["a sunny beach"].text("light_source_direction") == "above"
    assert sent["a sunny beach"].text("keep_original_background") == "false"
    assert part_data(sent[None], "background_reference") == media.png("beach", 64, 64)


async def test_an_expired_result_fails_as_output_expired(stab: Stack) -> None:
    sim(stab).config.extra["result_ttl_seconds"] = 0.0  # gone the moment it is done
    async with api(stab) as client:
        source = await wait_for(client, (await submit(client))["id"])
        job = await stability_job(client, operation="upscale", source={"job_id": source["id"]},
                                  prompt="fur [sim:run=2]")
        done = await wait_for(client, job["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired", done
    assert "kept 24 hours" in done["error"]["message"]


async def test_follow_ups_and_inputs_are_refused_naming_the_field(stab: Stack) -> None:
    async with api(stab) as client:
        image = await wait_for(client, (await submit(client))["id"])
        running = await submit(client, input={"prompt": "a slow fox [sim:run=30]"})

        async def refused(model: str, operation: str, body: dict[str, Any], status: int, field: str) -> None:
            payload = {"provider": "stability", "kind": "image", "model": model, "operation": operation,
                       "input": {"prompt": "x"}} | body
            resp = await client.post("/v1/jobs", json=payload)
            assert resp.status_code == status, (model, operation, body, resp.text)
            assert [e["field"] for e in resp.json()["errors"]] == [field], (model, operation, body, resp.text)

        src = {"source": {"job_id": image["id"]}}
        core = "stable-image-core"
        await refused(core, "relight", src, 422, "operation")
        await refused(core, "upscale", {}, 422, "source")
        await refused(core, "upscale", {"source": {"job_id": running["id"]}}, 409, "source.job_id")
        await refused(core, "upscale", src | {"input": {"prompt": "x", "image_url": "https://example.com/a.png"}},
                      422, "input.image_url")
        await refused(core, "upscale", src | {"input": {}}, 422, "input.prompt")
        await refused(core, "replace_background", src | {"input": {}}, 422, "input.prompt")
        await refused(core, "replace_background", src | {"input": {"prompt": "x", "options": {"cfg_scale": 3}}},
                      422, "input.options.cfg_scale")
        await refused(core, "generate", src, 422, "source")  # core is text-to-image only
        await refused("stable-image-ultra", "generate", src, 422, "input.options.strength")
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("stable-image-xl", {}, "model"),
            (core, {"prompt": ""}, "input.prompt"),
            (core, {"aspect_ratio": "4:3"}, "input.aspect_ratio"),
            (core, {"resolution": "1024x1024"}, "input.resolution"),
            (core, {"num_outputs": 2}, "input.num_outputs"),
            (core, {"seed": 2**32 - 1}, "input.seed"),
            (core, {"options": {"cfg_scale": 5}}, "input.options.cfg_scale"),
            (core, {"options": {"output_format": "gif"}}, "input.options.output_format"),
            ("sd3.5-large", {"options": {"cfg_scale": 11}}, "input.options.cfg_scale"),
            ("sd3.5-large", {"options": {"strength": 0.5}}, "input.options.strength"),  # no image
            ("sd3.5-large", {"image_url": "https://example.com/a.png", "aspect_ratio": "1:1",
                             "options": {"strength": 0.5}}, "input.aspect_ratio"),
        ]
        for model, fields, field in cases:
            await refused(model, "generate", {"input": {"prompt": "x"} | fields}, 422, field)
    assert (await sim_stats(stab, "stability"))["requests"] == {}


async def test_a_synchronous_task_has_nothing_to_fetch() -> None:
    provider = StabilityProvider(ProviderSettings(name="stability", base_url="https://api.stability.ai"))
    request = GenerationRequest(kind=MediaKind.image, model="stable-image-core", input=MediaInput(prompt="x"))
    async with httpx.AsyncClient() as http:
        ctx = CallContext(http=http, api_key="k")
        with pytest.raises(TaskNotFound):
            await provider.fetch(ctx, TaskRef(task_id="job_1", request=request))
        assert provider.download_headers(ctx, "https://api.stability.ai/v2beta/results/abc")["Authorization"] \
            == "Bearer k"
        assert provider.download_headers(ctx, "https://cdn.example/x.png") == {}
