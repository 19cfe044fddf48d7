"""The Replicate facade under ``/replicate/v1``: predictions over Atelier jobs.

Point the official ``replicate`` package at it with ``replicate.Client(api_token=<an Atelier API
key>, base_url=<atelier>/replicate)``: the SDK adds ``/v1`` itself (``<atelier>/replicate/v1`` works
too: the routes are also served one ``/v1`` deeper).

A prediction is an Atelier job: its id is the job's (``job_...``, also at ``/v1/jobs/{id}``).

* ``version`` (``POST /predictions``) names the model as ``native.resolve`` says: ``owner/name``,
  ``owner/name:<64-hex version>`` or a bare version id are Replicate's (Atelier's ``replicate``
  provider); ``<provider>/<model>`` with an Atelier provider is that provider's
  (``kling/kling-v2-1``, ``fal/fal-ai/flux/schnell``). ``POST /models/{owner}/{name}/predictions``
  names it by the path. A name no provider takes is a 422 naming ``version``.
* ``Prefer: wait`` (60 s) or ``wait=N`` (1-60 s) holds the create until the job finished; a job
  still rendering then is answered as ``starting`` (as Replicate does, so ``replicate.run`` polls on).
* ``status``: ``queued``/``submitting``/``submitted`` -> ``starting``, ``running`` -> ``processing``,
  ``succeeded``, ``failed`` (``timed_out`` too), ``canceled``. ``output``: the stored outputs' URLs
  (a list for images, one URL for a single video or audio). ``logs``: the job's event log, with a
  tqdm line of its progress (the SDK's ``prediction.progress`` reads it). ``metrics``:
  ``predict_time`` and ``total_time``.
* ``webhook`` (or ``webhook_completed``) is the job's ``webhook_url``: Atelier's signed job events
  are delivered there (``webhook_events_filter`` is checked but Atelier sends every state change).
* ``GET /predictions``: the tenant's jobs, newest first, 100 a page (``limit`` takes fewer), with
  ``previous``/``next`` cursor URLs.
* Errors are Replicate's problem details ``{"title", "detail", "status"}`` (422s also list
  ``invalid_fields``); ``Idempotency-Key`` works as on ``/v1/jobs``.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, ValidationError

from orchestrator.api.deps import RuntimeDep
from orchestrator.api.facades.native import (
    FacadeError,
    FacadeTenant,
    cancel,
    choose_kind,
    log_lines,
    native_field,
    native_input,
    native_view,
    owned,
    resolve,
    run_seconds,
    shaped_route,
    shown_name,
    submit,
)
from orchestrator.api.facades.openai_shared import wait_finished
from orchestrator.domain.job import Job
from orchestrator.services.runtime import Runtime
from orchestrator.wire.jobs import TERMINAL, JobKind, JobRequest, JobStatus

PREFIX = "/replicate/v1"
HOME = "replicate"
MAX_WAIT_SECONDS = 60.0
PAGE_SIZE = 100
VERSION_ID = re.compile(r"^[0-9a-f]{64}$", re.IGNORECASE)
# Replicate's input names with a common meaning -> Atelier's common inputs (the replicate adapter
# maps each back to the same name, so a Replicate model gets its input unchanged).
ALIASES = {"prompt": "prompt", "negative_prompt": "negative_prompt", "image": "image_url",
           "duration": "duration_seconds", "aspect_ratio": "aspect_ratio", "resolution": "resolution",
           "seed": "seed", "num_outputs": "num_outputs"}
STATUSES: dict[JobStatus, str] = {
    JobStatus.queued: "starting", JobStatus.submitting: "starting", JobStatus.submitted: "starting",
    JobStatus.running: "processing", JobStatus.succeeded: "succeeded", JobStatus.failed: "failed",
    JobStatus.canceled: "canceled", JobStatus.timed_out: "failed",
}
TITLES = {400: "Bad request", 401: "Unauthenticated", 402: "Payment required", 404: "Not found",
          405: "Method not allowed", 409: "Conflict", 410: "Gone", 413: "Request entity too large",
          422: "Input validation failed", 429: "Too many requests", 503: "Service unavailable"}
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)]
Prefer = Annotated[str | None, Header(max_length=200)]
Kind = Annotated[str | None, Header(alias="Atelier-Kind", max_length=20)]


def render_error(exc: FacadeError) -> JSONResponse:
    """Replicate's problem details; a 422 lists ``invalid_fields`` as Replicate does."""
    body: dict[str, Any] = {"title": TITLES.get(exc.status, "Error"), "detail": exc.detail, "status": exc.status}
    if exc.fields:
        body["invalid_fields"] = [{"type": "invalid", "field": f, "description": m} for f, m in exc.fields]
    return JSONResponse(body, status_code=exc.status, headers=exc.headers, media_type="application/problem+json")


