"""OpenAI Images over Atelier image jobs: ``POST /openai/v1/images/generations`` and ``/images/edits``.

The request becomes an ordinary image job; the answer waits for it (at most
``IMAGE_WAIT_SECONDS``; ``Prefer: wait=N`` waits less) and is OpenAI's ``ImagesResponse``:
``b64_json`` (the stored bytes) or ``url`` (the stored output's signed URL). ``n`` ->
``num_outputs``; ``size`` as ``openai_shared`` says; ``quality``, ``background``, ``output_format``,
``output_compression``, ``moderation``, ``style`` and ``user`` go to OpenAI's own models as their
options (other providers have none of them and ignore them). The job keeps going if the wait ends
first: a 504 names it, and ``/v1/jobs/{id}`` has it. A job that failed answers 400 (content
policy, refused input), 409 (canceled), 504 (timed out) or 502 (the provider failed).
"""

from __future__ import annotations

import base64
import re
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError

from orchestrator.api.deps import RuntimeDep, TenantDep
from orchestrator.api.facades.openai_shared import (
    OpenAIError,
    OpenAIRoute,
    choose,
    close_files,
    create_job,
    invalid,
    read_body,
    resolve_model,
    size_inputs,
    store_input,
    wait_finished,
)
from orchestrator.domain.job import Job
from orchestrator.services.runtime import Runtime
from orchestrator.wire.jobs import JobInput, JobKind, JobRequest, JobStatus

router = APIRouter(prefix="/openai/v1/images", route_class=OpenAIRoute, include_in_schema=False)

IMAGE_WAIT_SECONDS = 120.0
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
NATIVE = ("quality", "background", "output_format", "output_compression", "moderation", "style", "user")
NAMES = {"input.num_outputs": "n", "input.options.n": "n", "input.resolution": "size",
         "input.aspect_ratio": "size", "input.options.size": "size", "input.prompt": "prompt", "model": "model",
         "kind": "model", "input.image_url": "image"}
USAGE_KEYS = {"input_tokens", "output_tokens", "total_tokens", "input_tokens_details"}


class ImageGenerate(BaseModel):
    """``POST /images/generations``; ``webhook_url`` and ``metadata`` are Atelier's (``extra_body``)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=20_000)
    model: str = Field("gpt-image-1", min_length=1, max_length=240)
    n: int | None = Field(None, ge=1, le=8)
    size: str | None = Field(None, max_length=20)
    response_format: Literal["url", "b64_json"] | None = None
    quality: str | None = Field(None, max_length=20)
    background: str | None = Field(None, max_length=20)
    output_format: str | None = Field(None, max_length=20)
    output_compression: int | None = Field(None, ge=0, le=100)
    moderation: str | None = Field(None, max_length=20)
    style: str | None = Field(None, max_length=20)
    user: str | None = Field(None, max_length=200)
    safety_identifier: str | None = Field(None, max_length=200)
    stream: bool | None = None
    partial_images: int | None = Field(None, ge=0, le=0)
    webhook_url: AnyHttpUrl | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)


class ImageEdit(ImageGenerate):
    """``POST /images/edits`` (multipart): the generation's fields and ``input_fidelity``."""

    input_fidelity: str | None = Field(None, max_length=20)


Body = TypeVar("Body", bound=ImageGenerate)


def failure(job: Job) -> OpenAIError:
    """A job that did not succeed, as the error the wait answers with (never retried by the SDK)."""
    error = job.error
    code = error.code if error else job.status.value
    message = f"{error.message if error else 'the render did not finish'} (Atelier job {job.id})"
    if job.status == JobStatus.canceled:
        return OpenAIError(409, f"the job was canceled (Atelier job {job.id})", code="canceled")
    if job.status == JobStatus.timed_out:
        return OpenAIError(504, message, code="timed_out")
    if "content_policy" in code or "moderation" in code:
        return OpenAIError(400, message, code="content_policy_violation")
    if "input" in code or code in ("model_not_found", "invalid_request"):
        return OpenAIError(400, message, code=code)
    return OpenAIError(502, message, code=code, type="server_error")


