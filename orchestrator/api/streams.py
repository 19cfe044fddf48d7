"""Server-Sent Events of state changes: ``/v1/jobs/{id}/stream`` and ``/v1/batches/{id}/stream``.

Each event's ``id`` is its sequence number, so a client that reconnects with
``Last-Event-ID`` resumes exactly after the last event it saw. The stream
subscribes to the Redis notification before reading the log, so no event can
slip between the two; it ends after the terminal event (job) or once the batch
finished and every event was sent.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from orchestrator.api.deps import RuntimeDep, TenantDep, owned_job
from orchestrator.api.problems import Problem
from orchestrator.services.runtime import Runtime

router = APIRouter(tags=["streams"])

KEEPALIVE_SECONDS = 15.0
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID", max_length=32)]
Fetch = Callable[[int], Awaitable[tuple[list[tuple[int, str, str]], bool]]]


def _last(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


async def _events(rt: Runtime, request: Request, channel: str, after: int, fetch: Fetch) -> AsyncIterator[str]:
    pubsub = rt.redis.pubsub()
    await pubsub.subscribe(channel)
    try:
        last = after
        while True:
            events, finished = await fetch(last)
            for seq, kind, data in events:
                yield f"id: {seq}\nevent: {kind}\ndata: {data}\n\n"
                last = seq
            if finished:
                return
            try:
                await asyncio.wait_for(_next_message(pubsub), KEEPALIVE_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                yield ": keep-alive\n\n"
    finally:
        await pubsub.unsubscribe(channel)
        await pubsub.aclose()


async def _next_message(pubsub: object) -> None:
    while True:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)  # type: ignore[attr-defined]
        if message is not None:
            return


class EventStream(StreamingResponse):
    """``text/event-stream``: as ``response_class`` it documents the routes' 200 as SSE in OpenAPI."""

    media_type = "text/event-stream"


def _sse(body: AsyncIterator[str]) -> EventStream:
    return EventStream(body, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _documented(data: Mapping[str, object], example: str) -> dict[int | str, dict[str, object]]:
    """The 200 of an SSE route: ``schema`` describes one event (OpenAPI 3.1 has no ``itemSchema``), its
    ``data`` a JSON document."""
    event = {"type": "object", "required": ["id", "event", "data"], "properties": {
        "id": {"type": "string", "description": "the event's sequence number (send it back as Last-Event-ID)"},
        "event": {"type": "string", "description": "the event's type"},
        "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": data}}}
    return {200: {"description": "Server-Sent Events (`: keep-alive` comments every 15 s); the stream ends "
                                 "after the last event",
                  "content": {"text/event-stream": {"schema": event, "example": example}}}}


_BATCH_EVENT: dict[str, object] = {"type": "object", "required": ["sequence", "event"], "properties": {
    "sequence": {"type": "integer"}, "job_id": {"type": "string"},
    "event": {"type": "object", "required": ["type"], "properties": {"type": {"type": "string"}}}}}


@router.get("/v1/jobs/{job_id}/stream", response_class=EventStream, responses=_documented(
    {"$ref": "#/components/schemas/JobEvent"},
    'id: 1\nevent: job.created\ndata: {"sequence":1,"type":"job.created","status":"queued",...}\n\n'
    'id: 4\nevent: job.succeeded\ndata: {"sequence":4,"type":"job.succeeded","status":"succeeded",...}\n\n'))
async def job_stream(job_id: str, request: Request, rt: RuntimeDep, tenant: TenantDep,
                     last_event_id: LastEventId = None) -> EventStream:
    await owned_job(rt, tenant, job_id)

    async def fetch(after: int) -> tuple[list[tuple[int, str, str]], bool]:
        events = await rt.store.events(job_id, after)
        done = any(e.status.terminal for e in events)
        if not events:
            job = await rt.store.get(job_id)
            done = job is None or (job.status.terminal and job.version <= after)
        return [(e.sequence, e.type, e.model_dump_json()) for e in events], done

    return _sse(_events(rt, request, rt.store.events_key(job_id), _last(last_event_id), fetch))


@router.get("/v1/batches/{batch_id}/stream", response_class=EventStream, responses=_documented(
    _BATCH_EVENT,
    'id: 1\nevent: batch.progress\ndata: {"sequence":1,"event":{"type":"batch.progress",...}}\n\n'))
async def batch_stream(batch_id: str, request: Request, rt: RuntimeDep, tenant: TenantDep,
                       last_event_id: LastEventId = None) -> EventStream:
    if await rt.batches.owned(tenant, batch_id) is None:
        raise Problem(404, "Not found", f"no batch {batch_id!r}")
    key = rt.store.batch_key(batch_id)

    async def fetch(after: int) -> tuple[list[tuple[int, str, str]], bool]:
        raw = await rt.redis.lrange(key + ":ev", after, after + 999)  # type: ignore[misc]
        events = []
        for item in raw:
            data = json.loads(item)
            events.append((int(data["sequence"]), str(data["event"]["type"]), item.decode()))
        finished = False
        if len(raw) < 1000:
            fields = await rt.redis.hmget(key, ["finished_at", "seq"])  # type: ignore[misc]
            finished = fields[0] is not None and (after + len(raw)) >= int(fields[1] or 0)
        return events, finished

    return _sse(_events(rt, request, key + ":ev", _last(last_event_id), fetch))
