"""Replicate predictions API simulator.

Written from Replicate's documented wire format (shared/providers §1), not
from our adapter:

- ``POST /v1/predictions`` (``version``) and ``POST /v1/models/{owner}/{name}/predictions``
  answer **201** with a prediction; ``GET /v1/predictions/{id}``,
  ``POST /v1/predictions/{id}/cancel``, ``GET /v1/webhooks/default/secret``.
- ``GET /v1/predictions``: newest first, ``extra["list_page_size"]`` (100) a page,
  ``created_after`` (inclusive) / ``created_before`` (exclusive); ``next`` and
  ``previous`` are absolute URLs with an opaque ``cursor`` that keeps the filters
  and a position, so a page does not shift when new predictions arrive.
- ``GET /v1/models/{owner}/{name}``, ``.../versions`` and ``.../versions/{id}`` for
  the models the simulator knows (``MODELS`` plus ``extra["models"]``), each
  version with a Cog ``openapi_schema`` naming its required inputs.
- Statuses ``starting -> processing -> succeeded|failed|canceled``. A user cancel
  reads ``canceled`` whenever it lands; ``aborted`` is only a ``Cancel-After``
  deadline that passed before the prediction started (after the start it is
  ``canceled`` too). tqdm-style progress lines in ``logs``.
- Output files on a delivery path that 404 after ``output_ttl_seconds``, after
  which the prediction shows ``output: null`` and ``data_removed: true``.
- Errors as ``application/problem+json``: ``title``/``detail``/``status`` (401,
  422, 429 with Replicate's throttle text); 404s are the bare
  ``{"detail", "status"}`` observed from the live API. Refused like the real API:
  an unknown model (404 on the model path, also for a known model that is not
  official: it has no version-less endpoint), an unknown version or one that
  belongs to another model (422 "Invalid version or not permitted"), an input
  without a required field or with a field of the wrong JSON type (422 "Input
  validation failed" with ``invalid_fields``).
- ``ratelimit-remaining``/``ratelimit-reset`` on every answer.
- ``Prefer: wait[=n]`` holds the create until done or ``n`` seconds.
- Webhooks: POST the prediction to ``webhook`` on the filtered events, signed
  per Standard Webhooks with the account secret.

Prompt directives: ``[sim:fail]`` fails the prediction, ``[sim:queue=S]`` and
``[sim:run=S]`` set its timings. Output kind follows the model name (``video``
-> MP4, ``music``/``audio``/``sound`` -> MP3, ``speech``/``tts`` -> WAV, else PNG).

``SimConfig.extra`` knobs: ``list_page_size`` (100), ``models`` (more models:
``{"owner/name": {"official": bool, "required": [...], "versions": [...]}}``,
laid over ``MODELS``).

Fault route names: ``create``, ``get``, ``cancel``, ``list``, ``models``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, bearer, new_id

_VERSION_RE = re.compile(r"^(?:([\w.-]+/[\w.-]+):)?([0-9a-f]{64})$")
_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                            "boolean": (bool,)}
NOT_FOUND = "The requested resource could not be found."
BAD_VERSION = "The specified version does not exist (or perhaps you don't have permission to use it?)"


@dataclass(frozen=True)
class ModelSpec:
    """A model the simulator runs: its inputs and versions (newest first)."""

    official: bool
    required: tuple[str, ...]
    versions: tuple[str, ...]
    description: str = ""


def _version_id(model: str, n: int = 1) -> str:
    return hashlib.sha256(f"{model}:v{n}".encode()).hexdigest()


# Real version ids where one is public (stability-ai/sdxl, from Replicate's recorded traffic).
MODELS: dict[str, ModelSpec] = {
    "black-forest-labs/flux-schnell": ModelSpec(True, ("prompt",), (_version_id("black-forest-labs/flux-schnell"),),
                                                "The fastest image generation model"),
    "black-forest-labs/flux-dev": ModelSpec(True, ("prompt",), (_version_id("black-forest-labs/flux-dev"),),
                                            "A 12 billion parameter rectified flow transformer"),
    "stability-ai/sdxl": ModelSpec(False, (), (
        "7762fd07cf82c948538e41f63f77d685e02b063e37e496e96eefd46c929f9bdc",
        "39ed52f2a78e934b3ba6e2a89f5b1c712de7dfea535525255b1aa35c5565e08b",
        "a00d0b7dcbb9c3fbb34ba87d2d5b46c56969c84a628bf778a7fdaec30b1b99c5",
    ), "A text-to-image generative AI model that creates beautiful images"),
    "minimax/video-01": ModelSpec(True, ("prompt",), (_version_id("minimax/video-01"),),
                                  "Generate 6s videos with prompts or images"),
    "meta/musicgen": ModelSpec(True, ("prompt",), (_version_id("meta/musicgen"),),
                               "Generate music from a prompt or melody"),
}


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _cancel_after(value: str) -> float | None:
    """A Go-style duration (``90s``, ``1m``, ``1h30m``) in seconds, or None if it is not one."""
    parts = _DURATION_RE.findall(value.strip())
    if not parts or "".join(n + u for n, u in parts) != value.strip():
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


def output_ext(model: str) -> str:
    name = model.lower()
    if "video" in name:
        return "mp4"
    if any(w in name for w in ("speech", "tts")):
        return "wav"
    if any(w in name for w in ("music", "audio", "sound")):
        return "mp3"
    return "png"


def openapi_schema(model: str, spec: ModelSpec) -> dict[str, Any]:
    """A Cog-style schema: the inputs the simulator validates and the output shape."""
    props: dict[str, Any] = {
        "prompt": {"type": "string", "title": "Prompt", "x-order": 0, "description": "Input prompt"},
        "seed": {"type": "integer", "title": "Seed", "x-order": 1,
                 "description": "Random seed. Leave blank to randomize the seed"},
    }
    uri = {"type": "string", "format": "uri"}
    if output_ext(model) == "png":
        props["num_outputs"] = {"type": "integer", "title": "Num Outputs", "default": 1, "minimum": 1,
                                "maximum": 4, "x-order": 2, "description": "Number of images to output."}
        output: dict[str, Any] = {"type": "array", "items": uri, "title": "Output"}
    else:
        output = {**uri, "title": "Output"}
    inp: dict[str, Any] = {"type": "object", "title": "Input", "properties": props}
    if spec.required:
        inp["required"] = list(spec.required)
    return {"openapi": "3.0.2", "info": {"title": "Cog", "version": "0.1.0"}, "paths": {},
            "components": {"schemas": {"Input": inp, "Output": output}}}


class ReplicateSimulator(Simulator):
    name = "replicate"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.tasks: dict[str, SimTask] = {}
        self.webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
        self._webhook_tasks: set[asyncio.Task[None]] = set()
        self.webhooks_sent: int = 0
        # Which API keys touched each prediction (create, get, cancel): key affinity is testable.
        self.keys_by_task: dict[str, set[str]] = {}
        self._versions_created = time.time() - 86400

    # -- catalogue ---------------------------------------------------------
    def models(self) -> dict[str, ModelSpec]:
        extra = {name: ModelSpec(bool(m.get("official", True)), tuple(m.get("required", ("prompt",))),
                                 tuple(m.get("versions") or (_version_id(name),)), str(m.get("description", "")))
                 for name, m in dict(self.config.extra.get("models") or {}).items()}
        return MODELS | extra

    def find_version(self, version_id: str) -> tuple[str, ModelSpec] | None:
        for name, spec in self.models().items():
            if version_id in spec.versions:
                return name, spec
        return None

    def version_object(self, model: str, spec: ModelSpec, version_id: str) -> dict[str, Any]:
        age = spec.versions.index(version_id)
        return {"id": version_id, "created_at": _iso(self._versions_created - 86400 * age),
                "cog_version": "0.9.4", "openapi_schema": openapi_schema(model, spec)}

    def model_object(self, model: str, spec: ModelSpec) -> dict[str, Any]:
        owner, name = model.split("/", 1)
        return {
            "url": f"https://replicate.com/{model}", "owner": owner, "name": name,
            "description": spec.description, "visibility": "public", "github_url": None, "paper_url": None,
            "license_url": None, "cover_image_url": None, "default_example": None,
            "run_count": sum(1 for t in self.tasks.values() if t.data["model"] == model),
            "latest_version": self.version_object(model, spec, spec.versions[0]),
        }

    # -- wire format -------------------------------------------------------
    def problem(self, status: int, detail: str, title: str | None = None,
                headers: dict[str, str] | None = None, **fields: Any) -> Response:
        body: dict[str, Any] = {"detail": detail, "status": status}
        if title is not None:
            body["title"] = title
        return JSONResponse(body | fields, status_code=status, headers=headers,
                            media_type="application/problem+json")

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        titles = {401: "Unauthenticated", 429: "Request was throttled",
                  500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
                  504: "Gateway Timeout"}
        if status == 404:
            return self.problem(404, NOT_FOUND, headers=headers)
        if status == 429:
            message = "Request was throttled. Your rate limit resets in ~30s."
        return self.problem(status, message, titles.get(status, "Error"), headers)

    def invalid_input(self, problems: list[tuple[str, str, str]]) -> Response:
        """422 "Input validation failed": one ``(type, field, description)`` per problem."""
        detail = "".join(f"- {field}: {desc}\n" for _, field, desc in problems)
        fields = [{"type": kind, "field": field, "description": desc} for kind, field, desc in problems]
        return self.problem(422, detail, "Input validation failed", invalid_fields=fields)

    def prediction(self, task: SimTask, origin: str) -> dict[str, Any]:
        now = time.time()
        phase = task.phase(now)
        status = {"queued": "starting", "running": "processing"}.get(phase, "")
        aborted = phase == "canceled" and _aborted(task)
        if phase == "canceled":
            status = "aborted" if aborted else "canceled"
        elif phase == "done":
            status = "failed" if task.outcome == "fail" else "succeeded"
        removed = phase == "done" and now > task.finished_at + self.config.output_ttl_seconds
        body: dict[str, Any] = {
            "id": task.id,
            "model": task.data["model"],
            "version": task.data["version"],
            "input": None if removed else task.input,
            "logs": "" if removed else self._logs(task, now),
            "error": "CUDA out of memory (simulated)" if status == "failed" else None,
            "status": status,
            "created_at": _iso(task.created_at),
            "urls": {
                "get": f"{origin}/v1/predictions/{task.id}",
                "cancel": f"{origin}/v1/predictions/{task.id}/cancel",
                "web": f"https://replicate.com/p/{task.id}",
            },
        }
        end = task.canceled_at if phase == "canceled" else task.finished_at
        assert end is not None
        started = min(task.started_at, end)
        if phase in ("running", "done") or status == "canceled":
            body["started_at"] = _iso(started)
        if phase in ("done", "canceled"):
            body["completed_at"] = _iso(end)
            body["metrics"] = {"total_time": round(end - task.created_at, 6)}
            if not aborted:
                body["metrics"]["predict_time"] = round(end - started, 6)
        if status == "succeeded":
            body["output"] = None if removed else self._outputs(task, origin)
            body["data_removed"] = removed
        return body

    def _logs(self, task: SimTask, now: float) -> str:
        pct = task.progress(now)
        if task.phase(now) == "queued":
            return ""
        steps = 50
        done = steps * pct // 100
        return f"Using seed: 42\n{pct:3d}%|{'#' * (pct // 10):<10}| {done}/{steps} [00:01<00:01, 16.47it/s]\n"

    def _outputs(self, task: SimTask, origin: str) -> str | list[str]:
        urls = task.data.get("output_paths")
        if urls is None:
            ext = output_ext(task.data["model"])
            n = int(task.input.get("num_outputs") or 1)
            urls = []
            for i in range(max(1, min(n, 4))):
                data, ctype = media.make(ext, f"{task.id}:{i}")
                urls.append(self.files.publish(data, ctype, f"out-{i}.{ext}"))
            task.data["output_paths"] = urls
        full = [origin + u for u in urls]
        # Single-file models return a bare URL string, multi-output models a list.
        return full[0] if ext_single(task) else full

    # -- routes ------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/predictions", self.create_version, methods=["POST"]),
            Route("/v1/predictions", self.list_predictions, methods=["GET"]),
            Route("/v1/models/{owner}/{name}/predictions", self.create_official, methods=["POST"]),
            Route("/v1/models/{owner}/{name}", self.get_model, methods=["GET"]),
            Route("/v1/models/{owner}/{name}/versions", self.list_versions, methods=["GET"]),
            Route("/v1/models/{owner}/{name}/versions/{id}", self.get_version, methods=["GET"]),
            Route("/v1/predictions/{id}", self.get_prediction, methods=["GET"]),
            Route("/v1/predictions/{id}/cancel", self.cancel_prediction, methods=["POST"]),
            Route("/v1/webhooks/default/secret", self.get_secret, methods=["GET"]),
        ]

    def _auth(self, request: Request) -> Response | None:
        if not self.config.key_ok(bearer(request)):
            return self.error_response(401, "You did not pass a valid authentication token")
        return None

    def _ok(self, body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        limit = "599" if status == 201 else "2999"
        hdrs = {"ratelimit-remaining": limit, "ratelimit-reset": "1", **(headers or {})}
        return JSONResponse(body, status_code=status, headers=hdrs)

    async def create_version(self, request: Request) -> Response:
        return await self._create(request, None)

    async def create_official(self, request: Request) -> Response:
        return await self._create(request, f"{request.path_params['owner']}/{request.path_params['name']}")

    def _resolve(self, body: dict[str, Any], path_model: str | None) -> tuple[str, ModelSpec, str] | Response:
        """(model, spec, version as the prediction shows it), or the refusal."""
        if path_model is not None:
            spec = self.models().get(path_model)
            if spec is None or not spec.official:  # only official models run without a version
                return self.error_response(404, NOT_FOUND)
            return path_model, spec, "dp-" + hashlib.sha256(path_model.encode()).hexdigest()[:32]
        version = body.get("version")
        if not isinstance(version, str) or not version:
            return self.invalid_input([("required", "(root)", "version is required")])
        match = _VERSION_RE.match(version)
        found = self.find_version(match.group(2)) if match else None
        if match is None or found is None or match.group(1) not in (None, found[0]):
            return self.problem(422, BAD_VERSION, "Invalid version or not permitted")
        return found[0], found[1], match.group(2)

    def _check_input(self, model: str, spec: ModelSpec, inp: dict[str, Any]) -> Response | None:
        problems = [("required", "input", f"{name} is required") for name in spec.required if name not in inp]
        props = openapi_schema(model, spec)["components"]["schemas"]["Input"]["properties"]
        for name, prop in props.items():
            value = inp.get(name)
            wanted = _JSON_TYPES[prop["type"]]
            if value is not None and (not isinstance(value, wanted) or (bool not in wanted
                                                                       and isinstance(value, bool))):
                problems.append(("invalid_type", f"input.{name}",
                                 f"Invalid type. Expected: {prop['type']}, given: {_json_type(value)}"))
        return self.invalid_input(problems) if problems else None

    async def _create(self, request: Request, path_model: str | None) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("create")) is not None:
            return injected
        try:
            body = json.loads(await request.body())
            assert isinstance(body, dict)
        except (ValueError, AssertionError):
            return self.problem(400, "Request body must be a JSON object", "Bad Request")
        resolved = self._resolve(body, path_model)
        if isinstance(resolved, Response):
            return resolved
        model, spec, version = resolved
        inp = body.get("input")
        if not isinstance(inp, dict):
            return self.invalid_input([("required", "(root)", "input is required")])
        if (refused := self._check_input(model, spec, inp)) is not None:
            return refused
        deadline = None
        if "cancel-after" in request.headers:
            deadline = _cancel_after(request.headers["cancel-after"])
            if deadline is None or deadline <= 0:
                return self.problem(422, "Cancel-After must be a duration such as 30s, 5m or 1h",
                                    "Invalid Cancel-After header")
        prompt = inp.get("prompt") if isinstance(inp.get("prompt"), str) else None
        task = SimTask.create(new_id(), self.config, prompt, input=inp, data={"model": model, "version": version})
        if deadline is not None and task.created_at + deadline < task.finished_at:
            task.canceled_at = task.created_at + deadline
            task.data["canceled_by"] = "deadline"
        self.tasks[task.id] = task
        self.keys_by_task.setdefault(task.id, set()).add(bearer(request) or "")
        self.record_creation(json.dumps(inp, sort_keys=True) + model)
        webhook = body.get("webhook")
        if isinstance(webhook, str):
            events = body.get("webhook_events_filter") or ["start", "output", "logs", "completed"]
            self._schedule_webhooks(task, webhook, list(events), self.origin(request))
        if (injected := await self.fault("create", after_effect=True)) is not None:
            return injected
        headers: dict[str, str] = {"Location": f"{self.origin(request)}/v1/predictions/{task.id}"}
        prefer = request.headers.get("prefer", "")
        if prefer.startswith("wait"):
            wait = 60.0
            if "=" in prefer:
                wait = max(1.0, min(60.0, float(prefer.split("=", 1)[1])))
            deadline_at = time.time() + wait
            while time.time() < deadline_at and task.phase() not in ("done", "canceled"):
                await asyncio.sleep(0.05)
            headers["Preference-Applied"] = prefer
        return self._ok(self.prediction(task, self.origin(request)), 201, headers)

    async def get_prediction(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("get")) is not None:
            return injected
        task = self.tasks.get(request.path_params["id"])
        if task is None:
            return self.error_response(404, NOT_FOUND)
        self.keys_by_task.setdefault(task.id, set()).add(bearer(request) or "")
        return self._ok(self.prediction(task, self.origin(request)))

    async def cancel_prediction(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("cancel")) is not None:
            return injected
        task = self.tasks.get(request.path_params["id"])
        if task is None:
            return self.error_response(404, NOT_FOUND)
        if task.phase() in ("queued", "running"):  # a finished prediction is returned unchanged (a guess)
            task.canceled_at = time.time()
            task.data["canceled_by"] = "user"
        return self._ok(self.prediction(task, self.origin(request)))

    # -- listing -----------------------------------------------------------
    async def list_predictions(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("list")) is not None:
            return injected
        q = request.query_params
        try:
            cursor = _decode_cursor(q["cursor"]) if "cursor" in q else {}
            after = [_parse_time(v) for v in (q.get("created_after"), cursor.get("a")) if v]
            before = [_parse_time(v) for v in (q.get("created_before"), cursor.get("b")) if v]
            pos = (_parse_time(cursor["p"]), cursor["i"]) if cursor else None
        except ValueError:
            return self.problem(400, "Invalid cursor or date-time (use ISO 8601)", "Bad Request")
        rows = sorted(((_created(t), t.id, t) for t in self.tasks.values()
                       if all(_created(t) >= a for a in after) and all(_created(t) < b for b in before)),
                      key=lambda r: (r[0], r[1]), reverse=True)
        size = max(1, int(self.config.extra.get("list_page_size", 100)))
        if pos is None:
            page = rows[:size]
        elif cursor["d"] == "next":  # the rows just older than the position
            page = [r for r in rows if (r[0], r[1]) < pos][:size]
        else:  # "prev": the rows just newer than the position
            page = [r for r in rows if (r[0], r[1]) > pos][-size:]
        origin = self.origin(request)
        filters = {k: v for k, v in (("a", q.get("created_after") or cursor.get("a")),
                                     ("b", q.get("created_before") or cursor.get("b"))) if v}

        def link(direction: str, row: tuple[datetime, str, SimTask]) -> str:
            token = _encode_cursor(filters | {"d": direction, "p": row[0].isoformat(), "i": row[1]})
            return f"{origin}/v1/predictions?cursor={token}"

        nxt = link("next", page[-1]) if page and (page[-1][0], page[-1][1]) > (rows[-1][0], rows[-1][1]) else None
        prev = link("prev", page[0]) if page and (page[0][0], page[0][1]) < (rows[0][0], rows[0][1]) else None
        results = [self.prediction(t, origin) | {"source": "api"} for _, _, t in page]
        return self._ok({"previous": prev, "next": nxt, "results": results})

    # -- models ------------------------------------------------------------
    def _model(self, request: Request) -> tuple[str, ModelSpec] | None:
        model = f"{request.path_params['owner']}/{request.path_params['name']}"
        spec = self.models().get(model)
        return (model, spec) if spec is not None else None

    async def get_model(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("models")) is not None:
            return injected
        if (found := self._model(request)) is None:
            return self.error_response(404, NOT_FOUND)
        return self._ok(self.model_object(*found))

    async def list_versions(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("models")) is not None:
            return injected
        if (found := self._model(request)) is None:
            return self.error_response(404, NOT_FOUND)
        model, spec = found
        versions = [self.version_object(model, spec, v) for v in spec.versions]
        return self._ok({"next": None, "previous": None, "results": versions})

    async def get_version(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("models")) is not None:
            return injected
        found = self._model(request)
        if found is None or request.path_params["id"] not in found[1].versions:
            return self.error_response(404, NOT_FOUND)
        return self._ok(self.version_object(found[0], found[1], request.path_params["id"]))

    async def get_secret(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        return self._ok({"key": self.webhook_secret})

    # -- webhooks ----------------------------------------------------------
    def _schedule_webhooks(self, task: SimTask, url: str, events: list[str], origin: str) -> None:
        coro = self._send_webhooks(task, url, events, origin)
        t = asyncio.get_running_loop().create_task(coro)
        self._webhook_tasks.add(t)
        t.add_done_callback(self._webhook_tasks.discard)

    def sign(self, msg_id: str, timestamp: int, body: bytes) -> str:
        key = base64.b64decode(self.webhook_secret.split("_", 1)[1])
        mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
        return "v1," + base64.b64encode(mac).decode()

    async def _send_webhooks(self, task: SimTask, url: str, events: list[str], origin: str) -> None:
        sent_start = False
        async with self.callback_client(10) as client:
            while True:
                phase = task.phase()
                if not sent_start and phase != "queued" and not _aborted(task) and "start" in events:
                    sent_start = True
                    await self._post_webhook(client, url, task, origin)
                if phase in ("done", "canceled"):
                    if "completed" in events:
                        await self._post_webhook(client, url, task, origin)
                    return
                # Sleep until the next phase boundary (a cancel is noticed within a second).
                boundary = task.started_at if phase == "queued" else task.finished_at
                await asyncio.sleep(min(1.0, max(0.01, boundary - time.time())))

    async def _post_webhook(self, client: httpx.AsyncClient, url: str, task: SimTask, origin: str) -> None:
        body = json.dumps(self.prediction(task, origin)).encode()
        msg_id = "msg_" + new_id(length=24)
        for attempt in range(3):  # a few retries on network problems, same webhook-id
            ts = int(time.time())
            headers = {"content-type": "application/json", "webhook-id": msg_id,
                       "webhook-timestamp": str(ts), "webhook-signature": self.sign(msg_id, ts, body)}
            try:
                resp = await client.post(url, content=body, headers=headers)
                self.webhooks_sent += 1
                if resp.status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2 * (attempt + 1))


def _aborted(task: SimTask) -> bool:
    """Stopped by its ``Cancel-After`` deadline before it started (a user cancel is never ``aborted``)."""
    return (task.data.get("canceled_by") == "deadline" and task.canceled_at is not None
            and task.canceled_at < task.started_at)


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
                       (list, "array"), (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null"


def _created(task: SimTask) -> datetime:
    """The creation time at the microsecond precision the API shows (so filters match ``created_at``)."""
    return datetime.fromtimestamp(task.created_at, UTC)


def _encode_cursor(state: dict[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(state, separators=(",", ":")).encode()).decode().rstrip("=")


def _decode_cursor(token: str) -> dict[str, str]:
    try:
        state = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (ValueError, TypeError) as exc:
        raise ValueError("bad cursor") from exc
    if not isinstance(state, dict) or state.get("d") not in ("next", "prev") or not all(
            isinstance(state.get(k), str) for k in ("p", "i")):
        raise ValueError("bad cursor")
    return {k: str(v) for k, v in state.items()}


def ext_single(task: SimTask) -> bool:
    """Video and audio models answer one URL string; image models a list."""
    return output_ext(task.data["model"]) != "png"
