"""OpenAI Videos over Atelier video jobs: ``/openai/v1/videos``.

A video is an Atelier job of kind ``video``: its id is the job id (``job_...``, readable at
``/v1/jobs/{id}`` too), its status is the job's (``queued``/``submitting``/``submitted`` ->
``queued``, ``running`` -> ``in_progress``, ``succeeded`` -> ``completed``, ``failed``/``canceled``/
``timed_out`` -> ``failed`` with the job's error), and ``/content`` streams the stored output.
``seconds`` maps to ``duration_seconds``, ``size`` as ``openai_shared`` says; the values asked
for are kept in the job's metadata under ``openai_facade`` so the video reads them back.
``input_reference``: an image file (multipart; stored, and handed to the provider at a signed URL),
``{"image_url": ...}`` (JSON or form), or a source job as
``{"job_id": "job_..."}`` or ``{"file_id": "job_..."}`` (its stored output becomes the input image).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask

from orchestrator.api.deps import RuntimeDep, TenantDep
from orchestrator.api.facades.openai_shared import (
    OpenAIError,
    OpenAIRoute,
    choose,
    close_files,
    create_job,
    facade_model,
    invalid,
    read_body,
    resolve_model,
    size_inputs,
    store_input,
)
from orchestrator.domain.job import Job
from orchestrator.infra.storage import LocalStorage
from orchestrator.services.runtime import Runtime
from orchestrator.wire.jobs import TERMINAL, JobInput, JobKind, JobRequest, JobStatus, SourceRef

router = APIRouter(prefix="/openai/v1/videos", route_class=OpenAIRoute, include_in_schema=False)

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
FACADE_KEY = "openai_facade"
POLL_AFTER_MS = "1000"
# Atelier field -> the OpenAI parameter it came from.
NAMES = {"input.duration_seconds": "seconds", "input.options.seconds": "seconds", "input.resolution": "size",
         "input.aspect_ratio": "size", "input.options.size": "size", "input.image_url": "input_reference",
         "source": "video_id", "input.prompt": "prompt", "input.num_outputs": "n", "model": "model",
         "kind": "model", "operation": "model"}
STATUSES: dict[JobStatus, str] = {
    JobStatus.queued: "queued", JobStatus.submitting: "queued", JobStatus.submitted: "queued",
    JobStatus.running: "in_progress", JobStatus.succeeded: "completed", JobStatus.failed: "failed",
    JobStatus.canceled: "failed", JobStatus.timed_out: "failed",
}


class Reference(BaseModel):
    """An input image: a URL, or an earlier Atelier job's output (``job_id``, or as ``file_id``)."""

    model_config = ConfigDict(extra="forbid")

    image_url: AnyHttpUrl | None = None
    job_id: str | None = Field(None, pattern=r"^job_[A-Za-z0-9_]{1,80}$")
    file_id: str | None = Field(None, pattern=r"^job_[A-Za-z0-9_]{1,80}$")


class VideoCreate(BaseModel):
    """``POST /videos``; ``webhook_url`` and ``metadata`` are Atelier's (send them in ``extra_body``)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=20_000)
    model: str = Field("sora-2", min_length=1, max_length=240)
    seconds: str | None = Field(None, pattern=r"^[1-9]\d{0,2}$")
    size: str | None = Field(None, max_length=20)
    input_reference: Reference | None = None
    webhook_url: AnyHttpUrl | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class Remix(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=20_000)


def _stamp(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


def video(job: Job) -> dict[str, Any]:
    """The job as OpenAI's ``Video`` object."""
    found = job.metadata.get(FACADE_KEY)
    asked: dict[str, Any] = found if isinstance(found, dict) else {}
    output = job.outputs[0] if job.outputs else None
    seconds = asked.get("seconds")
    if seconds is None and job.input.duration_seconds is not None:
        seconds = f"{job.input.duration_seconds:g}"
    if seconds is None and output is not None and output.duration_seconds is not None:
        seconds = f"{output.duration_seconds:g}"
    size = asked.get("size")
    if size is None and output is not None and output.width and output.height:
        size = f"{output.width}x{output.height}"
    status = STATUSES[job.status]
    finished = job.timestamps.get(job.status.value) if job.status in TERMINAL else None
    error = None
    if status == "failed":
        error = {"code": job.error.code if job.error else job.status.value,
                 "message": job.error.message if job.error else f"the job was {job.status.value}"}
    return {
        "id": job.id, "object": "video", "status": status,
        "progress": 100 if status == "completed" else max(0, min(99, job.progress or 0)),
        "model": facade_model(job.provider, job.model), "seconds": seconds or "auto", "size": size or "auto",
        "prompt": job.input.prompt, "created_at": _stamp(job.created_at), "completed_at": _stamp(finished),
        "expires_at": _stamp(job.expires_at), "error": error,
        "remixed_from_video_id": job.source.job_id if job.operation == "remix" and job.source else None,
    }


