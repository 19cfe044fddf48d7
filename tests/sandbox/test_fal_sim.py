"""The fal.ai queue simulator, driven over HTTP exactly as fal's docs say a client would."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from providers.sandbox.base import SimConfig
from providers.sandbox.fal import FalSimulator
from providers.sandbox.serve import serving

KEY = "key-id:key-secret"
AUTH = {"Authorization": f"Key {KEY}"}
FLUX = "fal-ai/flux/dev"
KLING = "fal-ai/kling-video/v2/master/text-to-video"


@dataclass
class Env:
    sim: FalSimulator
    base: str
    client: httpx.AsyncClient


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = FalSimulator(SimConfig(queue_seconds=0.2, run_seconds=0.3, api_keys=[KEY]))
    async with serving(sim.app) as base, httpx.AsyncClient(timeout=10) as client:
        yield Env(sim, base, client)


async def submit(env: Env, model: str, inp: dict[str, Any], params: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None) -> dict[str, Any]:
    resp = await env.client.post(f"{env.base}/{model}", json=inp, params=params,
                                 headers={**AUTH, **(headers or {})})
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def wait_completed(env: Env, status_url: str, within: float = 5.0) -> dict[str, Any]:
    deadline = time.time() + within
    while time.time() < deadline:
        resp = await env.client.get(status_url, headers=AUTH)
        if resp.status_code == 200:
            body: dict[str, Any] = resp.json()
            assert body["status"] == "COMPLETED"
            return body
        assert resp.status_code == 202, resp.text
        await asyncio.sleep(0.05)
    raise AssertionError("request did not complete")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    return w, h


# -- submit / status / result ----------------------------------------------------------


async def test_image_model_lifecycle(env: Env) -> None:
    sub = await submit(env, FLUX, {"prompt": "a red fox", "image_size": "landscape_16_9", "num_images": 2})
    rid = sub["request_id"]
    assert sub["status"] == "IN_QUEUE" and sub["queue_position"] == 0
    assert sub["gateway_request_id"] == rid
    # status/result/cancel URLs drop the sub-path: owner/app only.
    assert sub["response_url"] == f"{env.base}/fal-ai/flux/requests/{rid}"
    assert sub["status_url"] == f"{env.base}/fal-ai/flux/requests/{rid}/status"
    assert sub["cancel_url"] == f"{env.base}/fal-ai/flux/requests/{rid}/cancel"

    queued = await env.client.get(sub["status_url"], headers=AUTH)
    assert queued.status_code == 202
    assert queued.json()["status"] == "IN_QUEUE" and queued.json()["queue_position"] == 0

    await asyncio.sleep(0.3)
    running = await env.client.get(sub["status_url"], params={"logs": "1"}, headers=AUTH)
    assert running.status_code == 202
    assert running.json()["status"] == "IN_PROGRESS"
    assert isinstance(running.json()["logs"], list) and running.json()["logs"][0]["source"] == "USER"
    no_logs = await env.client.get(sub["status_url"], headers=AUTH)
    assert "logs" in no_logs.json() and no_logs.json()["logs"] is None

    done = await wait_completed(env, sub["status_url"] + "?logs=true")
    assert done["metrics"]["inference_time"] == pytest.approx(0.3)
    assert done["logs"][-1]["message"] == "Step 28/28"
    assert "error" not in done

    result = await env.client.get(sub["response_url"], headers=AUTH)
    assert result.status_code == 200
    out = result.json()
    assert out["prompt"] == "a red fox" and out["has_nsfw_concepts"] == [False, False]
    assert len(out["images"]) == 2
    shas = set()
    for img in out["images"]:
        assert img["content_type"] == "image/png" and "/files/" in img["url"]
        data = (await env.client.get(img["url"])).content
        assert png_size(data) == (img["width"], img["height"]) == (64, 36)  # 1024x576 / 16
        assert img["file_size"] == len(data)
        shas.add(hashlib.sha256(data).hexdigest())
    assert len(shas) == 2
    assert env.sim.stats.creations == 1


async def test_video_model_keeps_subpath_on_submit_only(env: Env) -> None:
    sub = await submit(env, KLING, {"prompt": "a drone shot of a coast"})
    rid = sub["request_id"]
    assert sub["status_url"] == f"{env.base}/fal-ai/kling-video/requests/{rid}/status"
    # The sub-path form is accepted too.
    long_form = f"{env.base}/{KLING}/requests/{rid}"
    await wait_completed(env, long_form + "/status")
    result = await env.client.get(long_form, headers=AUTH)
    assert result.status_code == 200
    video = result.json()["video"]
    assert video["content_type"] == "video/mp4" and video["file_name"] == "output.mp4"
    assert "images" not in result.json()
    data = (await env.client.get(video["url"])).content
    assert data[4:8] == b"ftyp" and video["file_size"] == len(data)
    # Another app's path does not find the request.
    other = await env.client.get(f"{env.base}/fal-ai/flux/requests/{rid}", headers=AUTH)
    assert other.status_code == 404


async def test_result_before_completion(env: Env) -> None:
    sub = await submit(env, FLUX, {"prompt": "slow [sim:run=5]"})
    early = await env.client.get(sub["response_url"], headers=AUTH)
    assert early.status_code == 400 and early.json() == {"detail": "Request is still in progress"}
    env.sim.config.extra["result_before_done"] = "202"
    early = await env.client.get(sub["response_url"], headers=AUTH)
    assert early.status_code == 202 and early.json()["status"] in ("IN_QUEUE", "IN_PROGRESS")


async def test_queue_position_decreases(env: Env) -> None:
    sub = await submit(env, FLUX, {"prompt": "x [sim:queue=1] [sim:position=5]"})
    assert sub["queue_position"] == 5
    first = (await env.client.get(sub["status_url"], headers=AUTH)).json()["queue_position"]
    await asyncio.sleep(0.6)
    later = (await env.client.get(sub["status_url"], headers=AUTH)).json()["queue_position"]
    assert 0 <= later < first <= 5


async def test_status_stream(env: Env) -> None:
    sub = await submit(env, FLUX, {"prompt": "stream me"})
    statuses = []
    async with env.client.stream("GET", sub["status_url"] + "/stream", params={"logs": "1"},
                                 headers=AUTH) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                statuses.append(json.loads(line[6:])["status"])
    assert statuses[0] == "IN_QUEUE" and statuses[-1] == "COMPLETED" and "IN_PROGRESS" in statuses


# -- auth ------------------------------------------------------------------------------------


async def test_auth_rejections(env: Env) -> None:
    url = f"{env.base}/{FLUX}"
    missing = await env.client.post(url, json={"prompt": "x"})
    assert missing.status_code == 401 and missing.json() == {"detail": "Unauthorized"}
    bearer = await env.client.post(url, json={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 401
    bad_format = await env.client.post(url, json={"prompt": "x"}, headers={"Authorization": "Key nocolon"})
    assert bad_format.status_code == 401 and "key_id" in bad_format.json()["detail"]
    unknown = await env.client.post(url, json={"prompt": "x"}, headers={"Authorization": "Key a:b"})
    assert unknown.status_code == 401
    assert unknown.json() == {"detail": "No user found for Key ID and Secret"}
    sub = await submit(env, FLUX, {"prompt": "x"})
    status = await env.client.get(sub["status_url"], headers={"Authorization": "Key a:b"})
    assert status.status_code == 401
    assert env.sim.stats.creations == 1


# -- traps -----------------------------------------------------------------------------------


async def test_completed_but_failed(env: Env) -> None:
    sub = await submit(env, FLUX, {"prompt": "boom [sim:fail]"})
    done = await wait_completed(env, sub["status_url"])
    assert "error" not in done  # looks like success until the result is fetched
    result = await env.client.get(sub["response_url"], headers=AUTH)
    assert result.status_code == 500
    detail = result.json()["detail"]
    assert detail[0]["type"] == "internal_server_error" and {"loc", "msg", "url"} <= detail[0].keys()
    assert result.headers["x-fal-retryable"] == "true"

    env.sim.config.extra["status_error_fields"] = True
    done = await wait_completed(env, sub["status_url"])
    assert done["error_type"] == "internal_server_error" and done["error"]


async def test_request_error_types(env: Env) -> None:
    sub = await submit(env, FLUX, {"prompt": "x [sim:fail=runner_disconnected]"})
    await wait_completed(env, sub["status_url"])
    result = await env.client.get(sub["response_url"], headers=AUTH)
    assert result.status_code == 503
    assert result.json() == {"detail": "Runner disconnected", "error_type": "runner_disconnected"}
    assert result.headers["x-fal-error-type"] == "runner_disconnected"


async def test_filtered_and_nsfw(env: Env) -> None:
    filtered = await submit(env, FLUX, {"prompt": "bad [sim:filtered]"})
    nsfw = await submit(env, FLUX, {"prompt": "risky [sim:nsfw]"})
    await wait_completed(env, filtered["status_url"])
    await wait_completed(env, nsfw["status_url"])
    r1 = await env.client.get(filtered["response_url"], headers=AUTH)
    assert r1.status_code == 422 and r1.json()["detail"][0]["type"] == "content_policy_violation"
    assert r1.json()["detail"][0]["loc"] == ["body", "prompt"]
    r2 = await env.client.get(nsfw["response_url"], headers=AUTH)
    assert r2.status_code == 200 and r2.json()["has_nsfw_concepts"] == [True]


async def test_invalid_input_fails_at_result_not_submit(env: Env) -> None:
    sub = await submit(env, FLUX, {"num_images": 1})
    await wait_completed(env, sub["status_url"])
    result = await env.client.get(sub["response_url"], headers=AUTH)
    assert result.status_code == 422
    assert result.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert result.json()["detail"][0]["msg"] == "field required"
    not_json = await env.client.post(f"{env.base}/{FLUX}", content=b"{oops", headers=AUTH)
    assert not_json.status_code == 400 and not_json.json()["error_type"] == "bad_request"


async def test_user_request_timeout(env: Env) -> None:
    sub = await submit(env, FLUX, {"prompt": "x [sim:queue=5]"}, headers={"X-Fal-Request-Timeout": "0.3"})
    done = await wait_completed(env, sub["status_url"], within=3)
    assert done["status"] == "COMPLETED"
    result = await env.client.get(sub["response_url"], headers=AUTH)
    assert result.status_code == 504 and result.json()["error_type"] == "request_timeout"
    assert result.headers["x-fal-request-timeout-type"] == "user"


# -- cancel ----------------------------------------------------------------------------------


async def test_cancel_outcomes(env: Env) -> None:
    unknown = await env.client.put(f"{env.base}/fal-ai/flux/requests/nope/cancel", headers=AUTH)
    assert unknown.status_code == 404 and unknown.json() == {"status": "NOT_FOUND"}

    queued = await submit(env, FLUX, {"prompt": "x [sim:queue=5]"})
    resp = await env.client.put(queued["cancel_url"], headers=AUTH)
    assert resp.status_code == 202 and resp.json() == {"status": "CANCELLATION_REQUESTED"}
    status = await env.client.get(queued["status_url"], headers=AUTH)
    assert status.status_code == 200 and status.json()["status"] == "COMPLETED"
    result = await env.client.get(queued["response_url"], headers=AUTH)
    assert result.status_code == 499 and result.json()["error_type"] == "client_cancelled"
    again = await env.client.put(queued["cancel_url"], headers=AUTH)
    assert again.status_code == 400 and again.json() == {"status": "ALREADY_COMPLETED"}

    done = await submit(env, FLUX, {"prompt": "x"})
    await wait_completed(env, done["status_url"])
    late = await env.client.put(done["cancel_url"], headers=AUTH)
    assert late.status_code == 400 and late.json() == {"status": "ALREADY_COMPLETED"}
    # GET on the cancel URL is not the cancel operation.
    assert (await env.client.get(done["cancel_url"], headers=AUTH)).status_code == 405


async def test_cancel_running_ignored_by_app(env: Env) -> None:
    env.sim.config.extra["cancel_running"] = "ignore"
    sub = await submit(env, FLUX, {"prompt": "x [sim:queue=0.01] [sim:run=0.5]"})
    await asyncio.sleep(0.1)
    resp = await env.client.put(sub["cancel_url"], headers=AUTH)
    assert resp.status_code == 202 and resp.json()["status"] == "CANCELLATION_REQUESTED"
    await wait_completed(env, sub["status_url"])
    result = await env.client.get(sub["response_url"], headers=AUTH)
    assert result.status_code == 200 and result.json()["images"]


# -- faults ----------------------------------------------------------------------------------


async def test_injected_faults(env: Env) -> None:
    await env.client.post(f"{env.base}/_sim/faults", json=[
        {"kind": "429", "route": "submit", "count": 2, "retry_after": 2},
        {"kind": "503", "route": "status"},
        {"kind": "malformed", "route": "result"},
    ])
    for _ in range(2):
        r = await env.client.post(f"{env.base}/{FLUX}", json={"prompt": "x"}, headers=AUTH)
        assert r.status_code == 429 and r.headers["retry-after"] == "2" and "detail" in r.json()
    assert env.sim.stats.creations == 0
    sub = await submit(env, FLUX, {"prompt": "x"})
    s = await env.client.get(sub["status_url"], headers=AUTH)
    assert s.status_code == 503
    await wait_completed(env, sub["status_url"])
    bad = await env.client.get(sub["response_url"], headers=AUTH)
    assert bad.status_code == 200
    with pytest.raises(ValueError):
        bad.json()
    good = await env.client.get(sub["response_url"], headers=AUTH)
    assert good.status_code == 200 and good.json()["images"]


async def test_ambiguous_submit(env: Env) -> None:
    await env.client.post(f"{env.base}/_sim/faults",
                          json=[{"kind": "502", "route": "submit", "after_effect": True}])
    r = await env.client.post(f"{env.base}/{FLUX}", json={"prompt": "costly"}, headers=AUTH)
    assert r.status_code == 502
    stats = (await env.client.get(f"{env.base}/_sim/stats")).json()
    assert stats["creations"] == 1  # the request exists although the client saw an error


# -- media expiry and retention --------------------------------------------------------------


async def test_output_urls_expire(env: Env) -> None:
    env.sim.config.output_ttl_seconds = 0.4
    sub = await submit(env, FLUX, {"prompt": "x"})
    await wait_completed(env, sub["status_url"])
    url = (await env.client.get(sub["response_url"], headers=AUTH)).json()["images"][0]["url"]
    assert (await env.client.get(url)).status_code == 200
    await asyncio.sleep(0.5)
    assert (await env.client.get(url)).status_code == 404


async def test_lifecycle_header_and_expire_control(env: Env) -> None:
    sub = await submit(env, KLING, {"prompt": "x"},
                       headers={"X-Fal-Object-Lifecycle-Preference": '{"expiration_duration_seconds": 0}'})
    await wait_completed(env, sub["status_url"])
    url = (await env.client.get(sub["response_url"], headers=AUTH)).json()["video"]["url"]
    assert (await env.client.get(url)).status_code == 404
    keep = await submit(env, FLUX, {"prompt": "y"})
    await wait_completed(env, keep["status_url"])
    url = (await env.client.get(keep["response_url"], headers=AUTH)).json()["images"][0]["url"]
    assert (await env.client.get(url)).status_code == 200
    await env.client.post(f"{env.base}/_sim/expire-files")
    assert (await env.client.get(url)).status_code == 404


async def test_store_io_off_result_retention(env: Env) -> None:
    env.sim.config.extra["result_ttl_seconds"] = 0.2
    sub = await submit(env, FLUX, {"prompt": "x"}, headers={"X-Fal-Store-IO": "0"})
    await wait_completed(env, sub["status_url"])
    assert (await env.client.get(sub["response_url"], headers=AUTH)).status_code == 200
    await asyncio.sleep(0.3)
    assert (await env.client.get(sub["response_url"], headers=AUTH)).status_code == 404


# -- webhooks --------------------------------------------------------------------------------


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
            return JSONResponse({"error": "try later"}, status_code=500)
        return JSONResponse({"ok": True})

    async with serving(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as base:
        rec.url = f"{base}/hook"
        yield rec


def verify(headers: dict[str, str], raw: bytes, jwks: dict[str, Any], tolerance: int = 300) -> bool:
    """fal's documented verification: Ed25519 over id\\nuser\\nts\\nsha256hex(body), hex signature."""
    h = {k.lower(): v for k, v in headers.items()}
    ts = h["x-fal-webhook-timestamp"]
    if abs(time.time() - int(ts)) > tolerance:
        return False
    msg = "\n".join([h["x-fal-webhook-request-id"], h["x-fal-webhook-user-id"], ts,
                     hashlib.sha256(raw).hexdigest()]).encode()
    sig = bytes.fromhex(h["x-fal-webhook-signature"])
    for k in jwks.get("keys", []):
        if k.get("kty") != "OKP" or k.get("crv") != "Ed25519":
            continue
        x = base64.urlsafe_b64decode(k["x"] + "=" * (-len(k["x"]) % 4))
        try:
            Ed25519PublicKey.from_public_bytes(x).verify(sig, msg)
            return True
        except InvalidSignature:
            pass
    return False


