"""The fal queue facade under ``/fal``: fal's queue API over Atelier jobs.

``fal_client`` works against it with an Atelier API key as ``FAL_KEY`` (sent as
``Authorization: Key <key>``) and its queue URL pointed at ``<atelier>/fal/`` (see the README:
the client builds queue URLs from a module constant, ``https://`` + ``FAL_QUEUE_RUN_HOST``).

* ``POST /fal/{app}`` submits: the body is the model's input, ``app`` names the model as
  ``native.resolve`` says (``fal-ai/flux/schnell`` is fal's; ``kling/kling-v2-1`` or
  ``replicate/black-forest-labs/flux-schnell`` reach other providers). ``fal_webhook`` (query) is
  the job's ``webhook_url`` (Atelier's signed job events), ``X-Fal-Queue-Priority: low`` its
  priority. The answer: ``{request_id, response_url, status_url, cancel_url, status, queue_position}``;
  the request id is the job's id (``job_...``, also at ``/v1/jobs/{id}``), and the URLs name
  ``owner/app`` only, as fal's do.
* ``GET .../requests/{id}/status[?logs=1]``: ``IN_QUEUE`` (``queued``/``submitting``/``submitted``;
  ``queue_position``: the tenant's jobs queued before it), ``IN_PROGRESS`` (``running``) with
  ``logs`` (the job's event log), both HTTP 202; ``COMPLETED`` (finished, 200) with
  ``metrics.inference_time``, and ``error``/``error_type`` when it did not succeed.
* ``GET .../requests/{id}``: the result, ``{"images": [File...]}``, ``{"video": File}`` or
  ``{"audio": File}`` (every output also in ``videos``/``audios`` when there are several), each
  ``File`` ``{url, content_type, file_name, file_size, width?, height?, duration?}`` with the stored
  output's URL. A job that did not succeed answers as fal does: 422 (refused input or content
  policy), 499 (canceled), 504 (timed out), 502 (the provider failed); 400 before it finished.
* ``PUT .../requests/{id}/cancel``: 202 ``CANCELLATION_REQUESTED``, 400 ``ALREADY_COMPLETED``.
* Errors are fal's ``{"detail": ...}`` (a 422 lists ``{loc, msg, type}``). A reused
  ``Idempotency-Key`` is a 422, not a 409: ``fal_client`` retries 409s.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AnyHttpUrl, TypeAdapter, ValidationError

from orchestrator.api.deps import RuntimeDep
from orchestrator.api.facades.native import (
    FacadeError,
    FacadeTenant,
    cancel,
    choose_kind,
    log_lines,
    native_field,
    native_input,
    owned,
    resolve,
    run_seconds,
    shaped_route,
    submit,
)
from orchestrator.domain.job import Job
from orchestrator.services.runtime import Runtime
from orchestrator.wire.jobs import TERMINAL, JobKind, JobRequest, JobStatus, Priority

PREFIX = "/fal"
HOME = "fal"
NAMESPACES = ("workflows", "comfy")
# fal's input names with a common meaning -> Atelier's common inputs.
ALIASES = {"prompt": "prompt", "negative_prompt": "negative_prompt", "image_url": "image_url",
           "duration": "duration_seconds", "aspect_ratio": "aspect_ratio", "resolution": "resolution",
           "seed": "seed", "num_images": "num_outputs"}
# The names the fal adapter maps back unchanged (it turns aspect_ratio/resolution into image_size and
# duration into a string): only these become common inputs when the model is fal's own.
FAL_EXACT = frozenset({"prompt", "negative_prompt", "image_url", "seed", "num_images"})
QUEUED = (JobStatus.queued, JobStatus.submitting, JobStatus.submitted)
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
Kind = Annotated[str | None, Header(alias="Atelier-Kind", max_length=20)]
QueuePriority = Annotated[str | None, Header(alias="X-Fal-Queue-Priority", max_length=20)]
WEBHOOK = TypeAdapter(AnyHttpUrl)


def render_error(exc: FacadeError) -> JSONResponse:
    """fal's ``{"detail": ...}``: a list of ``{loc, msg, type}`` for invalid fields, else a message."""
    headers = dict(exc.headers)
    if exc.fields:
        detail: Any = [{"loc": loc(name), "msg": message, "type": exc.code or "value_error"}
                       for name, message in exc.fields]
    else:
        detail = exc.detail
    body: dict[str, Any] = {"detail": detail}
    if exc.code and not exc.fields:
        body["error_type"] = exc.code
        headers.setdefault("X-Fal-Error-Type", exc.code)
    return JSONResponse(body, status_code=exc.status, headers=headers)