def _answer(job: Job, status_code: int = 200) -> JSONResponse:
    headers = {} if job.status in TERMINAL else {"openai-poll-after-ms": POLL_AFTER_MS}
    return JSONResponse(video(job), status_code=status_code, headers=headers)


async def owned_video(rt: Runtime, tenant: str, video_id: str) -> Job:
    """The tenant's video job, or an OpenAI 404 (other tenants' ids included)."""
    job = await rt.store.get(video_id) if video_id.startswith("job_") and len(video_id) < 64 else None
    if job is None or job.tenant != tenant or job.kind != JobKind.video:
        raise OpenAIError(404, f"Video with id '{video_id}' not found.", param="video_id", code="not_found")
    return job


@router.post("")
async def create_video(request: Request, rt: RuntimeDep, tenant: TenantDep,
                       idempotency_key: IdempotencyKey = None) -> JSONResponse:
    fields, files = await read_body(request)
    try:
        unknown = sorted(set(files) - {"input_reference"})
        if unknown or len(files.get("input_reference", [])) > 1:
            raise OpenAIError(400, f"{(unknown or ['input_reference'])[0]}: one input_reference file is taken",
                              param=(unknown or ["input_reference"])[0], code="invalid_value")
        try:
            body = VideoCreate.model_validate(fields)
        except ValidationError as exc:
            raise invalid(exc) from exc
        if files and body.input_reference is not None:
            raise OpenAIError(400, "input_reference: give a file or a reference object, not both",
                              param="input_reference", code="invalid_value")
        if files:  # resolve the model first: a refused name stores nothing
            resolve_model(body.model)
            url = await store_input(rt, tenant, files["input_reference"][0], "input_reference")
            body.input_reference = Reference.model_validate({"image_url": url})
    finally:
        await close_files(files)
    provider, model = resolve_model(body.model)
    asked = {k: v for k, v in (("seconds", body.seconds), ("size", body.size)) if v is not None}
    base: dict[str, Any] = {"prompt": body.prompt}
    if body.seconds is not None:
        base["duration_seconds"] = int(body.seconds)
    source = None
    reference = body.input_reference
    if reference is not None:
        given = [v for v in (reference.image_url, reference.job_id, reference.file_id) if v is not None]
        if len(given) != 1:
            raise OpenAIError(400, "input_reference takes exactly one of image_url, or job_id (file_id) naming "
                                   "an earlier Atelier job", param="input_reference", code="invalid_value")
        if reference.image_url is not None:
            base["image_url"] = str(reference.image_url)
        else:
            source = SourceRef(job_id=str(given[0]))
    metadata = {**body.metadata, FACADE_KEY: asked} if asked else dict(body.metadata)
    try:
        requests = [JobRequest(provider=provider, kind=JobKind.video, model=model,
                               input=JobInput.model_validate(base | sized), source=source,
                               webhook_url=body.webhook_url, metadata=metadata)
                    for sized in size_inputs(body.size)]
    except ValidationError as exc:
        raise invalid(exc, NAMES, "input.") from exc
    job = await create_job(rt, tenant, await choose(rt, tenant, requests, NAMES), idempotency_key)
    return _answer(job)


