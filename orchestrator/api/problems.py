"""RFC 9457 problem details (``application/problem+json``) for every error the API returns."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import fastapi.routing
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from orchestrator.store.jobs import UnreadableRecord

log = logging.getLogger("atelier.api")

PROBLEM_JSON = "application/problem+json"


class Problem(Exception):
    def __init__(self, status: int, title: str, detail: str | None = None, *,
                 headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail or title)
        self.status = status
        self.title = title
        self.detail = detail
        self.headers = headers
        self.extra = extra


def problem_response(status: int, title: str, detail: str | None = None, *,
                     headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status}
    if detail:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def field_name(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def routes_of(app: Starlette) -> Iterator[Any]:
    """Every route of ``app`` with its router's prefix applied. FastAPI 0.16x keeps included routers
    nested (``_IncludedRouter``) and flattens them through ``iter_route_contexts``; older versions
    list the routes themselves."""
    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    yield from app.router.routes if iter_contexts is None else iter_contexts(app.router.routes)


def allowed_methods(request: Request) -> str:
    """``Allow`` for a 405: the methods of every route at this path, not only the first one Starlette
    tried (``/v1/jobs/{job_id}`` is GET and DELETE). A route with a literal segment where another has
    a parameter is the more specific resource (``/v1/jobs/query`` is POST only)."""
    matching: list[tuple[int, set[str]]] = []
    for route in routes_of(request.app):
        methods = getattr(route, "methods", None)
        if methods and route.matches(request.scope)[0] != Match.NONE:
            matching.append((len(getattr(route, "param_convertors", {})), set(methods)))
    fewest = min((params for params, _ in matching), default=0)
    allowed = set().union(*(methods for params, methods in matching if params == fewest))
    return ", ".join(sorted(allowed))


def install(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.title, exc.detail, headers=exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return problem_response(400, "Malformed JSON", "the request body is not valid JSON")
        if isinstance(exc.body, bytes | bytearray) and exc.body:
            # FastAPI hands the raw bytes on when the Content-Type is not JSON
            return problem_response(415, "Unsupported media type", "send the body as JSON with "
                                    f"'Content-Type: application/json' (got {request.headers.get('content-type')!r})")
        fields = [{"field": field_name(e.get("loc", ())), "message": e.get("msg", "invalid")} for e in errors]
        detail = "; ".join(f"{f['field']}: {f['message']}" for f in fields)
        return problem_response(422, "Invalid request", detail, errors=fields)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {400: "Bad request", 404: "Not found", 405: "Method not allowed", 401: "Unauthorized",
                 413: "Request body too large"}.get(exc.status_code, "Error")
        detail = exc.detail if isinstance(exc.detail, str) else None
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return problem_response(exc.status_code, title, detail, headers=headers)

    @app.exception_handler(UnreadableRecord)
    async def _unreadable(request: Request, exc: UnreadableRecord) -> JSONResponse:
        log.error("%s", exc, extra={"job_id": exc.job_id, "event": "record.unreadable"})
        return problem_response(410, "Gone", "this job's record cannot be read; it is set aside for an operator "
                                             "(atelier quarantine list)")

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        # json.loads of a body nested thousands of levels deep (a million '[')
        return problem_response(400, "Malformed JSON", "the request body is nested too deeply to read")

    last_logged = [0.0]

    @app.exception_handler(RedisError)
    async def _store_unavailable(request: Request, exc: RedisError) -> JSONResponse:
        # Redis restarting or failing over: a retryable 503, not a crash (fault suite, tests/faults).
        # Logged at most every few seconds: an outage fails every request at once.
        if time.monotonic() - last_logged[0] >= 5.0:
            last_logged[0] = time.monotonic()
            log.warning("redis unavailable (%s %s: %s); answering 503 meanwhile", request.method,
                        request.url.path, exc, extra={"event": "api.redis_unavailable"})
        return problem_response(503, "Service unavailable", "the job store is briefly unreachable; retry",
                                headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(500, "Internal error", "the server failed to handle this request")
