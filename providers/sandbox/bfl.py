"""Black Forest Labs FLUX API simulator (direct API: the model is the route).

Written from BFL's documented wire format (shared/providers/images-wave2.md §4), not from our
adapter.

Routes (header ``x-key``; JSON bodies):

- ``POST /v1/{model}`` for ``flux-2-pro``, ``flux-2-pro-preview``, ``flux-2-max``, ``flux-2-flex``,
  ``flux-2-klein-4b``, ``flux-2-klein-9b``, ``flux-2-klein-9b-preview``, ``flux-pro-1.1``,
  ``flux-pro-1.1-ultra``, ``flux-dev``, ``flux-kontext-pro``, ``flux-kontext-max``,
  ``flux-pro-1.0-fill``, ``flux-pro-1.0-expand``, ``flux-pro-1.1-ultra-finetuned``,
  ``flux-pro-1.0-fill-finetuned``. Answers ``{id, polling_url, cost, input_mp, output_mp}``, or
  with ``webhook_url`` ``{id, status, webhook_url, cost, input_mp, output_mp}`` (no
  ``polling_url``: the schema differs). ``polling_url`` is
  ``{polling_base_url or the simulator's origin}{polling_path_prefix}/v1/get_result?id=<id>``,
  by default ``<origin>/api.eu1/v1/get_result?id=...``: another path than the submit's, and with
  ``extra["polling_base_url"]`` another host, so a client must poll the URL it was given and
  decide whether that host may see its key.
- ``GET /v1/get_result?id=`` (also under any ``/<region>`` prefix): ``{id, status, result,
  progress, details, preview}``; status ``Pending`` (``progress`` 0-1) -> ``Ready``
  (``result: {sample, prompt, seed}``) | ``Request Moderated`` / ``Content Moderated``
  (``details: {"Moderation Reasons": [...]}``) | ``Error``; an unknown id is ``Task not found``
  inside a 200. ``result.sample`` is a real JPEG/PNG/WebP (``output_format``, 1/16 of the size per
  side) that answers 404 ``output_ttl_seconds`` after ``Ready`` (600 s, the documented 10 minutes,
  unless a SimConfig says otherwise).
- ``GET /v1/credits``: ``{"credits": <remaining>}``.

Errors (FastAPI style): 422 ``{"detail": [{type, loc, msg, input}]}`` for a malformed body or an
invalid field (e.g. width not a multiple of 32 on ``flux-pro-1.1``), 403 ``{"detail": "Not
authenticated"}`` without ``x-key``, 401 for an unknown key, 402 when credits run out, 404
unknown model, 429 when the key already has 24 active (submitted, unfinished) tasks
(``flux-kontext-max``: 6 of its own).

Webhooks: with ``webhook_url`` the finished task is POSTed as ``{id, status, result | details |
error + message, timestamp}``; with ``webhook_secret`` it carries ``X-BFL-Signature:
sha256=<hex HMAC-SHA256(secret, raw body)>``. Non-2xx answers are retried after 1 s, 5 s, 30 s.

Prompt directives: ``[sim:queue=S]``, ``[sim:run=S]``; ``[sim:request_moderated]``,
``[sim:content_moderated]``, ``[sim:fail]`` (``Error``); ``[sim:status=Generating]`` reports
that (unknown) status instead of ``Pending`` while running. ``Stats.creations`` counts tasks at
submit (before any after-effect fault); cost is charged then, moderated or not (UNCONFIRMED).

``SimConfig.extra`` knobs: ``polling_base_url`` (None = the simulator's origin),
``polling_path_prefix`` ("/api.eu1"), ``strict_region`` (False: when True a task is found only
under the prefix its polling_url named), ``webhook_response_polling_url`` (False),
``not_found_status_code`` (200), ``progress_scale`` (1.0; 100 for percent), ``task_ttl_seconds``
(None = finished tasks stay), ``active_task_limit`` (24), ``model_task_limits``
({"flux-kontext-max": 6}), ``retry_after`` (None: no ``Retry-After`` on 429), ``credits`` (1e6),
``webhook_signature`` (True), ``webhook_retry_delays`` ([1, 5, 30]), ``webhook_timeout`` (30.0),
``strict_webhook_urls`` (False: the real API wants HTTPS, a loopback test receiver is not).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import math
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox.base import SimConfig, SimTask, Simulator, StoredFile, directives, route_path
from providers.sandbox.stability import encode, image_size


@dataclass(frozen=True)
class Model:
    family: str  # flux2 | pro | ultra | kontext | fill | expand
    cost: float  # credits (1 credit = $0.01); illustrative
    input_images: int = 0
    max_safety: int = 6
    finetuned: bool = False


MODELS = {
    "flux-2-pro": Model("flux2", 3.0, 8, 5),
    "flux-2-pro-preview": Model("flux2", 3.0, 8, 5),
    "flux-2-max": Model("flux2", 7.0, 8, 5),
    "flux-2-flex": Model("flux2", 6.0, 8, 5),
    "flux-2-klein-4b": Model("flux2", 1.4, 4, 5),
    "flux-2-klein-9b": Model("flux2", 1.5, 4, 5),
    "flux-2-klein-9b-preview": Model("flux2", 1.5, 4, 5),
    "flux-pro-1.1": Model("pro", 4.0),
    "flux-dev": Model("pro", 2.5),
    "flux-pro-1.1-ultra": Model("ultra", 6.0),
    "flux-pro-1.1-ultra-finetuned": Model("ultra", 7.0, finetuned=True),
    "flux-kontext-pro": Model("kontext", 4.0, 1),
    "flux-kontext-max": Model("kontext", 8.0, 1),
    "flux-pro-1.0-fill": Model("fill", 5.0),
    "flux-pro-1.0-fill-finetuned": Model("fill", 6.0, finetuned=True),
    "flux-pro-1.0-expand": Model("expand", 5.0),
}
OUTPUT_FORMATS = ("jpeg", "png", "webp")
MODERATION_REASONS = {"request_moderated": "Derivative Works Filter", "content_moderated": "NSFW"}


class Invalid(Exception):
    """A FastAPI validation error (422) for one field."""

    def __init__(self, field: str, msg: str, kind: str = "value_error", value: Any = None) -> None:
        super().__init__(msg)
        self.item = {"type": kind, "loc": ["body", field], "msg": msg, "input": value}


def _ratio(value: Any, field: str) -> float:
    """An ``a:b`` aspect ratio between 21:9 and 9:21."""
    try:
        a, b = (int(x) for x in str(value).split(":"))
        r = a / b
    except (ValueError, ZeroDivisionError):
        raise Invalid(field, "Aspect ratio must be in the form 'width:height'", value=value) from None
    if not 9 / 21 <= r <= 21 / 9:
        raise Invalid(field, "Aspect ratio must be between 21:9 and 9:21", value=value)
    return r


class BflSimulator(Simulator):
    name = "bfl"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config or SimConfig(output_ttl_seconds=600.0))
        self.tasks: dict[str, SimTask] = {}
        self.credits_used = 0.0
        self.webhooks_sent = 0
        self._active: dict[str, list[tuple[float, str]]] = {}  # per key: (end time, model) of unfinished tasks
        self._webhook_tasks: set[asyncio.Task[None]] = set()
        self.app.add_exception_handler(HTTPException, self._http_exception)

    def _x(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    # -- wire format ---------------------------------------------------------------
    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse({"detail": message}, status_code=status, headers=headers)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self.error_response(exc.status_code, "Not Found" if exc.status_code == 404 else str(exc.detail))

    def _invalid(self, *items: dict[str, Any]) -> Response:
        return JSONResponse({"detail": list(items)}, status_code=422)

    def _auth(self, request: Request) -> tuple[str, Response | None]:
        key = request.headers.get("x-key")
        if not key:
            return "", self.error_response(403, "Not authenticated")
        if not self.config.key_ok(key):
            return key, self.error_response(401, "Invalid API key")
        return key, None

    # -- routes --------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/get_result", self.get_result, methods=["GET"]),
            Route("/{region}/v1/get_result", self.get_result, methods=["GET"]),
            Route("/v1/credits", self.credits, methods=["GET"]),
            Route("/v1/{model}", self.submit, methods=["POST"]),
        ]

    async def submit(self, request: Request) -> Response:
        model_name = request.path_params["model"]
        model = MODELS.get(model_name)
        if model is None:
            return self.error_response(404, "Not Found")
        key, denied = self._auth(request)
        if denied is not None:
            return denied
        if (injected := await self.fault("submit")) is not None:
            return injected
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            return self._invalid({"type": "json_invalid", "loc": ["body", 0], "msg": "JSON decode error",
                                  "input": {}})
        if not isinstance(body, dict):
            return self._invalid({"type": "model_attributes_type", "loc": ["body"],
                                  "msg": "Input should be a valid dictionary or object to extract fields from",
                                  "input": body})
        try:
            size, input_mp = self._validate(model, body)
        except Invalid as err:
            return self._invalid(err.item)
        if (refused := self._admit(key, model_name, model)) is not None:
            return refused

        prompt = body.get("prompt") if isinstance(body.get("prompt"), str) else ""
        d = directives(prompt)
        outcome = next((o for o in ("request_moderated", "content_moderated", "fail") if o in d), "succeed")
        seed = body.get("seed") if isinstance(body.get("seed"), int) else secrets.randbelow(2**31)
        region = str(self._x("polling_path_prefix", "/api.eu1"))
        task = SimTask.create(str(uuid.uuid4()), self.config, prompt, input=body,
                              data={"key": key, "model": model_name, "size": size, "seed": seed,
                                    "region": region, "origin": self.origin(request), "status": d.get("status"),
                                    "format": body.get("output_format") or "jpeg"})
        task.outcome = outcome
        self.tasks[task.id] = task
        self._active[key].append((task.finished_at, model_name))
        self.record_creation(f"{model_name}:{hashlib.sha256(raw).hexdigest()}")  # no idempotency
        self.credits_used += model.cost
        webhook = body.get("webhook_url")
        if isinstance(webhook, str):
            secret = body.get("webhook_secret") if isinstance(body.get("webhook_secret"), str) else None
            t = asyncio.get_running_loop().create_task(self._webhook_when_done(task, webhook, secret))
            self._webhook_tasks.add(t)
            t.add_done_callback(self._webhook_tasks.discard)
        if (injected := await self.fault("submit", after_effect=True)) is not None:
            return injected
        base = self._x("polling_base_url", None) or task.data["origin"]
        polling_url = f"{base.rstrip('/')}{region}/v1/get_result?id={task.id}"
        out: dict[str, Any] = {"id": task.id}
        if isinstance(webhook, str):
            out |= {"status": "Pending", "webhook_url": webhook}
            if self._x("webhook_response_polling_url", False):
                out["polling_url"] = polling_url
        else:
            out["polling_url"] = polling_url
        out |= {"cost": model.cost, "input_mp": input_mp, "output_mp": round(size[0] * size[1] / 1e6, 2)}
        return JSONResponse(out)

    def _admit(self, key: str, model_name: str, model: Model) -> Response | None:
        """402 without credits; 429 over the active-task cap of this key (and of the model, if it has one)."""
        if self.credits_used + model.cost > float(self._x("credits", 1e6)):
            return self.error_response(402, "Insufficient credits. Please add credits to your account.")
        now = time.time()
        active = self._active[key] = [a for a in self._active.get(key, []) if a[0] > now]  # at most the cap
        limit = int(self._x("active_task_limit", 24))
        model_limit = self._x("model_task_limits", {"flux-kontext-max": 6}).get(model_name)
        same_model = sum(1 for _, m in active if m == model_name)
        if len(active) >= limit or (model_limit is not None and same_model >= int(model_limit)):
            cap = limit if len(active) >= limit else int(model_limit)
            retry = self._x("retry_after", None)
            headers = {"Retry-After": str(retry)} if retry is not None else None
            return self.error_response(429, f"You have reached the limit of {cap} active tasks. Wait for a "
                                            "task to finish before submitting another.", headers)
        return None

    # -- validation ----------------------------------------------------------------
    def _validate(self, model: Model, body: dict[str, Any]) -> tuple[tuple[int, int], float]:
        """Check the fields the model's schema documents; returns (output size, input megapixels)."""
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise Invalid("prompt", "Input should be a valid string", "string_type", prompt)
        if model.family in ("flux2", "kontext") and not (prompt or "").strip():
            raise Invalid("prompt", "Field required", "missing")
        fmt = body.get("output_format")
        if fmt is not None and fmt not in OUTPUT_FORMATS:
            raise Invalid("output_format", "Input should be 'jpeg', 'png' or 'webp'", "enum", fmt)
        safety = body.get("safety_tolerance")
        if safety is not None and (not _is_int(safety) or not 0 <= safety <= model.max_safety):
            raise Invalid("safety_tolerance", f"Input should be between 0 and {model.max_safety}",
                          "less_than_equal", safety)
        seed = body.get("seed")
        if seed is not None and not _is_int(seed):
            raise Invalid("seed", "Input should be a valid integer", "int_type", seed)
        self._check_webhook(body)
        if model.finetuned and not isinstance(body.get("finetune_id"), str):
            raise Invalid("finetune_id", "Field required", "missing")

        input_mp = 0.0
        for field in ("input_image", *(f"input_image_{i}" for i in range(2, model.input_images + 1)),
                      "image_prompt", "image", "mask"):
            if body.get(field) is not None:
                input_mp += _input_image(field, body[field])
        if model.family in ("fill", "expand") and body.get("image") is None:
            raise Invalid("image", "Field required", "missing")

        if model.family == "pro":
            w, h = _dimension(body, "width", 1024, 256, 1440, 32), _dimension(body, "height", 768, 256, 1440, 32)
        elif model.family == "flux2":
            w, h = _dimension(body, "width", 0, 64, 4096, 16), _dimension(body, "height", 0, 64, 4096, 16)
            w, h = (w or 1024), (h or 1024)
            if w * h > 4 * 1024 * 1024:
                raise Invalid("width", "width x height must be at most 4 megapixels", value=body.get("width"))
            if body.get("steps") is not None and (not _is_int(body["steps"]) or not 1 <= body["steps"] <= 50):
                raise Invalid("steps", "Input should be between 1 and 50", value=body["steps"])
            guidance = body.get("guidance")
            if guidance is not None and (not isinstance(guidance, int | float) or not 1.5 <= guidance <= 10):
                raise Invalid("guidance", "Input should be between 1.5 and 10", value=guidance)
        elif model.family in ("ultra", "kontext"):
            r = _ratio(body.get("aspect_ratio") or ("16:9" if model.family == "ultra" else "1:1"), "aspect_ratio")
            mp = 4.0 if model.family == "ultra" else 1.0
            w = round(math.sqrt(mp * 1e6 * r) / 32) * 32
            w, h = w, round(w / r / 32) * 32
            strength = body.get("image_prompt_strength")
            if strength is not None and (not isinstance(strength, int | float) or not 0 <= strength <= 1):
                raise Invalid("image_prompt_strength", "Input should be between 0 and 1", value=strength)
        else:
            w, h = 1024, 1024
            for side in ("top", "bottom", "left", "right"):
                if body.get(side) is not None and (not _is_int(body[side]) or not 0 <= body[side] <= 2048):
                    raise Invalid(side, "Input should be between 0 and 2048", value=body[side])
        return (w, h), round(input_mp, 2)

    def _check_webhook(self, body: dict[str, Any]) -> None:
        url = body.get("webhook_url")
        if url is None:
            return
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not 1 <= len(url) <= 2083:
            raise Invalid("webhook_url", "Input should be a valid URL", "url_parsing", url)
        if self._x("strict_webhook_urls", False) and parts.scheme != "https":
            raise Invalid("webhook_url", "URL scheme should be 'https'", "url_scheme", url)
        secret = body.get("webhook_secret")
        if secret is not None and not isinstance(secret, str):
            raise Invalid("webhook_secret", "Input should be a valid string", "string_type", secret)

    # -- polling -------------------------------------------------------------------
    def result(self, task: SimTask) -> dict[str, Any]:
        now = time.time()
        phase = task.phase(now)
        body: dict[str, Any] = {"id": task.id, "status": "Pending", "result": None, "progress": None,
                                "details": None, "preview": None}
        if phase in ("queued", "running"):
            if phase == "running":
                body["progress"] = round(task.progress(now) / 100 * float(self._x("progress_scale", 1.0)), 2)
                body["status"] = task.data["status"] or "Pending"
            return body
        if task.outcome in MODERATION_REASONS:
            status = "Request Moderated" if task.outcome == "request_moderated" else "Content Moderated"
            return body | {"status": status, "details": {"Moderation Reasons": [MODERATION_REASONS[task.outcome]]}}
        if task.outcome == "fail":
            return body | {"status": "Error"}
        return body | {"status": "Ready", "result": {"sample": self._sample(task), "prompt": task.input.get("prompt"),
                                                     "seed": task.data["seed"]}}

    def _sample(self, task: SimTask) -> str:
        """The signed result URL; it lives ``output_ttl_seconds`` from the moment the task was Ready."""
        path: str | None = task.data.get("sample")
        if path is None:
            fmt = task.data["format"]
            w, h = task.data["size"]
            data = encode(fmt, f"bfl:{task.id}", max(1, w // 16), max(1, h // 16))
            ext = "jpg" if fmt == "jpeg" else fmt
            path = task.data["sample"] = f"/delivery/{secrets.token_urlsafe(12)}/sample.{ext}"
            content_type = "image/jpeg" if fmt == "jpeg" else f"image/{fmt}"
            expires = task.finished_at + self.config.output_ttl_seconds
            self.files.files[path] = StoredFile(data, content_type, expires)
        return f"{task.data['origin']}{path}?se={int(task.finished_at + self.config.output_ttl_seconds)}" \
               f"&sig={hashlib.sha256(path.encode()).hexdigest()[:32]}"

    async def get_result(self, request: Request) -> Response:
        _, denied = self._auth(request)
        if denied is not None:
            return denied
        if (injected := await self.fault("get_result")) is not None:
            return injected
        task_id = request.query_params.get("id")
        if task_id is None:
            return self._invalid({"type": "missing", "loc": ["query", "id"], "msg": "Field required", "input": None})
        task = self.tasks.get(task_id)
        region = route_path(request)[: -len("/v1/get_result")]
        ttl = self._x("task_ttl_seconds", None)
        if task is not None and (
            (self._x("strict_region", False) and region != task.data["region"])
            or (ttl is not None and time.time() > task.finished_at + float(ttl))
        ):
            task = None
        if task is None:
            return JSONResponse({"id": task_id, "status": "Task not found", "result": None, "progress": None,
                                 "details": None, "preview": None},
                                status_code=int(self._x("not_found_status_code", 200)))
        return JSONResponse(self.result(task))

    async def credits(self, request: Request) -> Response:
        _, denied = self._auth(request)
        if denied is not None:
            return denied
        return JSONResponse({"credits": round(float(self._x("credits", 1e6)) - self.credits_used, 2)})

    # -- webhooks ------------------------------------------------------------------
    def webhook_body(self, task: SimTask) -> dict[str, Any]:
        state = self.result(task)
        body: dict[str, Any] = {"id": task.id, "status": state["status"]}
        if state["status"] == "Ready":
            body["result"] = state["result"]
        elif state["status"] == "Error":
            body |= {"error": "Internal error", "message": "The generation failed (simulated)."}
        else:
            body["details"] = state["details"]
        return body | {"timestamp": int(time.time())}

    async def _webhook_when_done(self, task: SimTask, url: str, secret: str | None) -> None:
        while task.phase() != "done":
            await asyncio.sleep(max(0.01, min(0.25, task.finished_at - time.time())))
        raw = json.dumps(self.webhook_body(task)).encode()
        headers = {"content-type": "application/json"}
        if secret and self._x("webhook_signature", True):
            headers["X-BFL-Signature"] = "sha256=" + hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
        delays = [float(s) for s in self._x("webhook_retry_delays", [1, 5, 30])]
        async with self.callback_client(float(self._x("webhook_timeout", 30.0))) as client:
            for attempt in range(len(delays) + 1):
                try:
                    resp = await client.post(url, content=raw, headers=headers)
                    self.webhooks_sent += 1
                    if 200 <= resp.status_code < 300:
                        return
                except httpx.HTTPError:
                    pass
                if attempt < len(delays):
                    await asyncio.sleep(delays[attempt])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dimension(body: dict[str, Any], field: str, default: int, lo: int, hi: int, multiple: int) -> int:
    value = body.get(field)
    if value is None or (value == 0 and default == 0):
        return default
    if not _is_int(value) or not lo <= value <= hi:
        raise Invalid(field, f"Input should be between {lo} and {hi}", "less_than_equal", value)
    if value % multiple:
        raise Invalid(field, f"Input should be a multiple of {multiple}", "multiple_of", value)
    return int(value)


def _input_image(field: str, value: Any) -> float:
    """Megapixels of a URL or base64 input image (a URL counts as 1 MP: it is not fetched)."""
    if not isinstance(value, str) or not value:
        raise Invalid(field, "Input should be a valid string", "string_type", value)
    if urlsplit(value).scheme in ("http", "https"):
        return 1.0
    try:
        data = base64.b64decode(value.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError):
        raise Invalid(field, "Input should be an image URL or base64-encoded image", value=value[:64]) from None
    size = image_size(data)
    if size is None:
        raise Invalid(field, "Input should be a JPEG, PNG or WebP image", value=value[:64])
    return size[0] * size[1] / 1e6