def loc(name: str) -> list[str]:
    """Where a field is, as fal (FastAPI) says it: ``["body", "prompt"]``, ``["query", "fal_webhook"]``..."""
    head, _, rest = name.partition(".")
    if head in ("body", "query", "path", "header") and rest:
        return [head, *rest.split(".")]
    if "-" in name and name[:1].isupper():
        return ["header", name]
    return ["body", *name.split(".")]


Route = shaped_route(render_error)


def field_name(atelier: str) -> str:
    """The fal field an Atelier field comes from (``input.num_outputs`` -> ``body.num_images``)."""
    return native_field(atelier, ALIASES, name_field="path.app_id", webhook="query.fal_webhook", body="body")


def app_path(app: str) -> str:
    """``owner/app`` (``namespace/owner/app``) of an endpoint id: what fal's request URLs name."""
    parts = app.split("/")
    return "/".join(parts[:3] if parts[0] in NAMESPACES else parts[:2])


def urls(request: Request, app: str, job_id: str) -> dict[str, str]:
    base = f"{str(request.base_url).rstrip('/')}{PREFIX}/{app_path(app)}/requests/{job_id}"
    return {"response_url": base, "status_url": f"{base}/status", "cancel_url": f"{base}/cancel"}


def failure(job: Job) -> FacadeError:
    """A job that did not succeed, as the error its result URL answers with."""
    code = job.error.code if job.error else job.status.value
    message = job.error.message if job.error else f"the job {job.status.value}"
    if job.status == JobStatus.canceled:
        return FacadeError(499, "Request cancelled by the client.", code="client_cancelled")
    if job.status == JobStatus.timed_out:
        return FacadeError(504, f"Request timed out: {message}", code="request_timeout")
    if "content_policy" in code or "moderation" in code:
        return FacadeError(422, message, [("body.prompt", message)], code="content_policy_violation")
    if "input" in code:
        return FacadeError(422, message, [("body", message)], code=code)
    return FacadeError(502, f"{message} ({code})", code="provider_error")


async def status_body(rt: Runtime, job: Job, request: Request, app: str, with_logs: bool) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"request_id": job.id, **urls(request, app, job.id)}
    if job.status in QUEUED:
        ahead = await rt.store.queued_ahead(job.tenant, job.id) if job.status == JobStatus.queued else 0
        return 202, {"status": "IN_QUEUE", "queue_position": ahead, **body}
    logs = None
    if with_logs:
        logs = [{"message": text, "level": level, "source": "USER", "timestamp": at}
                for at, level, text in log_lines(await rt.store.events(job.id))]
    if job.status not in TERMINAL:
        return 202, {"status": "IN_PROGRESS", "logs": logs, **body}
    predict, _ = run_seconds(job)
    body |= {"status": "COMPLETED", "logs": logs, "metrics": {"inference_time": round(predict, 3)} if predict else {}}
    if job.status != JobStatus.succeeded:
        error = failure(job)
        body |= {"error": error.detail, "error_type": error.code}
    return 200, body


async def result_body(rt: Runtime, job: Job) -> dict[str, Any]:
    view = await rt.jobs.view(job)
    files: list[dict[str, Any]] = []
    for output in view.outputs:
        item: dict[str, Any] = {"url": output.url, "content_type": output.content_type,
                                "file_name": f"{job.id}-{output.index}", "file_size": output.bytes}
        if output.width and output.height:
            item |= {"width": output.width, "height": output.height}
        if output.duration_seconds is not None:
            item["duration"] = output.duration_seconds
        files.append(item)
    if job.kind == JobKind.image:
        return {"images": files, "seed": job.input.seed, "prompt": job.input.prompt}
    name = job.kind.value
    body: dict[str, Any] = {name: files[0] if files else None}
    if len(files) > 1:
        body[name + "s"] = files
    return body


router = APIRouter(prefix=PREFIX, route_class=Route, include_in_schema=False)


