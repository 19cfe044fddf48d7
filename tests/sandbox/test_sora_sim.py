"""The OpenAI Sora (Videos API) simulator, driven over real HTTP as OpenAI's docs describe."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig
from providers.sandbox.serve import serving
from providers.sandbox.sora import SoraSimulator

KEY = "sk-test-sora-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
Sora = tuple[SoraSimulator, httpx.AsyncClient]


def make_sim(**extra: Any) -> SoraSimulator:
    return SoraSimulator(SimConfig(queue_seconds=0.05, run_seconds=0.25, api_keys=[KEY], extra=extra))


@pytest.fixture
async def sora() -> AsyncIterator[tuple[SoraSimulator, httpx.AsyncClient]]:
    sim = make_sim()
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as client:
        yield sim, client


async def wait_for(client: httpx.AsyncClient, video_id: str,
                   statuses: tuple[str, ...] = ("completed", "failed"),
                   within: float = 5.0) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        r = await client.get(f"/v1/videos/{video_id}")
        assert r.status_code == 200, r.text
        seen.append(r.json())
        if seen[-1]["status"] in statuses:
            return seen
        await asyncio.sleep(0.02)
    raise AssertionError(f"video {video_id} never reached {statuses}: {seen[-1]}")


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def png_of(width: int, height: int) -> bytes:
    return media.png("ref", width, height)


# -- happy path -----------------------------------------------------------------


async def test_json_create_poll_and_download(sora: Sora) -> None:
    sim, client = sora
    r = await client.post("/v1/videos", json={"prompt": "a teal coupe", "model": "sora-2-pro",
                                              "seconds": "8", "size": "1280x720"})
    assert r.status_code == 200
    assert r.headers["x-request-id"].startswith("req_")
    assert int(r.headers["openai-poll-after-ms"]) > 0
    video = r.json()
    assert video["id"].startswith("video_") and video["object"] == "video"
    assert video["status"] == "queued" and video["progress"] == 0
    assert (video["model"], video["seconds"], video["size"]) == ("sora-2-pro", "8", "1280x720")
    assert isinstance(video["created_at"], int)
    # Not terminal yet: the guide's examples omit these fields entirely.
    assert "completed_at" not in video and "error" not in video and "expires_at" not in video

    early = await client.get(f"/v1/videos/{video['id']}/content")
    assert early.status_code == 404
    assert early.json()["error"]["type"] == "invalid_request_error"
    assert "not ready" in early.json()["error"]["message"]

    history = await wait_for(client, video["id"])
    statuses = [v["status"] for v in history]
    assert "in_progress" in statuses
    progress = [v["progress"] for v in history]
    assert progress == sorted(progress)
    done = history[-1]
    assert done["status"] == "completed" and done["progress"] == 100 and done["error"] is None
    assert done["expires_at"] - done["completed_at"] == pytest.approx(3600, abs=1)

    content = await client.get(f"/v1/videos/{video['id']}/content", headers={"Accept": "application/binary"})
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert content.content[4:8] == b"ftyp"
    thumb = await client.get(f"/v1/videos/{video['id']}/content", params={"variant": "thumbnail"})
    assert thumb.headers["content-type"] == "image/webp"
    assert thumb.content[:4] == b"RIFF" and thumb.content[8:12] == b"WEBP"
    sprite = await client.get(f"/v1/videos/{video['id']}/content", params={"variant": "spritesheet"})
    assert sprite.headers["content-type"] == "image/jpeg" and sprite.content[:3] == b"\xff\xd8\xff"
    bad = await client.get(f"/v1/videos/{video['id']}/content", params={"variant": "gif"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "variant"

    other = (await client.post("/v1/videos", json={"prompt": "another"})).json()
    await wait_for(client, other["id"])
    other_bytes = (await client.get(f"/v1/videos/{other['id']}/content")).content
    assert hashlib.sha256(other_bytes).digest() != hashlib.sha256(content.content).digest()
    assert (other["model"], other["seconds"], other["size"]) == ("sora-2", "4", "720x1280")  # defaults
    assert sim.stats.creations == 2


async def test_multipart_create_like_the_sdk(sora: Sora) -> None:
    _, client = sora
    r = await client.post("/v1/videos", data={"prompt": "from an image", "model": "sora-2",
                                              "size": "1280x720", "seconds": "4"},
                          files={"input_reference": ("ref.png", png_of(1280, 720), "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["size"] == "1280x720"

    r = await client.post("/v1/videos", data={"prompt": "wrong image", "size": "1280x720"},
                          files={"input_reference": ("ref.png", png_of(640, 480), "image/png")})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "Inpaint image must match the requested width and height"

    data_url = "data:image/png;base64," + base64.b64encode(png_of(720, 1280)).decode()
    r = await client.post("/v1/videos", json={"prompt": "json ref",
                                              "input_reference": {"image_url": data_url}})
    assert r.status_code == 200, r.text
    r = await client.post("/v1/videos", json={"prompt": "two refs", "input_reference": {
        "image_url": data_url, "file_id": "file_123"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input_reference"


# -- validation ------------------------------------------------------------------


@pytest.mark.parametrize(("body", "param", "code", "message"), [
    ({"prompt": "x", "seconds": 8}, "seconds", "invalid_type",
     "Invalid type for 'seconds': expected one of '4', '8', or '12', but got an integer instead."),
    ({"prompt": "x", "seconds": "5"}, "seconds", "invalid_value",
     "Invalid value: '5'. Supported values are: '4', '8', and '12'."),
    ({"prompt": "x", "model": "sora-2", "size": "1792x1024"}, "size", "invalid_value", None),
    ({"prompt": "x", "model": "sora-2-pro", "size": "1920x1080"}, "size", "invalid_value", None),
    ({"prompt": "x", "size": "1000x1000"}, "size", "invalid_value", None),
    ({"prompt": "x", "model": "sora-3"}, "model", "invalid_value", None),
    ({"seconds": "4"}, "prompt", "missing_required_parameter", "Missing required parameter: 'prompt'."),
    ({"prompt": 5}, "prompt", "invalid_type", None),
])
async def test_rejects_bad_input_like_openai(sora: Sora, body: dict[str, Any],
                                             param: str, code: str, message: str | None) -> None:
    sim, client = sora
    r = await client.post("/v1/videos", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["type"], err["param"], err["code"]) == ("invalid_request_error", param, code)
    if message is not None:
        assert err["message"] == message
    assert sim.stats.creations == 0


async def test_size_rules_per_model_and_extended_superset() -> None:
    sim = make_sim()
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, headers=AUTH) as client:
        ok = await client.post("/v1/videos", json={"prompt": "x", "model": "sora-2-pro", "size": "1792x1024"})
        assert ok.status_code == 200
        sim.config.extra["sora_extended"] = True
        hd = await client.post("/v1/videos", json={"prompt": "x", "model": "sora-2-pro", "size": "1920x1080",
                                                   "seconds": "20"})
        assert hd.status_code == 200, hd.text
        still_bad = await client.post("/v1/videos", json={"prompt": "x", "model": "sora-2",
                                                          "size": "1920x1080"})
        assert still_bad.status_code == 400 and still_bad.json()["error"]["param"] == "size"


async def test_unparseable_bodies(sora: Sora) -> None:
    _, client = sora
    r = await client.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "could not parse the JSON body" in r.json()["error"]["message"]
    r = await client.post("/v1/videos", content=b"prompt=x", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and "Unsupported content type" in r.json()["error"]["message"]


# -- auth --------------------------------------------------------------------------


async def test_auth_rejections() -> None:
    sim = make_sim(sora_unverified_keys=["sk-unverified"])
    sim.config.api_keys.append("sk-unverified")
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base) as client:
        r = await client.get("/v1/videos")
        assert r.status_code == 401
        assert r.json()["error"]["message"].startswith("You didn't provide an API key.")
        r = await client.get("/v1/videos", headers={"Authorization": "Bearer sk-wrong-key-123456"})
        assert r.status_code == 401
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and "sk-wrong-key" not in err["message"]
        r = await client.post("/v1/videos", json={"prompt": "x"},
                              headers={"Authorization": "Bearer sk-unverified"})
        assert r.status_code == 403 and "must be verified" in r.json()["error"]["message"]
    assert sim.stats.creations == 0


# -- failure traps -----------------------------------------------------------------


async def test_failed_videos_carry_an_error_object(sora: Sora) -> None:
    sim, client = sora
    failed = (await client.post("/v1/videos", json={"prompt": "boom [sim:fail]"})).json()
    custom = (await client.post("/v1/videos", json={"prompt": "boom [sim:fail=video_too_long]"})).json()
    moderated = (await client.post("/v1/videos", json={"prompt": "hmm [sim:moderation]"})).json()
    for vid, code in ((failed["id"], "internal_error"), (custom["id"], "video_too_long"),
                      (moderated["id"], "moderation_blocked")):
        final = (await wait_for(client, vid))[-1]
        assert final["status"] == "failed" and final["progress"] == 0
        assert final["error"]["code"] == code and final["error"]["message"]
        assert final["expires_at"] is None
        r = await client.get(f"/v1/videos/{vid}/content")
        assert r.status_code == 404

    blocked = await client.post("/v1/videos", json={"prompt": "no [sim:blocked]"})
    assert blocked.status_code == 400 and blocked.json()["error"]["code"] == "moderation_blocked"
    assert sim.stats.creations == 3


async def test_unknown_video_is_404(sora: Sora) -> None:
    _, client = sora
    r = await client.get("/v1/videos/video_nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"


# -- injected faults ---------------------------------------------------------------


async def test_429_with_and_without_retry_after(sora: Sora) -> None:
    sim, client = sora
    await client.post("/_sim/faults", json=[{"kind": "429", "route": "create", "retry_after": 0.25},
                                            {"kind": "429", "route": "get"}])
    r = await client.post("/v1/videos", json={"prompt": "x"})
    assert r.status_code == 429
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and r.json()["error"]["type"] == "requests"
    assert r.headers["retry-after-ms"] == "250" and r.headers["retry-after"] == "1"
    assert r.headers["x-request-id"]
    ok = await client.post("/v1/videos", json={"prompt": "x"})
    assert ok.status_code == 200
    r = await client.get(f"/v1/videos/{ok.json()['id']}")
    assert r.status_code == 429 and "retry-after" not in r.headers and "retry-after-ms" not in r.headers
    assert sim.stats.creations == 1

    sim.config.extra["sora_429_kind"] = "insufficient_quota"
    await client.post("/_sim/faults", json=[{"kind": "429", "route": "create"}])
    r = await client.post("/v1/videos", json={"prompt": "x"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"


async def test_5xx_and_malformed(sora: Sora) -> None:
    _, client = sora
    await client.post("/_sim/faults", json=[{"kind": "500", "route": "create"},
                                            {"kind": "502", "route": "create"},
                                            {"kind": "malformed", "route": "create"}])
    r = await client.post("/v1/videos", json={"prompt": "x"})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    r = await client.post("/v1/videos", json={"prompt": "x"})
    assert r.status_code == 502 and r.headers["content-type"].startswith("text/html")
    assert "cloudflare" in r.text
    r = await client.post("/v1/videos", json={"prompt": "x"})
    assert r.status_code == 200
    with pytest.raises(ValueError):
        r.json()


async def test_ambiguous_create_can_be_reconciled_by_listing(sora: Sora) -> None:
    sim, client = sora
    await client.post("/_sim/faults", json=[{"kind": "503", "route": "create", "after_effect": True}])
    r = await client.post("/v1/videos", json={"prompt": "ambiguous one", "seconds": "8"})
    assert r.status_code == 503
    listed = (await client.get("/v1/videos", params={"limit": 5})).json()
    assert listed["object"] == "list"
    assert [v["prompt"] for v in listed["data"]] == ["ambiguous one"]
    assert sim.stats.creations == 1


async def test_hang_fault(sora: Sora) -> None:
    _, client = sora
    await client.post("/_sim/faults", json=[{"kind": "timeout", "route": "get", "delay": 0.6}])
    with pytest.raises(httpx.ReadTimeout):
        await client.get("/v1/videos/video_x", timeout=0.2)


# -- list, delete, remix, edits, extensions ------------------------------------------


async def test_list_pagination(sora: Sora) -> None:
    _, client = sora
    ids = [(await client.post("/v1/videos", json={"prompt": f"p{i}"})).json()["id"] for i in range(5)]
    page = (await client.get("/v1/videos", params={"limit": 2})).json()
    assert [v["id"] for v in page["data"]] == [ids[4], ids[3]]
    assert page["has_more"] is True and page["first_id"] == ids[4] and page["last_id"] == ids[3]
    page2 = (await client.get("/v1/videos", params={"limit": 2, "after": page["last_id"]})).json()
    assert [v["id"] for v in page2["data"]] == [ids[2], ids[1]]
    last = (await client.get("/v1/videos", params={"limit": 2, "after": ids[1]})).json()
    assert [v["id"] for v in last["data"]] == [ids[0]] and last["has_more"] is False
    asc = (await client.get("/v1/videos", params={"order": "asc", "limit": 100})).json()
    assert [v["id"] for v in asc["data"]] == ids
    bad = await client.get("/v1/videos", params={"limit": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "limit"


async def test_delete_only_terminal_videos(sora: Sora) -> None:
    _, client = sora
    vid = (await client.post("/v1/videos", json={"prompt": "x"})).json()["id"]
    r = await client.delete(f"/v1/videos/{vid}")
    assert r.status_code == 400
    await wait_for(client, vid)
    r = await client.delete(f"/v1/videos/{vid}")
    assert r.json() == {"id": vid, "deleted": True, "object": "video.deleted"}
    assert (await client.get(f"/v1/videos/{vid}")).status_code == 404
    assert (await client.get(f"/v1/videos/{vid}/content")).status_code == 404
    assert (await client.get("/v1/videos")).json()["data"] == []


async def test_remix_edit_extend(sora: Sora) -> None:
    _, client = sora
    src = (await client.post("/v1/videos", json={"prompt": "base", "seconds": "8",
                                                 "size": "1280x720"})).json()
    early = await client.post(f"/v1/videos/{src['id']}/remix", json={"prompt": "now at night"})
    assert early.status_code == 400
    await wait_for(client, src["id"])
    remix = (await client.post(f"/v1/videos/{src['id']}/remix", json={"prompt": "now at night"})).json()
    assert remix["remixed_from_video_id"] == src["id"] and remix["id"] != src["id"]
    assert (remix["size"], remix["seconds"]) == ("1280x720", "8")
    edit = await client.post("/v1/videos/edits", json={"prompt": "make it blue", "video": {"id": src["id"]}})
    assert edit.status_code == 200 and edit.json()["size"] == "1280x720"
    ext = await client.post("/v1/videos/extensions", json={"prompt": "go on", "seconds": "4",
                                                           "video": {"id": src["id"]}})
    assert ext.status_code == 200 and ext.json()["seconds"] == "12"
    missing = await client.post("/v1/videos/remix", json={"prompt": "x"})
    assert missing.status_code in (404, 405)
    gone = await client.post("/v1/videos/video_nope/remix", json={"prompt": "x"})
    assert gone.status_code == 404


# -- expiry ------------------------------------------------------------------------


async def test_content_expires() -> None:
    sim = SoraSimulator(SimConfig(queue_seconds=0.0, run_seconds=0.05, output_ttl_seconds=0.4,
                                  api_keys=[KEY]))
    async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, headers=AUTH) as client:
        vid = (await client.post("/v1/videos", json={"prompt": "x"})).json()["id"]
        await wait_for(client, vid)
        assert (await client.get(f"/v1/videos/{vid}/content")).status_code == 200
        await asyncio.sleep(0.5)
        r = await client.get(f"/v1/videos/{vid}/content")
        assert r.status_code == 404 and "expired" in r.json()["error"]["message"]
        assert (await client.get(f"/v1/videos/{vid}")).json()["expires_at"] <= time.time()

        sim.config.output_ttl_seconds = 3600
        other = (await client.post("/v1/videos", json={"prompt": "y"})).json()["id"]
        await wait_for(client, other)
        assert (await client.get(f"/v1/videos/{other}/content")).status_code == 200
        await client.post("/_sim/expire-files")
        assert (await client.get(f"/v1/videos/{other}/content")).status_code == 404


# -- webhooks ----------------------------------------------------------------------


class Receiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        self.requests.append((dict(request.headers), await request.body()))
        if len(self.requests) <= self.fail_first:
            return JSONResponse({"error": "try later"}, status_code=500)
        return Response(status_code=204)


async def with_receiver(receiver: Receiver, body: Callable[[str], Awaitable[None]]) -> None:
    async with serving(receiver.app) as hook_base:
        await body(hook_base + "/hook")


async def test_project_webhooks_signed_and_retried() -> None:
    receiver = Receiver(fail_first=1)
    sim = make_sim(webhook_retry_delays=[0.05, 0.05])

    async def run(hook_url: str) -> None:
        sim.config.extra["webhook_url"] = hook_url
        async with serving(sim.app) as base, httpx.AsyncClient(base_url=base, headers=AUTH) as client:
            ok = (await client.post("/v1/videos", json={"prompt": "fine"})).json()["id"]
            bad = (await client.post("/v1/videos", json={"prompt": "bad [sim:fail]"})).json()["id"]
            await until(lambda: len(receiver.requests) >= 3)
            await asyncio.sleep(0.1)
            verifier = Webhook(sim.webhook_secret)
            events: dict[str, dict[str, Any]] = {}
            ids: dict[str, set[str]] = {}
            for headers, raw in receiver.requests:
                assert headers["user-agent"].startswith("OpenAI/1.0")
                event = verifier.verify(raw, headers)
                assert event["object"] == "event" and event["id"].startswith("evt_")
                events[event["data"]["id"]] = event
                ids.setdefault(event["data"]["id"], set()).add(headers["webhook-id"])
            assert events[ok]["type"] == "video.completed"
            assert events[bad]["type"] == "video.failed"
            assert len(receiver.requests) == 3  # one retry after the receiver's 500 ...
            assert all(len(v) == 1 for v in ids.values())  # ... carrying the same webhook-id
            # The payload is thin: the state comes from GET.
            assert (await client.get(f"/v1/videos/{ok}")).json()["status"] == "completed"

    await with_receiver(receiver, run)


async def test_no_webhooks_without_a_project_endpoint(sora: Sora) -> None:
    sim, client = sora
    vid = (await client.post("/v1/videos", json={"prompt": "x"})).json()["id"]
    await wait_for(client, vid)
    await asyncio.sleep(0.05)
    assert list(sim.webhook_attempts) == []