async def wait_hits(rec: Receiver, n: int, within: float = 5.0) -> None:
    for _ in range(int(within / 0.05)):
        if len(rec.hits) >= n:
            break
        await asyncio.sleep(0.05)
    assert len(rec.hits) >= n, f"got {len(rec.hits)} webhook(s), wanted {n}"


async def test_webhook_ok_signed(env: Env, receiver: Receiver) -> None:
    jwks = (await env.client.get(f"{env.base}/.well-known/jwks.json")).json()
    assert jwks["keys"][0]["kty"] == "OKP" and jwks["keys"][0]["crv"] == "Ed25519"
    sub = await submit(env, FLUX, {"prompt": "hooked"}, params={"fal_webhook": receiver.url})
    await wait_hits(receiver, 1)
    headers, raw = receiver.hits[0]
    assert verify(headers, raw, jwks)
    assert headers["x-fal-webhook-request-id"] == sub["request_id"]
    assert headers["x-fal-webhook-user-id"] == "sim-user"
    body = json.loads(raw)
    assert body["status"] == "OK" and body["request_id"] == sub["request_id"]
    assert body["gateway_request_id"] == sub["request_id"] and "error" not in body
    fetched = (await env.client.get(sub["response_url"], headers=AUTH)).json()
    assert body["payload"] == fetched
    image = await env.client.get(body["payload"]["images"][0]["url"])
    assert image.content[:4] == b"\x89PNG"
    # Tampering with the body breaks the signature.
    assert not verify(headers, raw.replace(b"hooked", b"hacked"), jwks)
    await asyncio.sleep(0.2)
    assert len(receiver.hits) == 1  # one webhook per request, no progress events


