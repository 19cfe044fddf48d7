"""The Google Veo (Gemini API) simulator, driven over real HTTP as Google's docs describe."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jwt
import pytest
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig
from providers.sandbox.serve import serving
from providers.sandbox.veo import VeoSimulator

KEY = "AIzaSy-test-veo-key"
HDR = {"x-goog-api-key": KEY}
MODEL = "veo-3.1-generate-preview"
Veo = tuple[VeoSimulator, httpx.AsyncClient]
IMAGE = {"bytesBase64Encoded": base64.b64encode(media.png("first-frame")).decode(), "mimeType": "image/png"}


def make_sim(**extra: Any) -> VeoSimulator:
    return VeoSimulator(SimConfig(queue_seconds=0.05, run_seconds=0.2, output_ttl_seconds=172800,
                                  api_keys=[KEY], extra=extra))


@pytest.fixture
async def veo() -> AsyncIterator[tuple[VeoSimulator, httpx.AsyncClient]]:
    sim = make_sim()
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, headers=HDR, timeout=10) as client:
        yield sim, client


async def create(client: httpx.AsyncClient, prompt: str, model: str = MODEL, **params: Any) -> str:
    r = await client.post(f"/v1beta/models/{model}:predictLongRunning",
                          json={"instances": [{"prompt": prompt}], "parameters": params})
    assert r.status_code == 200, r.text
    name: str = r.json()["name"]
    return name


async def wait_done(client: httpx.AsyncClient, name: str, within: float = 5.0) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        r = await client.get(f"/v1beta/{name}")  # the name has slashes: it is the path, not one segment
        assert r.status_code == 200, r.text
        seen.append(r.json())
        if seen[-1].get("done"):
            return seen
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name} never finished")


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def samples(op: dict[str, Any]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = op["response"]["generateVideoResponse"].get("generatedSamples", [])
    return result


# -- happy path ---------------------------------------------------------------------


async def test_generate_poll_and_download_through_redirect(veo: Veo) -> None:
    sim, client = veo
    name = await create(client, "a lion in the savannah", aspectRatio="16:9", durationSeconds=8,
                        resolution="1080p", negativePrompt="cartoon")
    assert name.startswith(f"models/{MODEL}/operations/")
    history = await wait_done(client, name)
    assert history[0] == {"name": name}  # running: 'done' is absent, not false
    op = history[-1]
    assert op["done"] is True and "error" not in op
    assert op["response"]["@type"].endswith("PredictLongRunningResponse")
    uri = samples(op)[0]["video"]["uri"]
    assert uri.endswith(":download?alt=media") and "/v1beta/files/" in uri

    redirect = await client.get(uri)
    assert redirect.status_code == 302
    location = redirect.headers["location"]
    assert "/veo-storage/" in location and "Signature=" in location
    async with httpx.AsyncClient(follow_redirects=True) as plain:
        video = await plain.get(uri, headers=HDR)
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        assert video.content[4:8] == b"ftyp"
        by_query = await plain.get(uri + f"&key={KEY}")
        assert by_query.content == video.content
        no_key = await plain.get(uri)
        assert no_key.status_code == 403 and no_key.json()["error"]["status"] == "PERMISSION_DENIED"

    file_id = uri.split("/files/")[1].split(":")[0]
    meta = (await client.get(f"/v1beta/files/{file_id}")).json()
    assert meta["name"] == f"files/{file_id}" and meta["state"] == "ACTIVE"
    assert meta["mimeType"] == "video/mp4"
    assert meta["expirationTime"].endswith("Z")

    other = await wait_done(client, await create(client, "another"))
    other_uri = samples(other[-1])[0]["video"]["uri"]
    async with httpx.AsyncClient(follow_redirects=True, headers=HDR) as plain:
        other_bytes = (await plain.get(other_uri)).content
    assert hashlib.sha256(other_bytes).digest() != hashlib.sha256(video.content).digest()
    assert sim.stats.creations == 2


async def test_v1_serves_the_same_api(veo: Veo) -> None:
    sim, client = veo
    r = await client.post(f"/v1/models/{MODEL}:predictLongRunning",
                          json={"instances": [{"prompt": "a lion"}], "parameters": {"durationSeconds": 8}})
    assert r.status_code == 200, r.text
    name = r.json()["name"]
    assert name.startswith(f"models/{MODEL}/operations/")  # names carry no version: the client adds it
    deadline = time.monotonic() + 5
    while not (op := (await client.get(f"/v1/{name}")).json()).get("done"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert op["response"]["@type"] == \
        "type.googleapis.com/google.ai.generativelanguage.v1.PredictLongRunningResponse"
    uri = samples(op)[0]["video"]["uri"]
    assert uri.startswith(str(client.base_url).rstrip("/") + "/v1/files/") and uri.endswith(":download?alt=media")
    async with httpx.AsyncClient(follow_redirects=True, headers=HDR) as plain:
        video = await plain.get(uri)
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"
    file_id = uri.split("/files/")[1].split(":")[0]
    meta = (await client.get(f"/v1/files/{file_id}")).json()
    assert "/v1/files/" in meta["uri"] and "/v1/files/" in meta["downloadUri"]

    # The same operation read through v1beta names v1beta.
    beta = (await client.get(f"/v1beta/{name}")).json()
    assert ".v1beta." in beta["response"]["@type"] and "/v1beta/files/" in samples(beta)[0]["video"]["uri"]

    unknown = await client.post("/v1/models/veo-9-ultra:predictLongRunning", json=t2v())
    assert unknown.status_code == 404
    assert "is not found for API version v1," in unknown.json()["error"]["message"]
    async with httpx.AsyncClient(base_url=client.base_url) as keyless:
        no_key = await keyless.post(f"/v1/models/{MODEL}:predictLongRunning", json=t2v())
    assert no_key.status_code == 403 and no_key.json()["error"]["status"] == "PERMISSION_DENIED"
    assert sim.stats.creations == 1


async def test_api_versions_knob() -> None:
    sim = make_sim(veo_api_versions=["v1beta"])
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, headers=HDR) as client:
        r = await client.post(f"/v1/models/{MODEL}:predictLongRunning", json=t2v())
        assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"
        assert f"models/{MODEL} is not found for API version v1," in r.json()["error"]["message"]
        assert (await client.post(f"/v1beta/models/{MODEL}:predictLongRunning", json=t2v())).status_code == 200
    assert sim.stats.creations == 1


async def test_done_false_is_configurable() -> None:
    sim = make_sim(veo_emit_done_false=True)
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, headers=HDR) as client:
        name = await create(client, "x")
        first = (await client.get(f"/v1beta/{name}")).json()
        assert first == {"name": name, "done": False}


async def test_operation_not_found(veo: Veo) -> None:
    _, client = veo
    r = await client.get(f"/v1beta/models/{MODEL}/operations/doesnotexist")
    assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"


# -- terminal traps -------------------------------------------------------------------


async def test_content_filtered_is_done_without_error_or_video(veo: Veo) -> None:
    _, client = veo
    op = (await wait_done(client, await create(client, "something touchy [sim:filtered]")))[-1]
    assert op["done"] is True and "error" not in op
    gen = op["response"]["generateVideoResponse"]
    assert "generatedSamples" not in gen
    assert gen["raiMediaFilteredCount"] == 1
    assert "not been charged" in gen["raiMediaFilteredReasons"][0]


async def test_partial_filter_on_multi_sample(veo: Veo) -> None:
    _, client = veo
    name = await create(client, "two please [sim:partial]", model="veo-2.0-generate-001", sampleCount=2,
                        durationSeconds=5)
    op = (await wait_done(client, name))[-1]
    gen = op["response"]["generateVideoResponse"]
    assert len(gen["generatedSamples"]) == 1 and gen["raiMediaFilteredCount"] == 1
    name2 = await create(client, "two", model="veo-2.0-generate-001", sampleCount=2)
    two = (await wait_done(client, name2))[-1]
    uris = [s["video"]["uri"] for s in samples(two)]
    assert len(set(uris)) == 2


async def test_done_with_grpc_error(veo: Veo) -> None:
    _, client = veo
    op = (await wait_done(client, await create(client, "broken [sim:fail]")))[-1]
    assert op["done"] is True and "response" not in op
    assert op["error"]["code"] == 13 and op["error"]["message"]
    op = (await wait_done(client, await create(client, "unsafe [sim:fail=3]")))[-1]
    assert op["error"] == {"code": 3, "message": "The prompt was blocked by our safety policy."}


# -- validation --------------------------------------------------------------------------


async def post_raw(client: httpx.AsyncClient, body: dict[str, Any], model: str = MODEL) -> httpx.Response:
    return await client.post(f"/v1beta/models/{model}:predictLongRunning", json=body)


def t2v(**params: Any) -> dict[str, Any]:
    return {"instances": [{"prompt": "a cat"}], "parameters": params}


@pytest.mark.parametrize(("model", "body", "fragment"), [
    (MODEL, t2v(durationSeconds=5), "Please provide a value between 4 and 8, inclusive."),
    (MODEL, t2v(durationSeconds=10), "`durationSeconds` is out of bound"),
    ("veo-2.0-generate-001", t2v(durationSeconds=4), "between 5 and 8, inclusive"),
    (MODEL, t2v(resolution="1080p", durationSeconds=4), "1080p"),
    ("veo-3.0-generate-001", t2v(resolution="4k"), "Unsupported resolution"),
    (MODEL, t2v(aspectRatio="1:1"), "aspect ratio"),
    (MODEL, t2v(personGeneration="allow_adult"), "personGeneration"),
    (MODEL, t2v(storageUri="gs://bucket/out"), "`storageUri` isn't supported"),
    (MODEL, t2v(generateAudio=False), "`generateAudio` isn't supported"),
    (MODEL, t2v(sampleCount=2), "`sampleCount` is out of bound"),
    (MODEL, {"instances": [{"prompt": "x"}], "labels": {"a": "b"}}, 'Unknown name "labels"'),
    (MODEL, {"instances": [{"prompt": "a"}, {"prompt": "b"}]}, "exactly one instance"),
    (MODEL, {"instances": [{"prompt": "x", "image": {"gcsUri": "gs://b/i.png", "mimeType": "image/png"}}]},
     "gcsUri"),
    (MODEL, {"instances": [{"prompt": "x",
                            "image": {"inlineData": {"data": "AA==", "mimeType": "image/png"}}}]},
     "inlineData"),
    (MODEL, {"instances": [{"prompt": "x", "image": IMAGE, "lastFrame": IMAGE}],
             "parameters": {"durationSeconds": 6}}, "must be 8"),
    ("veo-3.0-generate-001", {"instances": [{"prompt": "x", "referenceImages": [{"image": IMAGE}]}]},
     "referenceImages"),
    (MODEL, {"instances": [{"prompt": "x", "video": {"uri": "https://example.com/files/abc:download"}}]},
     "generated by Veo"),
])
async def test_rejects_invalid_parameters(veo: Veo, model: str,
                                          body: dict[str, Any], fragment: str) -> None:
    sim, client = veo
    r = await post_raw(client, body, model)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == 400 and err["status"] == "INVALID_ARGUMENT"
    assert fragment in err["message"]
    assert sim.stats.creations == 0


async def test_accepts_documented_variants(veo: Veo) -> None:
    _, client = veo
    for model, body in [
        # a string duration, as the doc's table writes it
        (MODEL, t2v(durationSeconds="6", aspectRatio="9:16", personGeneration="allow_all")),
        (MODEL, t2v(resolution="4k", durationSeconds=8)),
        ("veo-3.1-fast-generate-preview", {"instances": [{"prompt": "x", "image": IMAGE}],
                                           "parameters": {"personGeneration": "allow_adult"}}),
        (MODEL, {"instances": [{"prompt": "x", "image": IMAGE, "lastFrame": IMAGE}],
                 "parameters": {"durationSeconds": 8}}),
        (MODEL, {"instances": [{"prompt": "x",
                                "referenceImages": [{"image": IMAGE, "referenceType": "asset"}]}]}),
        ("veo-2.0-generate-001", t2v(durationSeconds=7, personGeneration="dont_allow")),
    ]:
        r = await post_raw(client, body, model)
        assert r.status_code == 200, (model, body, r.text)


async def test_extension_of_a_generated_video(veo: Veo) -> None:
    _, client = veo
    op = (await wait_done(client, await create(client, "start")))[-1]
    uri = samples(op)[0]["video"]["uri"]
    r = await post_raw(client, {"instances": [{"prompt": "continue", "video": {"uri": uri}}],
                                "parameters": {"resolution": "1080p", "durationSeconds": 8}})
    assert r.status_code == 400 and "720p" in r.json()["error"]["message"]
    r = await post_raw(client, {"instances": [{"prompt": "continue", "video": {"uri": uri}}]})
    assert r.status_code == 200


async def test_unknown_model(veo: Veo) -> None:
    _, client = veo
    r = await post_raw(client, t2v(), "veo-9-ultra")
    assert r.status_code == 404 and r.json()["error"]["status"] == "NOT_FOUND"
    assert "is not found for API version v1beta" in r.json()["error"]["message"]


# -- auth -----------------------------------------------------------------------------------


async def test_api_key_errors() -> None:
    sim = make_sim()
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base) as client:
        url = f"/v1beta/models/{MODEL}:predictLongRunning"
        r = await client.post(url, json=t2v())
        assert r.status_code == 403
        assert r.json()["error"]["status"] == "PERMISSION_DENIED"
        assert r.json()["error"]["message"].startswith("Method doesn't allow unregistered callers")
        r = await client.post(url, json=t2v(), headers={"x-goog-api-key": "AIza-wrong"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["message"] == "API key not valid. Please pass a valid API key."
        assert err["status"] == "INVALID_ARGUMENT" and err["details"][0]["reason"] == "API_KEY_INVALID"
        r = await client.post(url + "?key=AIza-wrong", json=t2v())
        assert r.status_code == 400
        r = await client.post(url, json=t2v(), headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 401 and r.json()["error"]["status"] == "UNAUTHENTICATED"
        r = await client.post(url + f"?key={KEY}", json=t2v())
        assert r.status_code == 200
    assert sim.stats.creations == 1


# -- injected faults ---------------------------------------------------------------------------


async def test_resource_exhausted_with_retry_info(veo: Veo) -> None:
    sim, client = veo
    await client.post("/_sim/faults", json=[{"kind": "429", "route": "create", "retry_after": 19},
                                            {"kind": "429", "route": "create"}])
    r = await post_raw(client, t2v())
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["status"] == "RESOURCE_EXHAUSTED" and err["code"] == 429
    retry = [d for d in err["details"] if d["@type"].endswith("RetryInfo")]
    assert retry == [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "19s"}]
    assert any(d["@type"].endswith("QuotaFailure") for d in err["details"])
    r = await post_raw(client, t2v())
    assert r.status_code == 429
    assert not [d for d in r.json()["error"]["details"] if d["@type"].endswith("RetryInfo")]
    assert (await post_raw(client, t2v())).status_code == 200
    assert sim.stats.creations == 1


async def test_server_errors(veo: Veo) -> None:
    _, client = veo
    await client.post("/_sim/faults", json=[{"kind": "503", "route": "get"}, {"kind": "502", "route": "get"},
                                            {"kind": "500", "route": "get"},
                                            {"kind": "malformed", "route": "get"}])
    name = await create(client, "x")
    r = await client.get(f"/v1beta/{name}")
    assert r.status_code == 503 and r.json()["error"]["status"] == "UNAVAILABLE"
    r = await client.get(f"/v1beta/{name}")
    assert r.status_code == 502 and r.headers["content-type"].startswith("text/html") and "502" in r.text
    r = await client.get(f"/v1beta/{name}")
    assert r.status_code == 500 and r.json()["error"]["status"] == "INTERNAL"
    r = await client.get(f"/v1beta/{name}")
    with pytest.raises(ValueError):
        r.json()
    assert (await client.get(f"/v1beta/{name}")).status_code == 200


async def test_ambiguous_create(veo: Veo) -> None:
    sim, client = veo
    await client.post("/_sim/faults", json=[{"kind": "500", "route": "create", "after_effect": True}])
    r = await post_raw(client, t2v())
    assert r.status_code == 500
    assert sim.stats.creations == 1 and len(sim.tasks) == 1


# -- expiry -----------------------------------------------------------------------------------


async def test_redirect_url_and_file_retention_expire() -> None:
    sim = VeoSimulator(SimConfig(queue_seconds=0.0, run_seconds=0.05, output_ttl_seconds=0.6, api_keys=[KEY],
                                 extra={"veo_redirect_ttl_seconds": 0.3}))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, headers=HDR) as client:
        op = (await wait_done(client, await create(client, "x")))[-1]
        uri = samples(op)[0]["video"]["uri"]
        location = (await client.get(uri)).headers["location"]
        async with httpx.AsyncClient() as storage:
            assert (await storage.get(location)).status_code == 200
            tampered = location.replace("Signature=", "Signature=0")
            assert (await storage.get(tampered)).status_code == 403
            await asyncio.sleep(1.3)
            stale = await storage.get(location)
            assert stale.status_code == 400 and b"ExpiredToken" in stale.content
        gone = await client.get(uri)
        assert gone.status_code == 403
        assert "or it may not exist" in gone.json()["error"]["message"]

        sim.config.output_ttl_seconds = 3600
        op2 = (await wait_done(client, await create(client, "y")))[-1]
        uri2 = samples(op2)[0]["video"]["uri"]
        assert (await client.get(uri2)).status_code == 302
        await client.post("/_sim/expire-files")
        assert (await client.get(uri2)).status_code == 403


def test_default_retention_is_two_days() -> None:
    assert VeoSimulator().config.output_ttl_seconds == 2 * 24 * 3600


# -- webhooks -----------------------------------------------------------------------------------


class Receiver:
    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        self.requests.append((dict(request.headers), await request.body()))
        return Response(status_code=200)


async def test_static_webhook_video_generated() -> None:
    receiver = Receiver()
    sim = make_sim()
    async with serving(receiver.app) as hook_base, serving(sim.app) as base, \
            httpx.AsyncClient(base_url=base, headers=HDR) as client:
        r = await client.post("/v1beta/webhooks", json={"name": "atelier", "uri": hook_base + "/hook",
                                                        "subscribed_events": ["video.generated"]})
        assert r.status_code == 200
        hook = r.json()
        secret = hook["new_signing_secret"]
        assert secret.startswith("whsec_") and hook["name"].startswith("webhooks/")
        listed = (await client.get("/v1beta/webhooks")).json()["webhooks"]
        assert len(listed) == 1 and "new_signing_secret" not in listed[0]

        ok = await create(client, "fine")
        filtered = await create(client, "nope [sim:filtered]")
        failed = await create(client, "bad [sim:fail]")
        await wait_done(client, ok)
        await wait_done(client, filtered)
        await wait_done(client, failed)
        await until(lambda: len(receiver.requests) >= 1)
        await asyncio.sleep(0.2)
        assert len(receiver.requests) == 1  # nothing for the filtered or the failed operation
        headers, raw = receiver.requests[0]
        event = Webhook(secret).verify(raw, headers)
        assert event["type"] == "video.generated" and event["version"] == "v1"
        assert ok.endswith("/" + event["data"]["id"])
        assert event["data"]["file_name"].startswith("files/")
        async with httpx.AsyncClient(follow_redirects=True, headers=HDR) as plain:
            video = await plain.get(event["data"]["output_file_uri"])
        assert video.status_code == 200 and video.content[4:8] == b"ftyp"

        assert (await client.delete(f"/v1beta/{hook['name']}")).status_code == 200
        assert (await client.get(f"/v1beta/{hook['name']}")).status_code == 404


async def test_dynamic_webhook_signed_with_jwt() -> None:
    receiver = Receiver()
    sim = make_sim()
    async with serving(receiver.app) as hook_base, serving(sim.app) as base, \
            httpx.AsyncClient(base_url=base, headers=HDR) as client:
        url = hook_base + "/hook"
        r = await client.post(f"/v1beta/models/{MODEL}:predictLongRunning", json={
            "instances": [{"prompt": "with a hook"}],
            "webhookConfig": {"uris": [url], "user_metadata": {"job_id": "job-1"}}})
        assert r.status_code == 200
        await until(lambda: len(receiver.requests) >= 1)
        headers, raw = receiver.requests[0]
        assert headers["webhook-id"] and headers["webhook-timestamp"]
        jwks = (await client.get("/.well-known/jwks.json")).json()
        token = headers["webhook-signature"]
        kid = jwt.get_unverified_header(token)["kid"]
        key = jwt.PyJWK({k: v for k, v in next(k for k in jwks["keys"] if k["kid"] == kid).items()})
        claims = jwt.decode(token, key.key, algorithms=["RS256"], audience=url)
        assert claims["iss"] == "https://generativelanguage.googleapis.com"
        digest = base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).rstrip(b"=").decode()
        assert claims["body_sha256"] == digest
        event = json.loads(raw)
        assert event["type"] == "video.generated"
        assert event["data"]["user_metadata"] == {"job_id": "job-1"}
        assert r.json()["name"].endswith("/" + event["data"]["id"])
