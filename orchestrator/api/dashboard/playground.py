"""The playground: a form built from the model catalog (what ``GET /v1/models`` lists) that submits one
job through ``POST /v1/jobs``.

Choosing a model (and kind) renders that model's inputs: a list of allowed values becomes a select, a
range a number field with its bounds, inputs the model does not take are left out. The catalog only
shapes the form; ``POST /v1/jobs`` (the catalog's lifecycle and the adapter's ``validate``) stays the
authority, and what it refuses comes back on the form naming the field.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError

from orchestrator.api import jobs as jobs_api
from orchestrator.api import models as models_api
from orchestrator.api.dashboard.pages import SECURITY_HEADERS, _form, _session, page, render
from orchestrator.api.dashboard.session import Session
from orchestrator.api.deps import RuntimeDep
from orchestrator.api.problems import Problem, field_name
from orchestrator.services.runtime import Runtime
from orchestrator.wire.jobs import JobRequest
from orchestrator.wire.models import ModelInputs, ModelView, NumberRange

router = APIRouter(prefix="/dashboard", include_in_schema=False)

DEFAULT_MODEL = "replicate/black-forest-labs/flux-schnell"
INPUTS = ("prompt", "negative_prompt", "image_url", "aspect_ratio", "resolution", "duration_seconds", "seed",
          "num_outputs")
FIELDS = ("provider", "kind", "model", *INPUTS, "options")


def _catalog(rt: Runtime) -> list[ModelView]:
    """The catalog as ``GET /v1/models`` lists it (the same function)."""
    return models_api.all_models(rt.registry)


def _choose(models: list[ModelView], provider: str | None, model: str | None, kind: str | None
            ) -> tuple[ModelView, str]:
    """The model and kind asked for; else the default, else the first available model."""
    wanted = next((m for m in models if m.provider == provider and m.model == model), None)
    if wanted is None:
        wanted = next((m for m in models if m.id == DEFAULT_MODEL and m.lifecycle.available), None) or next(
            (m for m in models if m.lifecycle.available), models[0])
    return wanted, kind if kind in wanted.kinds else wanted.kinds[0]


def _allowed(spec: ModelInputs) -> dict[str, str]:
    """Each constrained input's allowed values, as the form's hint says them."""

    def say(value: list[Any] | NumberRange | None, unit: str = "") -> str | None:
        if value is None:
            return None
        if isinstance(value, NumberRange):
            return f"{value.min:g} to {value.max:g}{unit}"
        return ", ".join(f"{v:g}" if isinstance(v, int | float) else str(v) for v in value) + unit

    hints = {"duration_seconds": say(spec.duration_seconds, " s"), "aspect_ratio": say(spec.aspect_ratio),
             "resolution": say(spec.resolution), "num_outputs": say(spec.num_outputs)}
    return {k: v for k, v in hints.items() if v}


def _playground(rt: Runtime, session: Session, values: dict[str, str], error: str | None = None,
                status: int = 200) -> HTMLResponse:
    models = _catalog(rt)
    chosen, kind = _choose(models, values.get("provider"), values.get("model"), values.get("kind"))
    spec = chosen.inputs[kind]
    by_provider: dict[str, list[ModelView]] = {}
    for m in models:
        by_provider.setdefault(m.provider, []).append(m)
    return render("playground.html", status, session=session, values=values, error=error, model=chosen, kind=kind,
                  spec=spec, hints=_allowed(spec), by_provider=by_provider, token=secrets.token_urlsafe(12),
                  nav="playground")


@router.get("/playground")
@page
async def playground(request: Request, rt: RuntimeDep) -> Response:
    session = await _session(rt, request)
    values = {k: v for k, v in request.query_params.items() if k in FIELDS}
    chosen = request.query_params.get("id", "")
    if chosen:  # the model chooser: "provider/model"
        values["provider"], _, values["model"] = chosen.partition("/")
    return _playground(rt, session, values)


@router.post("/playground")
@page
async def playground_submit(request: Request, rt: RuntimeDep) -> Response:
    """Submit a job through ``POST /v1/jobs``; what it refuses comes back on the form, naming the field."""
    session = await _session(rt, request)
    fields = await _form(request, session)
    values = {k: fields.get(k, "").strip() for k in FIELDS}
    inputs: dict[str, Any] = {k: values[k] for k in INPUTS if values[k]}
    try:
        if values["options"]:
            inputs["options"] = json.loads(values["options"])
        request_ = JobRequest.model_validate({"provider": values["provider"], "kind": values["kind"],
                                              "model": values["model"], "input": inputs})
        token = fields.get("token", "")[:64] or secrets.token_urlsafe(12)
        created = await jobs_api.create_job(request_, rt, session.tenant, Response(),
                                            idempotency_key=f"dashboard-playground:{token}")
    except json.JSONDecodeError as exc:
        return _playground(rt, session, values, f"input.options: not JSON ({exc.msg})", 422)
    except ValidationError as exc:
        err = exc.errors()[0]
        return _playground(rt, session, values, f"{field_name(err.get('loc', ()))}: {err.get('msg')}", 422)
    except Problem as exc:
        return _playground(rt, session, values, exc.detail or exc.title, exc.status)
    return RedirectResponse(f"/dashboard/jobs/{created.id}", status_code=303, headers=SECURITY_HEADERS)
