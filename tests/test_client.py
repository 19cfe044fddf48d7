"""The Python client (sync and async) against the real stack, and the webhook verification helper."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from orchestrator.domain.webhooks import new_secret
from orchestrator.sdk.client import (
    APIConnectionError,
    APIError,
    AsyncClient,
    AtelierError,
    AuthenticationError,
    BatchItem,
    Client,
    ConflictError,
    InvalidRequestError,
    JobEvent,
    JobInput,
    JobKind,
    JobRequest,
    JobStatus,
    JobView,
    JobWebhookEvent,
    NotFoundError,
    WebhookVerificationError,
    verify_webhook,
)
from orchestrator.wire.signing import sign
from providers.sandbox.serve import serving
from tests.helpers import WebhookReceiver

IMAGE = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
         "input": {"prompt": "a fox"}}
VIDEO = {"provider": "replicate", "kind": "video", "model": "minimax/video-01", "input": {"prompt": "sea"}}
FULL_LOG = ["job.created", "job.submitting", "job.submitted", "job.running", "job.succeeded"]


class Proxy:
    """A real HTTP proxy in front of the API that gets in the way of the event streams.

    ``no-stream`` answers 404 to them (as a server or gateway without them would);
    ``cut`` passes a stream's first event and then ends the response.
    """

    def __init__(self, upstream: str, mode: str) -> None:
        self.upstream = upstream
        self.mode = mode
        self.stream_calls: list[str | None] = []  # the Last-Event-ID of each stream request
        self.app = Starlette(routes=[Route("/{path:path}", self.handle, methods=["GET", "POST"])])

    async def handle(self, request: Request) -> Response:
        path = request.url.path
        headers = {k: v for k, v in request.headers.items()
                   if k in ("authorization", "content-type", "idempotency-key", "last-event-id", "accept")}
        async with httpx.AsyncClient(base_url=self.upstream, timeout=30) as client:
            if path.endswith("/stream"):
                self.stream_calls.append(request.headers.get("last-event-id"))
                if self.mode == "no-stream":
                    return JSONResponse({"type": "about:blank", "title": "Not found", "status": 404},
                                        status_code=404, media_type="application/problem+json")
                text = ""
                async with client.stream("GET", path, headers=headers) as resp:
                    async for line in resp.aiter_lines():
                        text += line + "\n"
                        if line == "" and "data:" in text:
                            break
                return Response(text, media_type="text/event-stream")
            resp = await client.request(request.method, path, params=request.query_params, headers=headers,
                                        content=await request.body())
            return Response(resp.content, status_code=resp.status_code,
                            media_type=resp.headers.get("content-type"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_sync_client_jobs_and_errors(stack, tmp_path):
    def scenario() -> None:
        with Client(stack.api_url, stack.api_key) as c:
            request = JobRequest(provider="replicate", kind=JobKind.image, model="black-forest-labs/flux-schnell",
                                 input=JobInput(prompt="a fox [sim:run=1]"))
            job = c.submit(request, idempotency_key="fox-1")
            assert isinstance(job, JobView) and job.status == JobStatus.queued
            assert c.submit(request, idempotency_key="fox-1").id == job.id
            with pytest.raises(ConflictError) as conflict:
                c.submit(IMAGE, idempotency_key="fox-1")
            assert conflict.value.status == 409 and conflict.value.problem["job_id"] == job.id

            updates: list[Any] = []
            done = c.wait(job.id, timeout=30, on_update=updates.append)
            assert done.status == JobStatus.succeeded and done.outputs
            assert all(isinstance(u, JobEvent) for u in updates)  # followed on the event stream
            assert [u.type for u in updates] == FULL_LOG
            assert c.get(job.id) == done

            found = c.query([job.id, "job_nope", job.id])
            assert [j.id for j in found.data] == [job.id] and found.not_found == ["job_nope"]
            assert job.id in [j.id for j in c.list_jobs(status="succeeded", limit=10).data]
            path = c.download(done.outputs[0], tmp_path / "fox.png")
            assert sha256(path) == done.outputs[0].sha256 and not (tmp_path / "fox.png.part").exists()

            slow = c.submit(IMAGE | {"input": {"prompt": "slow [sim:run=30]"}})
            assert c.cancel(slow.id).status == JobStatus.canceled
            assert c.wait(slow.id, timeout=5).status == JobStatus.canceled
            with pytest.raises(ConflictError):
                c.cancel(job.id)  # already succeeded
            with pytest.raises(NotFoundError) as missing:
                c.get("job_nope")
            assert missing.value.status == 404
            with pytest.raises(InvalidRequestError) as invalid:
                c.submit(IMAGE | {"provider": "nope"})
            assert invalid.value.status == 422 and invalid.value.errors[0]["field"] == "provider"
            with pytest.raises(InvalidRequestError) as invalid:
                c.submit(IMAGE | {"kind": "smell"})
            assert invalid.value.errors[0]["field"] == "kind"
        with Client(stack.api_url, "atl_wrong") as stranger, pytest.raises(AuthenticationError) as refused:
            stranger.get(job.id)
        assert refused.value.status == 401 and isinstance(refused.value, APIError)
        with Client("http://127.0.0.1:9", stack.api_key, max_retries=0) as down, \
                pytest.raises(APIConnectionError) as unreachable:
            down.get(job.id)
        assert isinstance(unreachable.value, AtelierError) and "cannot connect" in str(unreachable.value)

    await asyncio.to_thread(scenario)


async def test_async_client_batches(stack):
    async with AsyncClient(stack.api_url, stack.api_key) as c:
        job = await c.submit(IMAGE)
        updates: list[Any] = []
        done = await c.wait(job.id, timeout=30, on_update=updates.append)
        assert done.status == JobStatus.succeeded and [u.type for u in updates] == FULL_LOG
        assert (await c.query([job.id])).data[0].id == job.id

        items = [BatchItem.model_validate(IMAGE | {"ref": "img"}), VIDEO | {"ref": "vid"},
                 IMAGE | {"ref": "bad", "provider": "nope"},
                 IMAGE | {"ref": "fails", "input": {"prompt": "[sim:fail]"}}]
        batch = await c.submit_batch(items, metadata={"campaign": "spring"}, idempotency_key="b-1")
        assert batch.total == 3 and [(p.index, p.ref, p.field) for p in batch.invalid] == [(2, "bad", "provider")]
        assert (await c.submit_batch(items, metadata={"campaign": "spring"}, idempotency_key="b-1")).id == batch.id
        with pytest.raises(ConflictError):
            await c.submit_batch(items[:1], idempotency_key="b-1")
        results = [j async for j in c.iter_batch_results(batch.id, wait=True, timeout=30, poll_interval=0.2,
                                                          page_size=2)]
        assert {j.ref: j.status for j in results} == {"img": "succeeded", "vid": "succeeded", "fails": "failed"}
        view = await c.get_batch(batch.id)
        assert view.status == "completed" and view.counts["succeeded"] == 2 and view.metadata == {"campaign": "spring"}
        failed = [j async for j in c.iter_batch_results(batch.id, status="failed")]
        assert [j.ref for j in failed] == ["fails"] and failed[0].error is not None

        with pytest.raises(InvalidRequestError) as atomic:
            await c.submit_batch([IMAGE, IMAGE | {"model": "??"}], atomic=True)
        assert [(e["index"], e["field"]) for e in atomic.value.errors] == [(1, "model")]

        slow = await c.submit_batch([IMAGE | {"input": {"prompt": "slow [sim:run=30]"}}] * 2)
        assert (await c.cancel_batch(slow.id)).canceled
        assert (await c.wait_batch(slow.id, timeout=10, poll_interval=0.2)).counts["canceled"] == 2
        with pytest.raises(NotFoundError):
            await c.get_batch("bat_nope")
    async with AsyncClient(stack.api_url, "atl_wrong") as stranger:
        with pytest.raises(AuthenticationError):
            await stranger.get_batch(batch.id)


async def test_wait_polls_when_streams_are_unavailable(stack):
    proxy = Proxy(stack.api_url, "no-stream")
    async with serving(proxy.app) as base:
        async with AsyncClient(base, stack.api_key) as c:
            job = await c.submit(IMAGE)
            updates: list[Any] = []
            done = await c.wait(job.id, timeout=30, poll_interval=0.2, on_update=updates.append)
        assert done.status == JobStatus.succeeded and proxy.stream_calls == [None]
        assert updates and all(isinstance(u, JobView) for u in updates) and updates[-1].status == "succeeded"

        def sync_wait() -> JobView:
            with Client(base, stack.api_key) as c:
                return c.wait(c.submit(IMAGE).id, timeout=30, poll_interval=0.2)

        assert (await asyncio.to_thread(sync_wait)).status == JobStatus.succeeded
        assert proxy.stream_calls == [None, None]


async def test_wait_resumes_a_cut_stream_without_losing_events(stack):
    proxy = Proxy(stack.api_url, "cut")
    async with serving(proxy.app) as base, AsyncClient(base, stack.api_key) as c:
        job = await c.submit(IMAGE | {"input": {"prompt": "x [sim:run=1]"}})
        updates: list[Any] = []
        done = await c.wait(job.id, timeout=30, on_update=updates.append)
    assert done.status == JobStatus.succeeded
    assert [u.type for u in updates] == FULL_LOG  # nothing lost, nothing repeated
    seqs = [u.sequence for u in updates]
    assert proxy.stream_calls == [None, *(str(s) for s in seqs[:-1])]  # each reconnect resumed after the last


async def test_verify_webhook_on_a_real_delivery(stack):
    receiver = WebhookReceiver()
    async with serving(receiver.app) as hook, AsyncClient(stack.api_url, stack.api_key) as c:
        job = await c.submit(IMAGE | {"webhook_url": f"{hook}/hook"})
        await c.wait(job.id, timeout=30)
        await receiver.wait(2)
        secret = await c.webhook_secret()
    events = [verify_webhook(secret, headers, body) for headers, body in receiver.deliveries]
    assert [e.type for e in events] == ["job.running", "job.succeeded"]
    assert all(isinstance(e, JobWebhookEvent) for e in events) and events[-1].data.id == job.id

    headers, body = receiver.deliveries[-1]
    assert verify_webhook([new_secret(), secret], headers, body.decode()).data.id == job.id  # rotation
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify_webhook(secret, headers, body.replace(b"succeeded", b"failed"))
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify_webhook(new_secret(), headers, body)
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify_webhook(secret, {k: v for k, v in headers.items() if k != "webhook-signature"}, body)
    old = int(time.time()) - 600  # a correctly signed but stale (replayed) delivery
    stale = headers | {"webhook-timestamp": str(old),
                       "webhook-signature": sign(secret, headers["webhook-id"], old, body)}
    with pytest.raises(WebhookVerificationError, match="stale"):
        verify_webhook(secret, stale, body)
    replayed = verify_webhook(secret, stale, body, tolerance=None)
    assert replayed.model_dump(mode="json")["data"] == json.loads(body)["data"]