async def test_webhook_error_and_traps(env: Env, receiver: Receiver) -> None:
    await submit(env, FLUX, {"prompt": "x [sim:fail=runner_server_error] [sim:retried]"},
                 params={"fal_webhook": receiver.url})
    await wait_hits(receiver, 1)
    body = json.loads(receiver.hits[0][1])
    assert body["status"] == "ERROR" and body["error"] == "Invalid status code: 500"
    assert body["payload"]["error_type"] == "runner_server_error"
    assert body["gateway_request_id"] != body["request_id"]

    await submit(env, FLUX, {"prompt": "x [sim:payload_error]"}, params={"fal_webhook": receiver.url})
    await wait_hits(receiver, 2)
    body = json.loads(receiver.hits[1][1])
    assert body["status"] == "OK" and body["payload"] is None and body["payload_error"]


async def test_webhook_retries_until_2xx(env: Env, receiver: Receiver) -> None:
    env.sim.config.extra["webhook_retry_base"] = 0.05
    receiver.fail_first = 2
    await submit(env, FLUX, {"prompt": "x"}, params={"fal_webhook": receiver.url})
    await wait_hits(receiver, 3)
    jwks = (await env.client.get(f"{env.base}/.well-known/jwks.json")).json()
    assert all(verify(h, raw, jwks) for h, raw in receiver.hits)
    assert len({raw for _, raw in receiver.hits}) == 1
    log = (await env.client.get(f"{env.base}/_sim/fal/webhooks")).json()["deliveries"]
    assert [d["status_code"] for d in log] == [500, 500, 200]