Route = shaped_route(render_error)


class PredictionInput(BaseModel):
    """``POST /models/{owner}/{name}/predictions``."""

    model_config = ConfigDict(extra="forbid")

    input: dict[str, Any] = Field(default_factory=dict)
    webhook: AnyHttpUrl | None = None
    webhook_completed: AnyHttpUrl | None = None
    webhook_events_filter: list[Literal["start", "output", "logs", "completed"]] | None = None
    stream: bool | None = None


class PredictionCreate(PredictionInput):
    """``POST /predictions``: the model named by ``version``."""

    version: str = Field(min_length=1, max_length=240)


def field_name(atelier: str, name_field: str) -> str:
    """The Replicate field an Atelier field comes from (``input.duration_seconds`` -> ``input.duration``)."""
    return native_field(atelier, ALIASES, name_field=name_field, webhook="webhook", body="input")


def model_of(name: str, name_field: str) -> tuple[str, str]:
    """``(provider, model)`` for a ``version`` (see the module's doc); a 422 for a name none could take."""
    if VERSION_ID.match(name):
        return HOME, name
    base, colon, version = name.partition(":")
    if "/" not in base.strip("/") or not base or base.startswith("/") or base.endswith("/"):
        message = "name a model as 'owner/name', 'owner/name:<version id>', a 64-character version id or " \
                  "'<atelier provider>/<model>'"
        raise FacadeError(422, f"{name_field}: {message}", [(name_field, message)], code="invalid_version")
    provider, model = resolve(base, HOME)
    if colon:
        if provider != HOME:
            message = f"Atelier's {provider} models have no versions: name it {provider}/{model}"
            raise FacadeError(422, f"{name_field}: {message}", [(name_field, message)], code="invalid_version")
        model = f"{model}:{version}"
    return provider, model