async def images_response(rt: Runtime, job: Job, response_format: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = []
    view = await rt.jobs.view(job) if response_format == "url" else None
    for index, output in enumerate(job.outputs):
        item: dict[str, Any] = {}
        if view is not None:
            item["url"] = view.outputs[index].url
        else:
            item["b64_json"] = base64.b64encode(await rt.storage.read(output.key)).decode()
        if isinstance(output.metadata.get("revised_prompt"), str):
            item["revised_prompt"] = output.metadata["revised_prompt"]
        data.append(item)
    body: dict[str, Any] = {"created": int(job.created_at.timestamp()), "data": data}
    first = job.outputs[0] if job.outputs else None
    if first is not None:
        if first.width and first.height:
            body["size"] = f"{first.width}x{first.height}"
        kind, _, subtype = first.content_type.partition("/")
        if kind == "image" and subtype in ("png", "webp", "jpeg", "gif"):
            body["output_format"] = subtype
        for key in ("quality", "background"):
            if isinstance(first.metadata.get(key), str):
                body[key] = first.metadata[key]
        usage = first.metadata.get("usage")
        if isinstance(usage, dict) and set(usage) >= USAGE_KEYS:
            body["usage"] = usage
    return body


def wait_seconds(prefer: str | None) -> float:
    """``Prefer: wait=N`` (RFC 7240, as Replicate takes it) shortens the wait; at most ``IMAGE_WAIT_SECONDS``."""
    found = re.search(r"(?:^|[,;\s])wait=(\d{1,4})\b", prefer or "")
    return min(IMAGE_WAIT_SECONDS, max(1.0, float(found.group(1)))) if found else IMAGE_WAIT_SECONDS


async def render(rt: Runtime, tenant: str, body: ImageGenerate, base: dict[str, Any], idempotency_key: str | None,
                 prefer: str | None) -> JSONResponse:
    """Submit the image job (``base``: its input so far) and answer once it finished."""
    provider, model = resolve_model(body.model)
    base = {"prompt": body.prompt, **base}
    if body.n is not None:
        base["num_outputs"] = body.n
    options = dict(base.pop("options", {}))
    if provider == "openai":
        options |= {k: getattr(body, k) for k in NATIVE if getattr(body, k) is not None}
    if options:
        base["options"] = options
    try:
        requests = [JobRequest(provider=provider, kind=JobKind.image, model=model,
                               input=JobInput.model_validate(base | sized), webhook_url=body.webhook_url,
                               metadata=body.metadata)
                    for sized in size_inputs(body.size)]
    except ValidationError as exc:
        raise invalid(exc, NAMES, "input.") from exc
    job = await create_job(rt, tenant, await choose(rt, tenant, requests, NAMES), idempotency_key)
    wait = wait_seconds(prefer)
    job = await wait_finished(rt, job, wait)
    if not job.status.terminal:
        raise OpenAIError(504, f"the image is not ready after {wait:g} s; it goes on as Atelier job "
                               f"{job.id} (GET /v1/jobs/{job.id})", code="timeout", type="server_error")
    if job.status != JobStatus.succeeded:
        raise failure(job)
    response_format = body.response_format or ("b64_json" if model.startswith("gpt-image") else "url")
    return JSONResponse(await images_response(rt, job, response_format), headers={"x-atelier-job-id": job.id})


def parse(model: type[Body], fields: dict[str, Any]) -> Body:
    try:
        body = model.model_validate(fields)
    except ValidationError as exc:
        raise invalid(exc) from exc
    if body.stream:
        raise OpenAIError(400, "streaming image generation is not offered", param="stream", code="invalid_value")
    return body


@router.post("/generations")
async def generate_images(request: Request, rt: RuntimeDep, tenant: TenantDep,
                          idempotency_key: IdempotencyKey = None,
                          prefer: Annotated[str | None, Header(max_length=200)] = None) -> JSONResponse:
    fields, files = await read_body(request)
    await close_files(files)
    if files:
        raise OpenAIError(400, "images/generations takes no files", param=sorted(files)[0], code="invalid_value")
    return await render(rt, tenant, parse(ImageGenerate, fields), {}, idempotency_key, prefer)


@router.post("/edits")
async def edit_images(request: Request, rt: RuntimeDep, tenant: TenantDep,
                      idempotency_key: IdempotencyKey = None,
                      prefer: Annotated[str | None, Header(max_length=200)] = None) -> JSONResponse:
    """The image files (``image`` / ``image[]``, and ``mask``) are stored and handed over at signed URLs:
    the first as ``image_url``, OpenAI's models also take the others (``options.images``) and the mask."""
    fields, files = await read_body(request)
    try:
        unknown = sorted(set(files) - {"image", "mask"})
        if unknown:
            raise OpenAIError(400, f"{unknown[0]}: not a file parameter of images/edits", param=unknown[0],
                              code="invalid_value")
        images, masks = files.get("image", []), files.get("mask", [])
        if not images:
            raise OpenAIError(400, "image: give one or more image files", param="image", code="missing_required")
        body = parse(ImageEdit, fields)
        provider, _ = resolve_model(body.model)  # a refused name stores nothing
        if provider != "openai" and (len(images) > 1 or masks):
            param = "mask" if masks else "image"
            raise OpenAIError(400, f"{param}: {body.model} takes one image and no mask (OpenAI's models take "
                                   "several and a mask)", param=param, code="invalid_value")
        if len(images) > 16 or len(masks) > 1:
            raise OpenAIError(400, "at most 16 images and one mask", param="mask" if masks[1:] else "image",
                              code="invalid_value")
        urls = [await store_input(rt, tenant, upload, "image") for upload in images]
        base: dict[str, Any] = {"image_url": urls[0]}
        options: dict[str, Any] = {}
        if urls[1:]:
            options["images"] = urls[1:]
        if masks:
            options["mask"] = await store_input(rt, tenant, masks[0], "mask")
        if body.input_fidelity is not None and provider == "openai":
            options["input_fidelity"] = body.input_fidelity
        if options:
            base["options"] = options
    finally:
        await close_files(files)
    return await render(rt, tenant, body, base, idempotency_key, prefer)