async def test_webhook_key_rotation(env: Env, receiver: Receiver) -> None:
    cached = (await env.client.get(f"{env.base}/.well-known/jwks.json")).json()
    rotated = (await env.client.post(f"{env.base}/_sim/fal/rotate-key", json={})).json()
    assert len(rotated["keys"]) == 2 and rotated["signing_kid"] == rotated["kid"]
    await submit(env, FLUX, {"prompt": "x"}, params={"fal_webhook": receiver.url})
    await wait_hits(receiver, 1)
    headers, raw = receiver.hits[0]
    assert not verify(headers, raw, cached)  # signed with a key the verifier has not seen
    fresh = (await env.client.get(f"{env.base}/.well-known/jwks.json")).json()
    assert verify(headers, raw, fresh)  # refresh on unknown key, then it verifies
    retired = (await env.client.post(f"{env.base}/_sim/fal/rotate-key", json={"retire_old": True})).json()
    assert len(retired["keys"]) == 1 and retired["keys"][0]["kid"] == retired["kid"]


async def test_webhook_faults(env: Env, receiver: Receiver) -> None:
    env.sim.config.extra |= {"webhook_duplicate": True, "webhook_timestamp_skew": -600}
    await submit(env, FLUX, {"prompt": "x"}, params={"fal_webhook": receiver.url})
    await wait_hits(receiver, 2)
    jwks = env.sim.jwks()
    (h1, raw1), (h2, raw2) = receiver.hits[:2]
    assert raw1 == raw2
    assert not verify(h1, raw1, jwks)  # stale timestamp
    assert verify(h1, raw1, jwks, tolerance=10_000)

    env.sim.config.extra = {"webhook_corrupt_signature": True}
    await submit(env, FLUX, {"prompt": "y"}, params={"fal_webhook": receiver.url})
    await wait_hits(receiver, 3)
    assert not verify(*receiver.hits[2], jwks)

    env.sim.config.extra = {"webhook_drop": True}
    await submit(env, FLUX, {"prompt": "z"}, params={"fal_webhook": receiver.url})
    await asyncio.sleep(0.8)
    assert len(receiver.hits) == 3


async def test_no_webhook_for_cancelled_request(env: Env, receiver: Receiver) -> None:
    sub = await submit(env, FLUX, {"prompt": "x [sim:queue=0.5]"}, params={"fal_webhook": receiver.url})
    await env.client.put(sub["cancel_url"], headers=AUTH)
    await asyncio.sleep(1.0)
    assert receiver.hits == []
    env.sim.config.extra["webhook_on_cancel"] = True
    sub = await submit(env, FLUX, {"prompt": "x [sim:queue=0.5]"}, params={"fal_webhook": receiver.url})
    await env.client.put(sub["cancel_url"], headers=AUTH)
    await wait_hits(receiver, 1)
    body = json.loads(receiver.hits[0][1])
    assert body["status"] == "ERROR" and body["payload"]["error_type"] == "client_cancelled"
