"""The dashboard's routes: server-rendered pages over the same handlers and services as ``/v1``.

Every read and every change goes through the API's own route functions (``orchestrator.api.jobs``,
``batches``, ``webhook_endpoints``, ``streams``) called with the session's tenant, so the dashboard
sees and changes exactly what the tenant's API key would, and a ``Problem`` they raise (404 for
another tenant's job, 409 for a finished one) is shown as a page with the same status.
"""

from __future__ import annotations

import asyncio
import functools
import json
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, StreamingResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from orchestrator.api import batches as batches_api
from orchestrator.api import jobs as jobs_api
from orchestrator.api import streams
from orchestrator.api import webhook_endpoints as endpoints_api
from orchestrator.api.dashboard.session import COOKIE, Session, csrf_ok, current, sign_in
from orchestrator.api.deps import RuntimeDep, owned_job
from orchestrator.api.problems import Problem
from orchestrator.domain.job import Job
from orchestrator.services.runtime import Runtime
from orchestrator.store.job_scan import newest_matching
from orchestrator.wire.jobs import JobKind, JobRequest, JobStatus, JobView
from orchestrator.wire.webhooks import EndpointUpdate, RotateSecret

router = APIRouter(prefix="/dashboard", include_in_schema=False)

HERE = Path(__file__).parent
STATIC = {p.name: p for p in (HERE / "static").iterdir() if p.is_file()}
STATIC_TYPES = {".css": "text/css", ".js": "text/javascript", ".svg": "image/svg+xml"}
LIST_LIMIT = 50
LIST_SCAN = 5000  # a filtered list reads at most this many of the tenant's newest jobs (status: of that status)
GRID_LIMIT = 200  # a batch's outputs shown
PROVIDER_SCAN = 5000  # a batch's jobs read for its per-provider progress
FOLLOWUP_SCAN = 200
FEED_WAIT_SECONDS = 1.0

# Scripts and styles only from Atelier; media from wherever outputs are stored (local or presigned S3).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src * data:; "
                               "media-src *; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # pages hold signed output URLs
    "Cache-Control": "no-store",
}


def _since(then: datetime | None, now: datetime | None) -> str:
    if then is None or now is None:
        return ""
    seconds = (now - then).total_seconds()
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else ""


templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                        trim_blocks=True, lstrip_blocks=True)
templates.filters["when"] = _when
templates.filters["pretty"] = lambda value: json.dumps(value, indent=2, sort_keys=True, default=str)
templates.globals["since"] = _since
templates.globals["statuses"] = [s.value for s in JobStatus]
templates.globals["kinds"] = [k.value for k in JobKind]