def parse_body(raw: bytes, model: type[PredictionInput]) -> PredictionInput:
    try:
        data = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError) as exc:
        raise FacadeError(400, "the request body is not valid JSON", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise FacadeError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = [(".".join(str(p) for p in e.get("loc", ())) or "body",
                   "unknown field" if e.get("type") == "extra_forbidden" else str(e.get("msg", "invalid")))
                  for e in exc.errors()]
        raise FacadeError(422, "; ".join(f"{f}: {m}" for f, m in fields), fields, code="invalid_input") from exc


def wait_seconds(prefer: str | None) -> float | None:
    """``Prefer: wait`` -> 60 s, ``wait=N`` -> N (1-60); ``None`` without it."""
    found = re.search(r"(?:^|[,;\s])wait(?:=(\d{1,6}))?(?=$|[,;\s])", prefer or "")
    if found is None:
        return None
    return min(MAX_WAIT_SECONDS, max(1.0, float(found.group(1)))) if found.group(1) else MAX_WAIT_SECONDS


def _stamp(value: Any) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


async def prediction(rt: Runtime, job: Job, base: str, *, with_logs: bool = True,
                     starting: bool = False) -> dict[str, Any]:
    """The job as Replicate's ``Prediction`` (``starting``: an unfinished job is shown as ``starting``)."""
    status = STATUSES[job.status]
    if starting and job.status not in TERMINAL:
        status = "starting"
    name = shown_name(job.provider, job.model, HOME)
    model, _, version = name.partition(":")
    output: Any = None
    if job.status == JobStatus.succeeded and job.outputs:
        urls = [o.url for o in (await rt.jobs.view(job)).outputs]
        output = urls[0] if len(urls) == 1 and job.kind != JobKind.image else urls
    error = None
    if job.status in (JobStatus.failed, JobStatus.timed_out):
        error = f"{job.error.message} ({job.error.code})" if job.error else f"the job {job.status.value}"
    logs = None
    if with_logs:
        lines = [f"{at} {text}" for at, _, text in log_lines(await rt.store.events(job.id))]
        if job.progress is not None and job.status not in TERMINAL:
            done = max(0, min(100, job.progress))
            lines.append(f"{done:3d}%|{'#' * (done // 10):<10}| {done}/100")
        logs = "\n".join(lines)
    predict, total = run_seconds(job)
    metrics: dict[str, Any] = {}
    if predict is not None:
        metrics["predict_time"] = round(predict, 3)
    if total is not None:
        metrics["total_time"] = round(total, 3)
    finished = job.timestamps.get(job.status.value) if job.status in TERMINAL else None
    url = f"{base}{PREFIX}/predictions/{job.id}"
    return {
        "id": job.id, "model": model, "version": version or name, "input": native_view(job.input, ALIASES),
        "output": output, "status": status, "error": error, "logs": logs, "metrics": metrics,
        "created_at": _stamp(job.created_at), "started_at": _stamp(job.timestamps.get(JobStatus.running.value)),
        "completed_at": _stamp(finished), "data_removed": False, "source": "api",
        "urls": {"get": url, "cancel": f"{url}/cancel"},
    }


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/")


async def create(request: Request, rt: Runtime, tenant: str, name: str, name_field: str, body: PredictionInput,
                 idempotency_key: str | None, prefer: str | None, kind: str | None) -> JSONResponse:
    """Submit the prediction's job and answer 201, having waited for it when ``Prefer: wait`` asks."""
    provider, model = model_of(name, name_field)
    if body.webhook and body.webhook_completed and body.webhook != body.webhook_completed:
        message = "Atelier sends a job's events to one URL: give webhook or webhook_completed"
        raise FacadeError(422, f"webhook_completed: {message}", [("webhook_completed", message)])
    exact = frozenset(ALIASES) if provider == HOME else None
    try:
        job_request = JobRequest(provider=provider, kind=choose_kind(rt, provider, model, kind, body.input),
                                 model=model, input=native_input(body.input, ALIASES, exact, "input"),
                                 webhook_url=body.webhook or body.webhook_completed)
    except ValidationError as exc:
        message = str(exc.errors()[0].get("msg", "invalid"))
        raise FacadeError(422, f"{name_field}: {message}", [(name_field, message)], code="invalid_version") from exc
    job = await submit(rt, tenant, job_request, idempotency_key, lambda f: field_name(f, name_field))
    wait = wait_seconds(prefer)
    if wait is not None:
        job = await wait_finished(rt, job, wait)
    body_out = await prediction(rt, job, base_url(request), starting=wait is not None)
    headers = {"Location": body_out["urls"]["get"]}
    if wait is not None:
        headers["Preference-Applied"] = f"wait={wait:g}"
    return JSONResponse(body_out, status_code=201, headers=headers)


router = APIRouter(route_class=Route, include_in_schema=False)


@router.post("/predictions")
async def create_prediction(request: Request, rt: RuntimeDep, tenant: FacadeTenant,
                            idempotency_key: IdempotencyKey = None, prefer: Prefer = None,
                            kind: Kind = None) -> JSONResponse:
    body = parse_body(await request.body(), PredictionCreate)
    assert isinstance(body, PredictionCreate)
    return await create(request, rt, tenant, body.version, "version", body, idempotency_key, prefer, kind)


@router.post("/models/{owner}/{name}/predictions")
async def create_model_prediction(owner: str, name: str, request: Request, rt: RuntimeDep, tenant: FacadeTenant,
                                  idempotency_key: IdempotencyKey = None, prefer: Prefer = None,
                                  kind: Kind = None) -> JSONResponse:
    body = parse_body(await request.body(), PredictionInput)
    return await create(request, rt, tenant, f"{owner}/{name}", "model", body, idempotency_key, prefer, kind)


@router.get("/models/{owner}/{name}/versions/{version_id}")
async def get_version(owner: str, name: str, version_id: str, tenant: FacadeTenant) -> JSONResponse:
    """A model version as ``replicate.run("owner/name:<version>")`` reads it after creating the prediction:
    Atelier keeps no schemas, so the schema is empty (the output is not an iterator)."""
    if not VERSION_ID.match(version_id):
        raise FacadeError(404, f"version {version_id!r} of {owner}/{name} not found: a version id is 64 hex "
                               "characters", code="not_found")
    return JSONResponse({"id": version_id.lower(), "created_at": "1970-01-01T00:00:00Z", "cog_version": "0.9.0",
                         "openapi_schema": {}})


@router.get("/predictions")
async def list_predictions(request: Request, rt: RuntimeDep, tenant: FacadeTenant,
                           cursor: Annotated[str | None, Query(max_length=80)] = None,
                           limit: Annotated[int, Query(ge=1, le=PAGE_SIZE)] = PAGE_SIZE) -> JSONResponse:
    """Newest first. ``cursor``: ``n.<job id>`` (older than it) or ``p.<job id>`` (newer), as the
    ``next``/``previous`` URLs carry it."""
    direction, _, after = (cursor or "").partition(".")
    if cursor is not None and (direction not in ("n", "p") or not after.startswith("job_")):
        raise FacadeError(400, "cursor: use the previous or next URL of a page", [("cursor", "not a cursor")],
                          code="invalid_cursor")
    if direction == "p":
        page = await rt.store.page(tenant, cursor=after, limit=limit + 1, oldest_first=True)
        jobs = list(reversed(page.jobs[:limit]))
        newer, older = len(page.jobs) > limit, bool(jobs)
    else:
        page = await rt.store.page(tenant, cursor=after or None, limit=limit + 1)
        jobs = page.jobs[:limit]
        newer, older = cursor is not None and bool(jobs), len(page.jobs) > limit

    def link(value: str) -> str:
        return str(request.url.include_query_params(cursor=value))

    base = base_url(request)
    return JSONResponse({
        "previous": link(f"p.{jobs[0].id}") if newer else None,
        "next": link(f"n.{jobs[-1].id}") if older else None,
        "results": [await prediction(rt, job, base, with_logs=False) for job in jobs],
    })


@router.get("/predictions/{prediction_id}")
async def get_prediction(prediction_id: str, request: Request, rt: RuntimeDep, tenant: FacadeTenant) -> JSONResponse:
    job = await owned(rt, tenant, prediction_id, f"prediction {prediction_id!r} not found")
    return JSONResponse(await prediction(rt, job, base_url(request)))


@router.post("/predictions/{prediction_id}/cancel")
async def cancel_prediction(prediction_id: str, request: Request, rt: RuntimeDep,
                            tenant: FacadeTenant) -> JSONResponse:
    """Cancel it (a finished prediction is answered as it is)."""
    job = await owned(rt, tenant, prediction_id, f"prediction {prediction_id!r} not found")
    return JSONResponse(await prediction(rt, await cancel(rt, job), base_url(request)))


fallback = APIRouter(route_class=Route, include_in_schema=False)


@fallback.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
async def unknown_route(path: str) -> None:
    """Anything else (models, trainings, files...): a Replicate-shaped 404."""
    raise FacadeError(404, f"Atelier's Replicate facade has no route /{path} (it serves predictions, "
                           "models/{owner}/{name}/predictions and model versions)", code="not_found")


facade = APIRouter(include_in_schema=False)
# The SDK appends /v1 to its base_url: served at /replicate/v1 (base_url=<atelier>/replicate), and
# one /v1 deeper for a base_url of <atelier>/replicate/v1.
for prefix in (f"{PREFIX}/v1", PREFIX):
    facade.include_router(router, prefix=prefix)
facade.include_router(fallback, prefix=PREFIX)
