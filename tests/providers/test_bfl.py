"""The BFL (FLUX) adapter against the BFL simulator, through the real API and worker.

BFL's tasks are polled at a ``polling_url`` that may be on another host (followed with the key
only on BFL's hosts or our base URL's), refusals are poll statuses, and the result URL lives ten
minutes, so it is collected at once.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from orchestrator.cli.devstack import Stack, dev_stack
from providers.bfl import BflProvider, BflTask, result_status, webhook_secret
from providers.contract import ProviderSettings
from providers.errors import MalformedResponse, TaskNotFound
from providers.sandbox.bfl import BflSimulator
from providers.sandbox.serve import serving
from tests.helpers import api, sim_faults, sim_stats, submit, wait_for

ForeignHost = tuple[str, list[dict[str, str]]]


@pytest.fixture
async def short_timeout(redis_url: str) -> AsyncIterator[Stack]:
    """A stack whose BFL requests time out after 1 s."""
    async with dev_stack(redis_url=redis_url, log_format="text",
                         providers_file={"bfl": {"request_timeout_seconds": 1.0}}) as stack:
        yield stack


@pytest.fixture
async def foreign_host() -> AsyncIterator[ForeignHost]:
    """Another host that would answer a poll: records every request it gets (and its headers)."""
    hits: list[dict[str, str]] = []

    async def anything(request: Request) -> Response:
        hits.append(dict(request.headers))
        return JSONResponse({"id": request.query_params.get("id"), "status": "Pending"})

    app = Starlette(routes=[Route("/{path:path}", anything, methods=["GET"])])
    async with serving(app) as base:
        yield base, hits


def sim(stack: Stack) -> BflSimulator:
    simulator = stack.simulators["bfl"]
    assert isinstance(simulator, BflSimulator)
    return simulator


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def bfl_job(client: httpx.AsyncClient, model: str = "flux-2-pro", **fields: Any) -> dict[str, Any]:
    extra = {key: fields.pop(key) for key in ("source", "retry_unknown_submissions") if key in fields}
    body: dict[str, Any] = {"prompt": "a ceramic mug, soft studio light"} | fields
    return await submit(client, provider="bfl", kind="image", model=model, input=body, **extra)


# -- success ---------------------------------------------------------------------------------

async def test_success_maps_inputs_and_collects_the_sample_at_once(stack: Stack) -> None:
    sim(stack).config.output_ttl_seconds = 5.0  # the sample dies 5 s after Ready: collected before that
    async with api(stack) as client:
        job = await bfl_job(client, aspect_ratio="16:9", seed=42,
                            options={"output_format": "png", "safety_tolerance": 2, "prompt_upsampling": True})
        done = await wait_for(client, job["id"])
        stored = (await client.get(done["outputs"][0]["url"])).content
    assert done["status"] == "succeeded" and done["provider_status"] == "Ready", done
    (served,) = (f.data for f in sim(stack).files.files.values())
    out = done["outputs"][0]
    assert out["sha256"] == sha(served) == sha(stored) and out["content_type"] == "image/png"
    assert (out["width"], out["height"]) == (85, 48)  # 1360x768 / 16
    assert out["metadata"]["seed"] == 42 and out["metadata"]["cost_credits"] == 3.0
    task = sim(stack).tasks[done["provider_task_id"]]
    sent = dict(task.input)
    hook, secret = sent.pop("webhook_url"), sent.pop("webhook_secret")
    assert sent == {"prompt": "a ceramic mug, soft studio light", "seed": 42, "width": 1360, "height": 768,
                    "output_format": "png", "safety_tolerance": 2, "prompt_upsampling": True}
    token = parse_qs(urlsplit(hook).query)["token"][0]
    assert hook.startswith(f"{stack.settings.public_url}/v1/callbacks/bfl?job={job['id']}")
    assert secret == webhook_secret(hook) and token not in secret and "sandbox-key" not in secret
    assert (await sim_stats(stack, "bfl"))["creations"] == 1


async def test_callbacks_are_authenticated_by_the_jobs_token(stack: Stack) -> None:
    async with api(stack) as client:
        done = await wait_for(client, (await bfl_job(client))["id"])
        assert done["status"] == "succeeded", done
        hook = sim(stack).tasks[done["provider_task_id"]].input["webhook_url"]
        body = {"id": done["provider_task_id"], "status": "Ready", "timestamp": 1}
        async with httpx.AsyncClient() as http:
            forged = await http.post(hook.replace("token=", "token=x"), json=body)
            late = await http.post(hook, json=body)
            unreadable = await http.post(hook, content=b"not json")
    assert sim(stack).webhooks_sent == 1  # delivered once and acknowledged (a non-2xx would be retried)
    assert forged.status_code == 401
    assert late.status_code == 200 and late.json() == {"status": "ignored: job already finished"}
    assert unreadable.status_code == 401


async def test_a_source_image_goes_as_input_image(stack: Stack) -> None:
    async with api(stack) as client:
        source = await wait_for(client, (await submit(client))["id"])  # a replicate image job
        job = await bfl_job(client, model="flux-kontext-pro", source={"job_id": source["id"]},
                            prompt="make the fox blue", aspect_ratio="4:3")
        done = await wait_for(client, job["id"])
    assert done["status"] == "succeeded" and done["source"] == {"job_id": source["id"], "output": 0}, done
    sent = sim(stack).tasks[done["provider_task_id"]].input
    assert sha(base64.b64decode(sent["input_image"])) == source["outputs"][0]["sha256"]
    assert sent["aspect_ratio"] == "4:3" and "width" not in sent


# -- polling_url -------------------------------------------------------------------------------

async def test_polling_url_is_followed_only_where_the_key_may_go(stack: Stack, foreign_host: ForeignHost) -> None:
    config = sim(stack).config
    foreign, hits = foreign_host
    # The polling_url is on the base URL's origin under a region prefix; only that prefix finds the task.
    config.extra |= {"webhook_response_polling_url": True, "strict_region": True}
    async with api(stack) as client:
        followed = await wait_for(client, (await bfl_job(client))["id"])
        assert followed["status"] == "succeeded", followed  # only the polling_url's region knows the task
        # Without a polling_url the base URL is polled: the strict region says Task not found.
        config.extra["webhook_response_polling_url"] = False
        missing = await wait_for(client, (await bfl_job(client))["id"])
        # A polling_url on a foreign host is not followed (the key never goes there); the base URL is polled.
        config.extra |= {"webhook_response_polling_url": True, "strict_region": False, "polling_base_url": foreign}
        elsewhere = await wait_for(client, (await bfl_job(client))["id"])
    assert missing["status"] == "failed" and missing["error"]["code"] == "provider_task_not_found", missing
    assert elsewhere["status"] == "succeeded", elsewhere
    assert hits == []


def test_the_key_goes_only_to_bfl_hosts_or_the_base_url() -> None:
    provider = BflProvider(ProviderSettings(name="bfl", base_url="https://api.bfl.ai"))
    for url in ("https://api.bfl.ai/v1/get_result?id=1", "https://gateway.eu1.bfl.ai/v1/get_result?id=1",
                "https://bfl.ai/x"):
        assert provider._polling_url(url) == url
    refused: tuple[str | None, ...] = (
        "http://api.eu.bfl.ai/v1/get_result?id=1", "https://bfl.ai.attacker.example/v1/get_result",
        "https://evilbfl.ai/x", "https://api.bfl.ai@attacker.example/x", "https://api.bfl.ml/x", "", None)
    for bad in refused:
        assert provider._polling_url(bad) is None
    own = BflProvider(ProviderSettings(name="bfl", base_url="http://127.0.0.1:8080/bfl"))
    assert own._polling_url("http://127.0.0.1:8080/bfl/api.us1/v1/get_result?id=1") is not None
    assert own._polling_url("http://127.0.0.1:9090/v1/get_result?id=1") is None  # another port, another origin


def test_statuses_are_compared_exactly_and_unknown_ones_are_running() -> None:
    state = BflTask()
    assert result_status({"status": "Pending", "progress": None}, state).state == "queued"
    running = result_status({"status": "Pending", "progress": 0.4}, state)
    assert (running.state, running.progress) == ("running", 40)
    assert result_status({"status": "Generating", "progress": 55}, state).progress == 55  # a 0-100 scale
    assert result_status({"status": "Reasoning"}, state).state == "running"
    assert result_status({"status": "ready"}, state).state == "running"  # not "Ready": compared exactly
    assert result_status({"status": "Ready", "result": {}}, state).error_code == "provider_no_output"
    with pytest.raises(TaskNotFound):
        result_status({"status": "Task not found"}, state)
    with pytest.raises(MalformedResponse):
        result_status({"id": "x"}, state)


# -- refusals and errors -----------------------------------------------------------------------

async def test_moderation_errors_and_odd_statuses(stack: Stack) -> None:
    async with api(stack) as client:
        jobs = [await bfl_job(client, prompt=f"a mug {d}") for d in
                ("[sim:request_moderated]", "[sim:content_moderated]", "[sim:fail]",
                 "[sim:status=Generating] [sim:run=1.5]")]
        request, content, error, odd = [await wait_for(client, j["id"]) for j in jobs]
    assert request["status"] == "failed" and request["error"]["code"] == "content_policy", request
    assert request["error"]["message"] == "BFL's moderation refused the request: Derivative Works Filter"
    assert content["status"] == "failed" and content["error"]["code"] == "content_policy", content
    assert "the generated image: NSFW" in content["error"]["message"]
    assert error["status"] == "failed" and error["error"]["code"] == "provider_failed", error
    assert odd["status"] == "succeeded", odd  # "Generating" is not documented: it is running
    assert (await sim_stats(stack, "bfl"))["creations"] == 4


async def test_expired_sample_fails_as_output_expired(stack: Stack) -> None:
    sim(stack).config.output_ttl_seconds = 0.0  # dead the moment the task is Ready
    async with api(stack) as client:
        done = await wait_for(client, (await bfl_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "output_expired", done
    assert (await sim_stats(stack, "bfl"))["creations"] == 1


async def test_rate_limit_then_success_creates_one_task(stack: Stack) -> None:
    await sim_faults(stack, "bfl", {"kind": "429", "route": "submit", "count": 1, "retry_after": 1},
                     {"kind": "malformed", "route": "get_result", "count": 1})
    async with api(stack) as client:
        done = await wait_for(client, (await bfl_job(client))["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    stats = await sim_stats(stack, "bfl")
    assert stats["creations"] == 1 and stats["faults_injected"] == {"submit:429": 1, "get_result:malformed": 1}


@pytest.mark.parametrize(
    ("setup", "code"),
    [
        ({"extra": {"credits": 0}}, "provider_insufficient_balance"),  # 402
        ({"api_keys": ["not-the-sandbox-key"]}, "provider_auth_failed"),  # 401
    ],
)
async def test_account_refusals_fail_without_a_task(stack: Stack, setup: dict[str, Any], code: str) -> None:
    sim(stack).config.extra.update(setup.get("extra", {}))
    sim(stack).config.api_keys = setup.get("api_keys", [])
    async with api(stack) as client:
        done = await wait_for(client, (await bfl_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == code, done
    assert (await sim_stats(stack, "bfl"))["creations"] == 0


async def test_malformed_submit_answer_is_never_resent(stack: Stack) -> None:
    await sim_faults(stack, "bfl", {"kind": "malformed", "route": "submit", "after_effect": True})
    async with api(stack) as client:
        done = await wait_for(client, (await bfl_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_malformed_response", done
    stats = await sim_stats(stack, "bfl")
    assert stats["creations"] == 1 and stats["requests"] == {"submit": 1}


async def test_ambiguous_create_fails_without_a_second_task(short_timeout: Stack) -> None:
    await sim_faults(short_timeout, "bfl", {"kind": "timeout", "route": "submit", "after_effect": True, "delay": 2.5})
    async with api(short_timeout) as client:
        done = await wait_for(client, (await bfl_job(client))["id"])
    assert done["status"] == "failed" and done["error"]["code"] == "provider_outcome_unknown", done
    assert done["attempts"] == 1
    stats = await sim_stats(short_timeout, "bfl")
    assert stats["creations"] == 1 and stats["requests"] == {"submit": 1}  # created (and billed) once


async def test_bad_requests_are_refused_naming_the_field(stack: Stack) -> None:
    async with api(stack) as client:
        image = await wait_for(client, (await submit(client))["id"])
        running = await submit(client, input={"prompt": "a slow fox [sim:run=30]"})

        async def refused(model: str, body: dict[str, Any], status: int, field: str) -> None:
            payload = {"provider": "bfl", "kind": "image", "model": model, "input": {"prompt": "x"}} | body
            resp = await client.post("/v1/jobs", json=payload)
            assert resp.status_code == status, (model, body, resp.text)
            assert [e["field"] for e in resp.json()["errors"]] == [field], (model, body, resp.text)

        await refused("flux-2-pro", {"operation": "remix", "source": {"job_id": image["id"]}}, 422, "operation")
        await refused("flux-kontext-pro", {"source": {"job_id": running["id"]}}, 409, "source.job_id")
        cases: list[tuple[str, dict[str, Any], str]] = [
            ("flux-3-ultra", {}, "model"),
            ("flux-2-pro", {"prompt": ""}, "input.prompt"),
            ("flux-pro-1.0-fill", {}, "input.image_url"),
            ("flux-2-pro", {"negative_prompt": "blur"}, "input.negative_prompt"),
            ("flux-2-pro", {"num_outputs": 2}, "input.num_outputs"),
            ("flux-2-pro", {"aspect_ratio": "4:1"}, "input.aspect_ratio"),
            ("flux-pro-1.1", {"resolution": "1000x768"}, "input.resolution"),  # not multiples of 32
            ("flux-pro-1.1", {"resolution": "2048x1024"}, "input.resolution"),  # beyond 1440
            ("flux-2-pro", {"resolution": "4096x4096"}, "input.resolution"),  # beyond 4 MP
            ("flux-pro-1.1-ultra", {"resolution": "1024x1024"}, "input.resolution"),
            ("flux-2-pro", {"aspect_ratio": "1:1", "options": {"width": 512}}, "input.options.width"),
            ("flux-2-pro", {"options": {"safety_tolerance": 6}}, "input.options.safety_tolerance"),
            ("flux-dev", {"options": {"output_format": "gif"}}, "input.options.output_format"),
            ("flux-2-pro", {"options": {"webhook_url": "https://x"}}, "input.options.webhook_url"),
            ("flux-2-pro", {"options": {"input_image": "https://x/a.png"}}, "input.options.input_image"),
        ]
        for model, fields, field in cases:
            await refused(model, {"input": {"prompt": "x"} | fields}, 422, field)
    assert (await sim_stats(stack, "bfl"))["requests"] == {}
