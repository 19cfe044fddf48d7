"""The OpenAPI document a client generator can trust, and the docs pages that read it offline.

``install(app)`` walks the app's routes once, when ``/openapi.json`` is first asked for, and adds
to each operation what FastAPI cannot infer: every error status the route can answer with, as
``application/problem+json`` (``problems.py``), and request/response examples on the main routes.
The Bearer scheme comes from ``deps.tenant`` (``HTTPBearer``): every route that takes ``TenantDep``
declares it. A new route is documented without an edit here: the standard statuses follow from
its signature (below); others it declares with ``responses={409: {"description": ...}}`` in its
decorator, which gets the problem+json schema too.

| status | when the route can answer it |
|---|---|
| 400 | it reads a JSON body (malformed JSON) |
| 401 | it takes the API key (``TenantDep``) |
| 404 | it has a path parameter (the resource is not the tenant's or does not exist) |
| 410 | it reads a job record by ``job_id`` (an unreadable record, set aside for an operator) |
| 413, 415 | it reads a body (over the size cap; a Content-Type other than JSON) |
| 422 | it takes any parameter or a body (the field is named) |
| 503 | it uses the runtime (Redis briefly unreachable; ``Retry-After``) |

Routes answering in another API's error shape (the facades under ``FACADE_PREFIXES``) are left as
they are: their SDKs' tests are their contract.

``/docs`` (Swagger UI, with the Authorize button) and ``/redoc`` load their scripts and styles from
``/docs-assets``, served from the ``fastapi-offline`` package's copy of swagger-ui-dist and Redoc:
no CDN, so the pages work on an air-gapped host.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.api import deps
from orchestrator.api.problems import PROBLEM_JSON, routes_of

ASSETS_URL = "/docs-assets"
FACADE_PREFIXES = ("/openai/", "/replicate/", "/fal/")

TITLES = {400: "Malformed JSON", 401: "Missing or invalid API key", 403: "Forbidden", 404: "Not found",
          409: "Conflict", 410: "The record cannot be read (set aside for an operator)",
          413: "Request body too large", 415: "Unsupported media type: send Content-Type: application/json",
          422: "Invalid request: each field named in `errors`", 429: "Too many requests",
          503: "Service briefly unavailable: retry after `Retry-After` seconds"}


class FieldProblem(BaseModel):
    field: str = Field(description="The refused field, dotted (`input.duration_seconds`, `jobs.3.model`)")
    message: str


class ProblemDocument(BaseModel):
    """RFC 9457 problem details; some errors add members (``job_id``, ``invalid``, ``status_code``...)."""

    model_config = ConfigDict(extra="allow", title="Problem")

    type: str = Field("about:blank", description="Always `about:blank`: `title` and `status` say what it is")
    title: str
    status: int
    detail: str | None = None
    errors: list[FieldProblem] | None = Field(None, description="Every refused field (422)")


# Statuses a route answers that its signature does not show. A new route can say them in its decorator
# (`responses={409: {"description": ...}}`) instead.
ROUTE_ERRORS: dict[tuple[str, str], dict[int, str]] = {
    ("POST", "/v1/jobs"): {404: "`source.job_id` is not one of this tenant's jobs",
                           409: "The Idempotency-Key was used with another body, or the source job has not "
                                "succeeded", 410: TITLES[410]},
    ("POST", "/v1/jobs/{job_id}/cancel"): {409: "The job already finished (or kept changing: retry)"},
    ("DELETE", "/v1/jobs/{job_id}"): {409: "The job has not finished: cancel it first"},
    ("POST", "/v1/batches"): {409: "The Idempotency-Key was used with another batch"},
    ("POST", "/v1/webhook-endpoints"): {409: "The tenant has the maximum number of webhook endpoints"},
    ("POST", "/v1/webhook-endpoints/{endpoint_id}/deliveries/{delivery_id}/replay"): {
        409: "The endpoint is disabled, or the delivery is still being attempted"},
    ("POST", "/v1/webhook-endpoints/{endpoint_id}/recover"): {409: "The endpoint is disabled"},
    ("GET", "/v1/files/{key}"): {403: "The signed URL is invalid or has expired"},
    ("POST", "/v1/callbacks/{provider}"): {400: "The callback's body or headers cannot be read",
                                           401: "The callback's signature or token is wrong"},
}

_JOB_REQUEST: dict[str, Any] = {"provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
                "input": {"prompt": "a red fox in the snow", "aspect_ratio": "16:9"},
                "metadata": {"order": "A-1042"}}
_JOB_VIEW: dict[str, Any] = {
    "object": "job", "id": "job_01kbk3w7r0f1ks1x9d4e5v2q7m", "status": "queued", "phase": None,
    "provider": "replicate", "kind": "image", "model": "black-forest-labs/flux-schnell",
    "input": {"prompt": "a red fox in the snow", "aspect_ratio": "16:9"}, "priority": "normal",
    "progress": None, "outputs": [], "error": None, "provider_task_id": None, "provider_request_id": None,
    "provider_status": None, "note": None, "attempts": 0, "metadata": {"order": "A-1042"}, "webhook_url": None,
    "batch_id": None, "operation": "generate", "created_at": "2026-12-03T10:40:00Z",
    "updated_at": "2026-12-03T10:40:00Z", "timestamps": {"queued": "2026-12-03T10:40:00Z"},
    "deadline_at": "2026-12-03T11:10:00Z", "sequence": 1,
}
_BATCH_REQUEST: dict[str, Any] = {"jobs": [{"ref": "fox", **_JOB_REQUEST},
                           {"ref": "owl", "provider": "replicate", "kind": "image",
                            "model": "black-forest-labs/flux-schnell", "input": {}}],
                  "metadata": {"campaign": "winter"}}
_BATCH_CREATED: dict[str, Any] = {
    "object": "batch", "id": "bat_01kbk3w9g2y3x0c6m1r7j8n4tq", "status": "running", "total": 1, "invalid_count": 1,
    "counts": {"queued": 1}, "done": 0, "progress": 0, "canceled": False, "webhook_url": None,
    "metadata": {"campaign": "winter"}, "created_at": "2026-12-03T10:40:00Z", "finished_at": None,
    "items": [{"index": 0, "ref": "fox", "job_id": "job_01kbk3w9g4a5b6c7d8e9f0g1h2"}],
    "invalid": [{"index": 1, "ref": "owl", "field": "input.prompt", "message": "Field required"}],
}

# Request and response examples: (method, path) -> (request body, {status: response body}).
EXAMPLES: dict[tuple[str, str], tuple[dict[str, Any] | None, dict[int, Any]]] = {
    ("POST", "/v1/jobs"): (_JOB_REQUEST, {202: _JOB_VIEW}),
    ("POST", "/v1/batches"): (_BATCH_REQUEST, {202: _BATCH_CREATED}),
    ("POST", "/v1/jobs/query"): ({"ids": ["job_01kbk3w7r0f1ks1x9d4e5v2q7m", "job_01kbk3w7r0nothere0000000000"]},
                                 {200: {"object": "list", "data": [_JOB_VIEW],
                                        "not_found": ["job_01kbk3w7r0nothere0000000000"]}}),
}
_PROBLEM_EXAMPLE: dict[str, Any] = {"type": "about:blank", "title": "Invalid request", "status": 422,
                    "detail": "model: unknown model 'flux-slow'; input.prompt: Field required",
                    "errors": [{"field": "model", "message": "unknown model 'flux-slow'"},
                               {"field": "input.prompt", "message": "Field required"}]}


def _walk(dependant: Dependant) -> Iterator[Dependant]:
    yield dependant
    for sub in dependant.dependencies:
        yield from _walk(sub)


def route_errors(route: Any, method: str, secured: bool) -> dict[int, str]:
    """Every error status ``route`` can answer with, and what each means there."""
    parts = list(_walk(route.dependant))
    path_params = {p.name for d in parts for p in d.path_params}
    other_params = [p for d in parts for p in (*d.query_params, *d.header_params, *d.cookie_params)]
    has_body = route.body_field is not None
    statuses: dict[int, str] = {}
    if has_body:
        statuses |= {400: TITLES[400], 413: TITLES[413], 415: TITLES[415]}
    if secured:
        statuses[401] = TITLES[401]
    if path_params:
        statuses[404] = TITLES[404]
    if "job_id" in path_params:
        statuses[410] = TITLES[410]
    if has_body or path_params or other_params:
        statuses[422] = TITLES[422]
    if any(d.call is deps.runtime for d in parts):
        statuses[503] = TITLES[503]
    statuses |= ROUTE_ERRORS.get((method, route.path_format), {})
    return statuses


def _problem_content(status: int) -> dict[str, Any]:
    media: dict[str, Any] = {"schema": {"$ref": "#/components/schemas/Problem"}}
    if status == 422:
        media["example"] = _PROBLEM_EXAMPLE
    return {PROBLEM_JSON: media}


def _add_examples(operation: dict[str, Any], request: dict[str, Any] | None, responses: dict[int, Any]) -> None:
    body = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if body is not None and request is not None:
        body["example"] = request
    for status, example in responses.items():
        content = operation["responses"].setdefault(str(status), {"description": "OK"}).setdefault("content", {})
        content.setdefault("application/json", {})["example"] = example


def build_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, completed (see the module docstring)."""
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, description=app.description,
                         routes=app.routes, tags=app.openapi_tags, servers=app.servers)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    problem = ProblemDocument.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(problem.pop("$defs", {}))
    components["Problem"] = problem
    paths = schema.get("paths", {})
    for route in routes_of(app):
        if not isinstance(getattr(route, "original_route", route), APIRoute) or not route.include_in_schema:
            continue
        if route.path_format.startswith(FACADE_PREFIXES):
            continue
        for method in sorted(route.methods - {"HEAD"}):
            operation = paths.get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            statuses = route_errors(route, method, secured=bool(operation.get("security")))
            declared = {int(s) for s in responses if s.isdigit() and int(s) >= 400}
            for status in sorted(declared | set(statuses)):
                entry = responses.setdefault(str(status), {"description": statuses.get(status, TITLES.get(
                    status, "Error"))})
                if status == 422 and entry.get("description") == "Validation Error":
                    entry["description"] = TITLES[422]
                entry["content"] = _problem_content(status)
            operation["responses"] = dict(sorted(responses.items()))
            if (method, route.path_format) in EXAMPLES:
                request, examples = EXAMPLES[(method, route.path_format)]
                _add_examples(operation, copy.deepcopy(request), copy.deepcopy(examples))
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 shape, replaced above
        if f'"#/components/schemas/{name}"' not in json.dumps(schema):
            components.pop(name, None)
    return schema


def install(app: FastAPI) -> None:
    """The completed ``/openapi.json``; ``/docs`` and ``/redoc`` served with local assets.

    The app is created with ``docs_url=None, redoc_url=None`` so that these replace FastAPI's pages
    (which load swagger-ui and Redoc from a CDN).
    """
    cached: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if not cached:
            cached.update(build_schema(app))
        return cached

    app.openapi = openapi  # type: ignore[method-assign]
    assets = importlib.resources.files("fastapi_offline") / "static"
    app.mount(ASSETS_URL, StaticFiles(directory=str(assets)), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{app.title} API", oauth2_redirect_url=redirect_url,
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js", swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
            swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True})

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} API",
                              redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
                              redoc_favicon_url=f"{ASSETS_URL}/favicon.png", with_google_fonts=False)