def render(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(templates.get_template(name).render(**context), status_code=status,
                        headers=SECURITY_HEADERS)


class SignInRequired(Exception):
    pass


async def _session(rt: Runtime, request: Request) -> Session:
    session = await current(rt, request)
    if session is None:
        raise SignInRequired
    return session


async def _form(request: Request, session: Session | None) -> dict[str, str]:
    """The urlencoded form; for a signed-in change, a valid CSRF token and a same-origin request."""
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
        raise Problem(403, "Forbidden", "cross-origin form")
    fields = {k: v[0] for k, v in parse_qs((await request.body()).decode("utf-8", "replace")).items()}
    if session is not None and not csrf_ok(session, fields.get("csrf") or request.headers.get("x-csrf-token")):
        raise Problem(403, "Forbidden", "missing or invalid CSRF token; reload the page and try again")
    return fields


Handler = Callable[..., Awaitable[Response]]


def page(handler: Handler) -> Handler:
    """Signed-out visitors go to the sign-in page (401 for streams and forms); a ``Problem`` is a page."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Response:
        request: Request = kwargs["request"]
        try:
            return await handler(*args, **kwargs)
        except SignInRequired:
            if request.method == "GET" and "text/event-stream" not in request.headers.get("accept", ""):
                target = "/dashboard/login?" + urlencode({"next": request.url.path})
                return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
            return render("error.html", 401, title="Sign in required", detail="your session has ended",
                          session=None)
        except Problem as exc:
            session = await current(request.app.state.runtime, request)
            return render("error.html", exc.status, title=exc.title, detail=exc.detail, session=session)

    return wrapper


# -- sign in -----------------------------------------------------------------------------------------

def _next(value: str | None) -> str:
    return value if value and value.startswith("/dashboard/") and "//" not in value else "/dashboard/jobs"


@router.get("")
async def home() -> RedirectResponse:
    return RedirectResponse("/dashboard/jobs", status_code=303)


@router.get("/login")
async def login_form(request: Request, next: str | None = None) -> Response:
    return render("login.html", next=_next(next), error=None, session=None)


@router.post("/login")
@page
async def login(request: Request, rt: RuntimeDep) -> Response:
    fields = await _form(request, None)
    signed = await sign_in(rt, request, fields.get("api_key", "").strip())
    if signed is None:
        return render("login.html", 401, next=_next(fields.get("next")), error="That API key is not valid.",
                      session=None)
    cookie, session = signed
    response = RedirectResponse(_next(fields.get("next")), status_code=303, headers=SECURITY_HEADERS)
    response.set_cookie(COOKIE, cookie, max_age=rt.settings.dashboard_session_seconds, path="/dashboard",
                        httponly=True, samesite="strict",
                        secure=request.url.scheme == "https" or rt.settings.public_url.startswith("https:"))
    return response


@router.post("/logout")
@page
async def logout(request: Request, rt: RuntimeDep) -> Response:
    await _form(request, await _session(rt, request))
    response = RedirectResponse("/dashboard/login", status_code=303, headers=SECURITY_HEADERS)
    response.delete_cookie(COOKIE, path="/dashboard", httponly=True, samesite="strict")
    return response


@router.get("/static/{name}")
async def static(name: str) -> Response:
    path = STATIC.get(name)
    if path is None:
        return Response(status_code=404)
    return FileResponse(path, media_type=STATIC_TYPES.get(path.suffix, "application/octet-stream"),
                        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})


# -- jobs --------------------------------------------------------------------------------------------

def _instant(name: str, value: str) -> float:
    try:
        when = datetime.fromisoformat(value)
    except ValueError as exc:
        raise Problem(422, "Invalid filter", f"{name}: not an ISO 8601 time or date: {value!r}") from exc
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


@dataclass(frozen=True)
class Filters:
    status: JobStatus | None = None
    provider: str | None = None
    kind: str | None = None
    model: str | None = None
    batch: str | None = None
    after: str | None = None  # created at or after (ISO time or date, UTC unless it says)
    before: str | None = None

    @classmethod
    def of(cls, request: Request) -> Filters:
        q = request.query_params

        def one(name: str) -> str | None:
            value = q.get(name, "").strip()
            return value[:200] or None

        status = one("status")
        if status is not None and status not in {s.value for s in JobStatus}:
            raise Problem(422, "Invalid filter", f"status: unknown status {status!r}")
        after, before = one("after"), one("before")
        for name, value in (("after", after), ("before", before)):
            if value is not None:
                _instant(name, value)
        return cls(JobStatus(status) if status else None, one("provider"), one("kind"), one("model"), one("batch"),
                   after, before)

    def bounds(self) -> tuple[float | None, float | None]:
        return (_instant("after", self.after) if self.after else None,
                _instant("before", self.before) if self.before else None)

    def query(self) -> str:
        return urlencode({k: v for k, v in self.__dict__.items() if v})

    def wants(self, job: Job) -> bool:
        after, before = self.bounds()
        created = job.created_at.timestamp()
        return ((self.status is None or job.status == self.status)
                and (after is None or created >= after) and (before is None or created <= before)
                and (self.provider is None or job.provider == self.provider)
                and (self.kind is None or job.kind.value == self.kind)
                and (self.model is None or job.model == self.model))


async def _jobs(rt: Runtime, tenant: str, f: Filters, limit: int = LIST_LIMIT) -> list[Job]:
    """The tenant's newest jobs that pass the filters (status and provider use the API's indexes)."""
    if f.batch:
        if await rt.batches.owned(tenant, f.batch) is None:
            raise Problem(404, "Not found", f"no batch {f.batch!r}")
        narrowed = f.provider or f.kind or f.model or f.after or f.before
        ids, _ = await rt.batches.job_ids(f.batch, f.status, None, 1000 if narrowed else limit)
        in_batch = [j for j in await rt.store.get_many(ids) if j is not None and f.wants(j)]
        return sorted(in_batch, key=lambda j: j.id, reverse=True)[:limit]
    after, before = f.bounds()
    return (await newest_matching(rt.store, tenant, status=f.status, provider=f.provider, kind=f.kind, model=f.model,
                                  created_from=after, created_to=before, limit=limit, scan_limit=LIST_SCAN)).jobs


@router.get("/jobs")
@page
async def jobs_page(request: Request, rt: RuntimeDep) -> Response:
    session = await _session(rt, request)
    f = Filters.of(request)
    views = [await rt.jobs.view(j) for j in await _jobs(rt, session.tenant, f)]
    return render("jobs.html", session=session, jobs=views, filters=f, query=f.query(),
                  providers=rt.registry.names(), nav="jobs")


def _event(kind: str, data: object) -> str:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n"


@router.get("/jobs/live")
@page
async def jobs_live(request: Request, rt: RuntimeDep) -> Response:
    """The list's changes as SSE: a row for every new or changed job. State changes are woken by the
    same Redis channels as ``/v1/jobs/{id}/stream`` (one subscription per unfinished job on the list);
    new jobs are found by re-reading the list each second, since no channel announces them."""
    session = await _session(rt, request)
    f = Filters.of(request)
    row = templates.get_template("_job_row.html")

    async def body() -> AsyncIterator[str]:
        sent: dict[str, int] = {}
        watched: set[str] = set()
        pubsub = rt.redis.pubsub()
        try:
            while not await request.is_disconnected():
                jobs = await _jobs(rt, session.tenant, f)
                listed = {j.id for j in jobs}
                for gone in [i for i in sent if i not in listed]:  # left the filter or fell off the page
                    del sent[gone]
                    yield _event("gone", {"id": gone})
                for job in reversed(jobs):  # oldest first: each new row goes on top
                    if sent.get(job.id) != job.version:
                        sent[job.id] = job.version
                        html = row.render(job=await rt.jobs.view(job))
                        yield _event("job", {"id": job.id, "v": job.version, "html": html})
                wanted = {rt.store.events_key(j.id) for j in jobs if not j.status.terminal}
                if wanted - watched:
                    await pubsub.subscribe(*(wanted - watched))
                if watched - wanted:
                    await pubsub.unsubscribe(*(watched - wanted))
                watched = wanted
                if watched:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=FEED_WAIT_SECONDS)
                    while message is not None:  # take the whole burst, then re-read once
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.05)
                else:
                    await asyncio.sleep(FEED_WAIT_SECONDS)
                yield ": tick\n\n"
        finally:
            await pubsub.aclose()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _followups(rt: Runtime, tenant: str, job_id: str) -> list[Job]:
    found = await rt.store.page(tenant, limit=FOLLOWUP_SCAN)
    return [j for j in found.jobs if j.source is not None and j.source.job_id == job_id]


@router.get("/jobs/{job_id}")
@page
async def job_page(job_id: str, request: Request, rt: RuntimeDep) -> Response:
    session = await _session(rt, request)
    view: JobView = await jobs_api.get_job(job_id, rt, session.tenant)
    events = await jobs_api.job_events(job_id, rt, session.tenant)
    followups = await _followups(rt, session.tenant, job_id)
    template = "_job_main.html" if request.query_params.get("fragment") else "job.html"
    return render(template, session=session, job=view, events=events, followups=followups,
                  raw=view.model_dump_json(indent=2), rerun_token=secrets.token_urlsafe(12), nav="jobs")


@router.get("/jobs/{job_id}/stream")
@page
async def job_stream(job_id: str, request: Request, rt: RuntimeDep) -> Response:
    """``/v1/jobs/{id}/stream`` for the signed-in tenant (an EventSource cannot send a bearer key)."""
    session = await _session(rt, request)
    return await streams.job_stream(job_id, request, rt, session.tenant,
                                    last_event_id=request.headers.get("last-event-id"))


@router.post("/jobs/{job_id}/cancel")
@page
async def cancel_job(job_id: str, request: Request, rt: RuntimeDep) -> Response:
    session = await _session(rt, request)
    await _form(request, session)
    await jobs_api.cancel_job(job_id, rt, session.tenant)
    return RedirectResponse(f"/dashboard/jobs/{job_id}", status_code=303, headers=SECURITY_HEADERS)


@router.post("/jobs/{job_id}/rerun")
@page
async def rerun_job(job_id: str, request: Request, rt: RuntimeDep) -> Response:
    """A new job with the same request (through ``POST /v1/jobs``); the form's one-time token is the
    idempotency key, so a double click makes one job."""
    session = await _session(rt, request)
    fields = await _form(request, session)
    job = await owned_job(rt, session.tenant, job_id)
    again = JobRequest(provider=job.provider, kind=job.kind, model=job.model, input=job.input,
                       webhook_url=job.webhook_url, metadata=job.metadata, priority=job.priority,
                       retry_unknown_submissions=job.retry_unknown_submissions, operation=job.operation,
                       source=job.source)
    token = fields.get("token", "")[:64] or secrets.token_urlsafe(12)
    created = await jobs_api.create_job(again, rt, session.tenant, Response(),
                                        idempotency_key=f"dashboard-rerun:{job_id}:{token}")
    return RedirectResponse(f"/dashboard/jobs/{created.id}", status_code=303, headers=SECURITY_HEADERS)


# -- batches -----------------------------------------------------------------------------------------

@router.get("/batches")
@page
async def batches_page(request: Request, rt: RuntimeDep) -> Response:
    session = await _session(rt, request)
    found = await batches_api.list_batches(rt, session.tenant, None, 50)
    return render("batches.html", session=session, batches=found.data, nav="batches")


@router.get("/batches/{batch_id}")
@page
async def batch_page(batch_id: str, request: Request, rt: RuntimeDep) -> Response:
    session = await _session(rt, request)
    batch = await batches_api.get_batch(batch_id, rt, session.tenant)
    jobs = await batches_api.batch_jobs(batch_id, rt, session.tenant, None, None, GRID_LIMIT)
    providers = _by_provider(jobs.data)
    cursor, scanned = jobs.next_cursor, len(jobs.data)
    while cursor is not None and scanned < PROVIDER_SCAN:  # the per-provider counts read further than the grid
        more = await batches_api.batch_jobs(batch_id, rt, session.tenant, None, cursor, 1000)
        for provider, counts in _by_provider(more.data).items():
            providers.setdefault(provider, Counter()).update(counts)
        cursor, scanned = more.next_cursor, scanned + len(more.data)
    template = "_batch_main.html" if request.query_params.get("fragment") else "batch.html"
    return render(template, session=session, batch=batch, jobs=jobs.data, more=jobs.next_cursor is not None,
                  providers=sorted(providers.items()), providers_partial=cursor is not None, nav="batches")


def _by_provider(jobs: list[JobView]) -> dict[str, Counter[str]]:
    """Per provider, its jobs per status (and ``done``: how many finished)."""
    counts: dict[str, Counter[str]] = {}
    for job in jobs:
        c = counts.setdefault(job.provider, Counter())
        c[job.status.value] += 1
        c["done"] += job.status.terminal
    return counts


@router.get("/batches/{batch_id}/stream")
@page
async def batch_stream(batch_id: str, request: Request, rt: RuntimeDep) -> Response:
    session = await _session(rt, request)
    return await streams.batch_stream(batch_id, request, rt, session.tenant,
                                      last_event_id=request.headers.get("last-event-id"))


@router.post("/batches/{batch_id}/cancel")
@page
async def cancel_batch(batch_id: str, request: Request, rt: RuntimeDep) -> Response:
    session = await _session(rt, request)
    await _form(request, session)
    await batches_api.cancel_batch(batch_id, rt, session.tenant)
    return RedirectResponse(f"/dashboard/batches/{batch_id}", status_code=303, headers=SECURITY_HEADERS)


# -- webhooks ----------------------------------------------------------------------------------------

@router.get("/webhooks")
@page
async def webhooks_page(request: Request, rt: RuntimeDep) -> Response:
    session = await _session(rt, request)
    found = await endpoints_api.list_endpoints(rt, session.tenant, None, 50)
    return render("webhooks.html", session=session, endpoints=found.data, nav="webhooks")


@router.get("/webhooks/{endpoint_id}")
@page
async def endpoint_page(endpoint_id: str, request: Request, rt: RuntimeDep) -> Response:
    session = await _session(rt, request)
    endpoint = await endpoints_api.get_endpoint(endpoint_id, rt, session.tenant)
    deliveries = await endpoints_api.list_deliveries(endpoint_id, rt, session.tenant, None, None, 50)
    return render("endpoint.html", session=session, endpoint=endpoint, deliveries=deliveries.data,
                  nav="webhooks")


@router.post("/webhooks/{endpoint_id}/deliveries/{delivery_id}/replay")
@page
async def replay_delivery(endpoint_id: str, delivery_id: str, request: Request, rt: RuntimeDep) -> Response:
    session = await _session(rt, request)
    await _form(request, session)
    await endpoints_api.replay_delivery(endpoint_id, delivery_id, rt, session.tenant)
    return RedirectResponse(f"/dashboard/webhooks/{endpoint_id}", status_code=303, headers=SECURITY_HEADERS)


@router.post("/webhooks/{endpoint_id}/enabled")
@page
async def endpoint_enabled(endpoint_id: str, request: Request, rt: RuntimeDep) -> Response:
    """Enable (``enabled=true``, which clears the failure streak) or disable the endpoint."""
    session = await _session(rt, request)
    fields = await _form(request, session)
    body = EndpointUpdate(enabled=fields.get("enabled") == "true")
    await endpoints_api.update_endpoint(endpoint_id, body, rt, session.tenant)
    return RedirectResponse(f"/dashboard/webhooks/{endpoint_id}", status_code=303, headers=SECURITY_HEADERS)


@router.post("/webhooks/{endpoint_id}/rotate")
@page
async def endpoint_rotate(endpoint_id: str, request: Request, rt: RuntimeDep) -> Response:
    session = await _session(rt, request)
    await _form(request, session)
    secret = await endpoints_api.rotate_secret(endpoint_id, rt, session.tenant, RotateSecret())
    endpoint = await endpoints_api.get_endpoint(endpoint_id, rt, session.tenant)
    deliveries = await endpoints_api.list_deliveries(endpoint_id, rt, session.tenant, None, None, 50)
    return render("endpoint.html", session=session, endpoint=endpoint, deliveries=deliveries.data,
                  new_secret=secret, nav="webhooks")


@router.post("/webhooks/{endpoint_id}/recover")
@page
async def endpoint_recover(endpoint_id: str, request: Request, rt: RuntimeDep) -> Response:
    """Resend every dead delivery since the given time (``POST .../recover``)."""
    session = await _session(rt, request)
    fields = await _form(request, session)
    since = datetime.fromtimestamp(_instant("since", fields.get("since", "").strip()), UTC)
    done = await endpoints_api.recover(endpoint_id, rt, session.tenant, since)
    endpoint = await endpoints_api.get_endpoint(endpoint_id, rt, session.tenant)
    deliveries = await endpoints_api.list_deliveries(endpoint_id, rt, session.tenant, None, None, 50)
    return render("endpoint.html", session=session, endpoint=endpoint, deliveries=deliveries.data,
                  recovery=done, nav="webhooks")
