"""The Jimeng (Volcengine visual API) simulator, driven with requests signed as Volcengine documents.

The test signs with its own small V4 signer, written from the reference, not with the simulator's
verification code (the volcengine SDK is not installed).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from providers.sandbox.base import SimConfig
from providers.sandbox.jimeng import JimengSimulator
from providers.sandbox.media import png
from providers.sandbox.serve import serving

AK, SK = "AKLTsandbox0001", "c2FuZGJveC1zZWNyZXQ="
SUBMIT, RESULT = "CVSync2AsyncSubmitTask", "CVSync2AsyncGetResult"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signed_request(base: str, action: str, payload: bytes, *, path: str = "/", ak: str = AK, sk: str = SK,
                   when: datetime | None = None, region: str = "cn-north-1", version: str = "2022-08-31",
                   signed_path: str | None = None) -> tuple[str, dict[str, str]]:
    """URL and headers of a POST signed with Volcengine's HMAC-SHA256 V4 scheme (the reference's sketch)."""
    host = urlsplit(base).netloc
    x_date = (when or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    date = x_date[:8]
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}"
                     for k, v in sorted({"Action": action, "Version": version}.items()))
    payload_hash = hashlib.sha256(payload).hexdigest()
    headers = {"content-type": "application/json", "host": host, "x-content-sha256": payload_hash, "x-date": x_date}
    signed = ";".join(sorted(headers))
    canonical_headers = "".join(f"{k}:{headers[k].strip()}\n" for k in sorted(headers))
    canonical = "\n".join(["POST", signed_path or path, query, canonical_headers, signed, payload_hash])
    scope = f"{date}/{region}/cv/request"
    to_sign = "\n".join(["HMAC-SHA256", x_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(sk.encode(), date), region), "cv"), "request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out = {"Authorization": f"HMAC-SHA256 Credential={ak}/{scope}, SignedHeaders={signed}, Signature={signature}",
           "X-Date": x_date, "X-Content-Sha256": payload_hash, "Content-Type": "application/json"}
    return f"{base}{path}?{query}", out


@dataclass
class Env:
    sim: JimengSimulator
    base: str
    http: httpx.AsyncClient

    async def call(self, action: str, body: dict[str, Any], **kw: Any) -> httpx.Response:
        raw = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        url, headers = signed_request(self.base, action, raw, **kw)
        return await self.http.post(url, content=raw, headers=headers)

    async def submit(self, **body: Any) -> str:
        body.setdefault("req_key", "jimeng_t2v_v30")
        body.setdefault("prompt", "千军万马在草原上奔腾，航拍镜头")
        r = await self.call(SUBMIT, body)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["code"] == 10000 and got["status"] == 10000 and got["message"] == "Success"
        assert re.fullmatch(r"\d{19}", got["data"]["task_id"])
        return str(got["data"]["task_id"])

    async def result(self, task_id: str, req_key: str = "jimeng_t2v_v30", **body: Any) -> httpx.Response:
        return await self.call(RESULT, {"req_key": req_key, "task_id": task_id, **body})

    async def wait(self, task_id: str, req_key: str = "jimeng_t2v_v30", within: float = 5,
                   **body: Any) -> httpx.Response:
        deadline = time.time() + within
        while time.time() < deadline:
            r = await self.result(task_id, req_key, **body)
            data = r.json().get("data")
            if not (r.status_code == 200 and data and data["status"] in ("in_queue", "generating")):
                return r
            await asyncio.sleep(0.03)
        raise AssertionError("task did not finish")


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    sim = JimengSimulator(SimConfig(queue_seconds=0.1, run_seconds=0.2, extra={"key_pairs": {AK: SK}}))
    async with serving(sim.app) as base, httpx.AsyncClient(timeout=10) as http:
        yield Env(sim, base, http)


async def test_text_to_video_success(env: Env) -> None:
    task_id = await env.submit(prompt="a herd of horses [sim:queue=0.2] [sim:run=0.3]", frames=121,
                               aspect_ratio="16:9", seed=-1)
    statuses: list[str] = []
    while True:
        r = await env.result(task_id)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["code"] == 10000 and re.fullmatch(r"\d{14}[0-9A-F]{20}", got["request_id"])
        assert got["time_elapsed"].endswith("ms")
        if not statuses or statuses[-1] != got["data"]["status"]:
            statuses.append(got["data"]["status"])
        if got["data"]["status"] not in ("in_queue", "generating"):
            break
        assert got["data"]["video_url"] == ""
        await asyncio.sleep(0.03)
    assert statuses == ["in_queue", "generating", "done"]
    data = got["data"]
    assert data["aigc_meta_tagged"] is False
    video = await env.http.get(data["video_url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4" and video.content[4:8] == b"ftyp"
    tagged = await env.result(task_id, req_json=json.dumps({"aigc_meta": {"producer_id": "job-1"}}))
    assert tagged.json()["data"]["aigc_meta_tagged"] is True
    assert tagged.json()["data"]["video_url"] == data["video_url"]

    other = (await env.wait(await env.submit(prompt="a different video"))).json()["data"]
    assert (await env.http.get(other["video_url"])).content != video.content


async def test_image_inputs(env: Env) -> None:
    raw = base64.b64encode(png("first frame")).decode()
    first = await env.submit(req_key="jimeng_i2v_first_v30", prompt="", binary_data_base64=[raw])
    tail = await env.submit(req_key="jimeng_i2v_first_tail_v30", image_urls=["https://example.com/a.png",
                                                                          "https://example.com/b.png"])
    for task_id, key in ((first, "jimeng_i2v_first_v30"), (tail, "jimeng_i2v_first_tail_v30")):
        assert (await env.wait(task_id, key)).json()["data"]["status"] == "done"
    bad: list[dict[str, Any]] = [
        {"req_key": "jimeng_i2v_first_v30", "binary_data_base64": ["data:image/png;base64," + raw]},
        {"req_key": "jimeng_i2v_first_v30", "prompt": "x"},  # no image
        {"req_key": "jimeng_i2v_first_tail_v30", "image_urls": ["https://example.com/a.png"]},
        {"req_key": "jimeng_t2v_v30", "prompt": "x", "frames": 120},
        {"req_key": "jimeng_t2v_v30", "prompt": "x", "aspect_ratio": "2:1"},
        {"req_key": "jimeng_t2v_v30", "prompt": "x" * 801},
        {"req_key": "jimeng_video_v99", "prompt": "x"},
    ]
    for body in bad:
        r = await env.call(SUBMIT, body)
        assert r.status_code == 400 and r.json()["code"] == 50400 and r.json()["data"] is None, body
    assert env.sim.stats.creations == 2


async def test_image_req_key_base64_or_urls(env: Env) -> None:
    task_id = await env.submit(req_key="jimeng_t2i_v40", prompt="a poster [sim:images=3]")
    data = (await env.wait(task_id, "jimeng_t2i_v40")).json()["data"]
    assert data["status"] == "done" and data["image_urls"] is None and len(data["binary_data_base64"]) == 3
    assert all(base64.b64decode(b)[:4] == b"\x89PNG" for b in data["binary_data_base64"])
    with_urls = (await env.result(task_id, "jimeng_t2i_v40", req_json=json.dumps({"return_url": True}))).json()
    urls = with_urls["data"]["image_urls"]
    assert with_urls["data"]["binary_data_base64"] is None and len(urls) == 3
    assert (await env.http.get(urls[0])).content == base64.b64decode(data["binary_data_base64"][0])
    single = await env.submit(req_key="jimeng_t2i_v40", prompt="x [sim:images=3]", force_single=True)
    assert len((await env.wait(single, "jimeng_t2i_v40")).json()["data"]["binary_data_base64"]) == 1
    r = await env.result(task_id, "jimeng_t2i_v40", req_json={"return_url": True})  # must be a JSON string
    assert r.status_code == 400 and r.json()["code"] == 50400


async def test_bad_signatures_are_refused(env: Env) -> None:
    body = {"req_key": "jimeng_t2v_v30", "prompt": "a cat"}
    raw = json.dumps(body).encode()

    async def post(url: str, headers: dict[str, str], content: bytes = raw) -> dict[str, Any]:
        r = await env.http.post(url, content=content, headers=headers)
        meta: dict[str, Any] = r.json()["ResponseMetadata"]
        assert meta["Service"] == "cv" and meta["Region"] == "cn-north-1" and meta["RequestId"]
        meta["http_status"] = r.status_code
        return meta

    url, headers = signed_request(env.base, SUBMIT, raw, sk="not-the-secret")
    meta = await post(url, headers)
    assert meta["http_status"] == 401 and meta["Action"] == SUBMIT and meta["Version"] == "2022-08-31"
    assert meta["Error"]["Code"] == "SignatureDoesNotMatch" and meta["Error"]["CodeN"] == 100010

    url, headers = signed_request(env.base, SUBMIT, raw, ak="AKLTunknown")
    assert (await post(url, headers))["Error"] == {"CodeN": 100009, "Code": "InvalidAccessKey",
                                                   "Message": "The access key you provided is invalid."}
    url, headers = signed_request(env.base, SUBMIT, raw)
    tampered = json.dumps(body, indent=1).encode()  # the body re-serialised after signing
    assert (await post(url, headers, tampered))["Error"]["Code"] == "SignatureDoesNotMatch"
    changed_query = url.replace(SUBMIT, RESULT)  # the action is part of the signature
    assert (await post(changed_query, headers))["Error"]["Code"] == "SignatureDoesNotMatch"
    url, headers = signed_request(env.base, SUBMIT, raw, when=datetime.fromtimestamp(time.time() - 1200, UTC))
    assert (await post(url, headers))["Error"]["Code"] == "SignatureDoesNotMatch"  # clock skew
    url, headers = signed_request(env.base, SUBMIT, raw, region="cn-beijing")
    assert (await post(url, headers))["Error"]["Code"] == "SignatureDoesNotMatch"
    missing = await post(url, {"Content-Type": "application/json"})
    assert missing["http_status"] == 400 and missing["Error"]["Code"] == "InvalidAuthorization"
    no_date = {k: v for k, v in signed_request(env.base, SUBMIT, raw)[1].items() if k != "X-Date"}
    assert (await post(url, no_date))["Error"]["Code"] == "MissingRequestInfo"
    assert env.sim.stats.creations == 0

    r = await env.call("CVProcess", body)
    assert r.status_code == 404 and r.json()["ResponseMetadata"]["Error"]["Code"] == "InvalidActionOrVersion"
    env.sim.config.api_keys = ["AKLTsecond:second-secret"]
    assert (await env.call(SUBMIT, body, ak="AKLTsecond", sk="second-secret")).json()["code"] == 10000


async def test_signature_covers_the_mount_path() -> None:
    sim = JimengSimulator(SimConfig(queue_seconds=0.05, run_seconds=0.05, extra={"key_pairs": {AK: SK}}))
    app = Starlette(routes=[Mount("/jimeng", app=sim.app)])
    async with serving(app) as base, httpx.AsyncClient(timeout=10) as http:
        env = Env(sim, base, http)
        r = await env.call(SUBMIT, {"req_key": "jimeng_t2v_v30", "prompt": "x"}, path="/jimeng/")
        assert r.status_code == 200 and r.json()["code"] == 10000
        r = await env.call(SUBMIT, {"req_key": "jimeng_t2v_v30", "prompt": "x"}, path="/jimeng/", signed_path="/")
        assert r.status_code == 401 and r.json()["ResponseMetadata"]["Error"]["Code"] == "SignatureDoesNotMatch"


async def test_content_refusals_and_failures(env: Env) -> None:
    for directive, code in (("blocked", 50412), ("sensitive", 50413), ("image_risk", 50411)):
        r = await env.call(SUBMIT, {"req_key": "jimeng_t2v_v30", "prompt": f"x [sim:{directive}]"})
        assert r.status_code == 400 and r.json()["code"] == code and r.json()["data"] is None
    assert env.sim.stats.creations == 0
    # Output moderation: not "done"+10000 but the outer code, HTTP 400, data null.
    filtered = await env.wait(await env.submit(prompt="x [sim:filtered]"))
    assert filtered.status_code == 400
    assert filtered.json() | {"request_id": "", "time_elapsed": ""} == {
        "code": 50511, "data": None, "message": "Post Img Risk Not Pass", "request_id": "", "status": 50511,
        "time_elapsed": ""}
    failed = await env.wait(await env.submit(prompt="x [sim:fail]"))
    assert failed.status_code == 500 and failed.json()["code"] == 50500
    env.sim.config.extra["failed_result_data"] = "done"
    again = await env.wait(await env.submit(prompt="x [sim:filtered]"))
    assert again.json()["code"] == 50511 and again.json()["data"] == {"status": "done", "video_url": ""}


async def test_not_found_and_expired(env: Env) -> None:
    unknown = await env.result("7392616336519610409")
    assert unknown.status_code == 200 and unknown.json()["data"] == {"status": "not_found", "video_url": ""}
    task_id = await env.submit()
    # GetResult must name the submit's req_key (CONFLICT: new-api always sends jimeng_vgfm_t2v_l20).
    assert (await env.result(task_id, "jimeng_vgfm_t2v_l20")).json()["data"]["status"] == "not_found"
    env.sim.config.extra["result_req_key"] = "lenient"
    assert (await env.wait(task_id, "jimeng_vgfm_t2v_l20")).json()["data"]["status"] == "done"
    expired = await env.submit(prompt="x [sim:expired]")
    assert (await env.wait(expired)).json()["data"]["status"] == "expired"
    env.sim.config.extra["task_ttl_seconds"] = 0.01  # 12 h at Volcengine
    assert (await env.result(task_id)).json()["data"]["status"] == "not_found"
    env.sim.config.extra["stale_status"] = "expired"
    assert (await env.result(task_id)).json()["data"]["status"] == "expired"


async def test_429_on_submit_and_result(env: Env) -> None:
    await env.http.post(f"{env.base}/_sim/faults", json=[{"kind": "429", "route": "submit"},
                                                          {"kind": "429", "route": "result"}])
    r = await env.call(SUBMIT, {"req_key": "jimeng_t2v_v30", "prompt": "x"})
    assert r.status_code == 429 and r.json()["code"] == 50429
    task_id = await env.submit(prompt="x")
    assert env.sim.stats.creations == 1
    r = await env.result(task_id)
    assert r.status_code == 429 and r.json()["code"] == 50429  # not a task failure
    assert (await env.wait(task_id)).json()["data"]["status"] == "done"

    r = await env.call(SUBMIT, {"req_key": "jimeng_t2v_v30", "prompt": "x [sim:concurrency]"})
    assert r.status_code == 429 and r.json()["code"] == 50430
    env.sim.config.extra.update(max_concurrent=1)
    await env.submit(prompt="slow [sim:run=2]")
    r = await env.call(SUBMIT, {"req_key": "jimeng_t2v_v30", "prompt": "x"})
    assert r.status_code == 429 and r.json()["code"] == 50430
    env.sim.config.extra.update(max_concurrent=None, qps=1)
    await asyncio.sleep(1.0)
    await env.submit(prompt="one")
    r = await env.call(SUBMIT, {"req_key": "jimeng_t2v_v30", "prompt": "two"})
    assert r.status_code == 429 and r.json()["code"] == 50429


async def test_ambiguous_submit_has_no_lookup(env: Env) -> None:
    await env.http.post(f"{env.base}/_sim/faults", json=[{"kind": "500", "route": "submit", "after_effect": True}])
    r = await env.call(SUBMIT, {"req_key": "jimeng_t2v_v30", "prompt": "x"})
    assert r.status_code == 500 and r.json()["code"] == 50500
    assert env.sim.stats.creations == 1  # created, billed, and not findable: no list, no client id


async def test_video_url_expires(env: Env) -> None:
    env.sim.config.output_ttl_seconds = 0.3
    url = (await env.wait(await env.submit())).json()["data"]["video_url"]
    assert (await env.http.get(url)).status_code == 200
    assert (await env.http.get(re.sub(r"x-expires=\d+", "x-expires=9999999999", url))).status_code == 403
    await asyncio.sleep(0.4)
    expired = await env.http.get(url)
    assert expired.status_code == 403 and b"AccessDenied" in expired.content