@router.get("")
async def list_videos(rt: RuntimeDep, tenant: TenantDep,
                      after: Annotated[str | None, Query(max_length=64)] = None,
                      limit: Annotated[int, Query(ge=1, le=100)] = 20,
                      order: Literal["asc", "desc"] = "desc") -> JSONResponse:
    page = await rt.store.page(tenant, kind=JobKind.video.value, cursor=after, limit=limit + 1,
                               oldest_first=order == "asc")
    jobs = page.jobs[:limit]
    data = [video(j) for j in jobs]
    return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": len(page.jobs) > limit})


@router.get("/{video_id}")
async def retrieve_video(video_id: str, rt: RuntimeDep, tenant: TenantDep) -> JSONResponse:
    return _answer(await owned_video(rt, tenant, video_id))


@router.delete("/{video_id}")
async def delete_video(video_id: str, rt: RuntimeDep, tenant: TenantDep) -> JSONResponse:
    job = await owned_video(rt, tenant, video_id)
    if job.status not in TERMINAL:
        raise OpenAIError(409, f"Video '{video_id}' is still {STATUSES[job.status]}: only completed or failed "
                               f"videos can be deleted (cancel it with POST /v1/jobs/{video_id}/cancel)",
                          param="video_id", code="video_not_finished")
    await rt.reaper.delete(job.id, job)
    return JSONResponse({"id": job.id, "object": "video.deleted", "deleted": True})


@router.get("/{video_id}/content", response_model=None)
async def video_content(video_id: str, rt: RuntimeDep, tenant: TenantDep,
                        variant: Annotated[str, Query(max_length=20)] = "video") -> Response:
    job = await owned_video(rt, tenant, video_id)
    if variant != "video":
        raise OpenAIError(400, f"Atelier stores the video itself only, not a {variant!r}", param="variant",
                          code="invalid_value")
    if job.status != JobStatus.succeeded or not job.outputs:
        raise OpenAIError(404, f"Video '{video_id}' is {STATUSES[job.status]}: its content exists once it is "
                               "completed", param="video_id", code="video_not_ready")
    output = job.outputs[0]
    storage = rt.storage
    if isinstance(storage, LocalStorage):
        path = storage.path(output.key)
        if not path.is_file():
            raise OpenAIError(404, f"the stored content of video '{video_id}' is gone", code="not_found")
        return FileResponse(path, media_type=output.content_type)
    # Object storage: stream it through from a freshly minted URL (bounded memory).
    url = await storage.url(output.key, 300)
    upstream = await rt.http.send(rt.http.build_request("GET", url), stream=True)
    if upstream.status_code != 200:
        await upstream.aclose()
        raise OpenAIError(404, f"the stored content of video '{video_id}' cannot be read", code="not_found")

    async def chunks() -> AsyncIterator[bytes]:
        async for chunk in upstream.aiter_bytes():
            yield chunk

    return StreamingResponse(chunks(), media_type=output.content_type,
                             headers={"Content-Length": str(output.bytes)},
                             background=BackgroundTask(upstream.aclose))


@router.post("/{video_id}/remix")
async def remix_video(video_id: str, request: Request, rt: RuntimeDep, tenant: TenantDep,
                      idempotency_key: IdempotencyKey = None) -> JSONResponse:
    fields, _ = await read_body(request)
    try:
        body = Remix.model_validate(fields)
    except ValidationError as exc:
        raise invalid(exc) from exc
    source = await owned_video(rt, tenant, video_id)
    provider = rt.registry.get(source.provider)
    if provider is None or provider.operation("remix", source.model) is None:
        raise OpenAIError(400, f"{facade_model(source.provider, source.model)} has no remix", param="video_id",
                          code="unsupported_operation")
    asked = source.metadata.get(FACADE_KEY)  # a remix keeps the source's size and length
    request_ = JobRequest(provider=source.provider, kind=JobKind.video, model=source.model, operation="remix",
                          source=SourceRef(job_id=source.id), input=JobInput(prompt=body.prompt),
                          metadata={FACADE_KEY: asked} if isinstance(asked, dict) else {})
    job = await create_job(rt, tenant, await choose(rt, tenant, [request_], NAMES), idempotency_key)
    return _answer(job)