@router.get("/{app:path}/requests/{request_id}/status")
async def request_status(app: str, request_id: str, request: Request, rt: RuntimeDep, tenant: FacadeTenant,
                         logs: Annotated[str | None, Query(max_length=10)] = None) -> JSONResponse:
    job = await owned(rt, tenant, request_id, "Request not found")
    code, body = await status_body(rt, job, request, app, (logs or "").lower() in ("1", "true", "yes"))
    return JSONResponse(body, status_code=code, headers={"x-fal-request-id": job.id})


@router.get("/{app:path}/requests/{request_id}")
async def request_result(app: str, request_id: str, rt: RuntimeDep, tenant: FacadeTenant) -> JSONResponse:
    job = await owned(rt, tenant, request_id, "Request not found")
    if job.status not in TERMINAL:
        raise FacadeError(400, "Request is still in progress", code="request_in_progress",
                          headers={"x-fal-request-id": job.id})
    if job.status != JobStatus.succeeded:
        error = failure(job)
        error.headers["x-fal-request-id"] = job.id
        raise error
    return JSONResponse(await result_body(rt, job), headers={"x-fal-request-id": job.id})


@router.put("/{app:path}/requests/{request_id}/cancel")
async def cancel_request(app: str, request_id: str, rt: RuntimeDep, tenant: FacadeTenant) -> JSONResponse:
    job = await owned(rt, tenant, request_id, "Request not found")
    if job.status in TERMINAL:
        return JSONResponse({"status": "ALREADY_COMPLETED"}, status_code=400)
    await cancel(rt, job)
    return JSONResponse({"status": "CANCELLATION_REQUESTED"}, status_code=202)


@router.post("/{app:path}")
async def submit_request(app: str, request: Request, rt: RuntimeDep, tenant: FacadeTenant,
                         fal_webhook: Annotated[str | None, Query(max_length=2000)] = None,
                         idempotency_key: IdempotencyKey = None, kind: Kind = None,
                         priority: QueuePriority = None) -> JSONResponse:
    raw = await request.body()
    try:
        given = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise FacadeError(400, "Request body must be valid JSON", code="bad_request") from exc
    if not isinstance(given, dict):
        raise FacadeError(400, "Request body must be a JSON object", code="bad_request")
    parts = app.strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        message = "name the app as 'owner/app[/path]' (fal-ai/flux/schnell) or '<atelier provider>/<model>'"
        raise FacadeError(404, f"Application {app!r} not found: {message}", code="not_found")
    if "requests" in parts[2:]:  # a request's URL posted to: never a new (paid) submission
        raise FacadeError(405, f"POST is not how /requests/ URLs are used: GET its status or result, PUT its "
                               f"cancel ({app})", code="method_not_allowed")
    if priority is not None and priority not in ("normal", "low"):
        raise FacadeError(422, "X-Fal-Queue-Priority: normal or low", [("X-Fal-Queue-Priority", "normal or low")])
    webhook = None
    if fal_webhook is not None:
        try:
            webhook = WEBHOOK.validate_python(fal_webhook)
        except ValidationError as exc:
            raise FacadeError(422, "fal_webhook: not a URL", [("query.fal_webhook", "not a URL")]) from exc
    provider, model = resolve("/".join(parts), HOME)
    exact = FAL_EXACT if provider == HOME else None
    try:
        job_request = JobRequest(provider=provider, kind=choose_kind(rt, provider, model, kind, given), model=model,
                                 input=native_input(given, ALIASES, exact, "body"), webhook_url=webhook,
                                 priority=Priority.low if priority == "low" else Priority.normal)
    except ValidationError as exc:
        message = str(exc.errors()[0].get("msg", "invalid"))
        raise FacadeError(422, f"app_id: {message}", [("path.app_id", message)]) from exc
    job = await submit(rt, tenant, job_request, idempotency_key, field_name)
    _, body = await status_body(rt, job, request, app, False)
    return JSONResponse(body, headers={"x-fal-request-id": job.id})


@router.api_route("/{path:path}", methods=["GET", "PUT", "PATCH", "DELETE"])
async def unknown_route(path: str) -> None:
    """Anything else under ``/fal``: a fal-shaped 404."""
    raise FacadeError(404, f"Atelier's fal facade has no route /{path} (it serves the queue: submit, "
                           "requests/{id}/status, requests/{id} and requests/{id}/cancel)", code="not_found")
