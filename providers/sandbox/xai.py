"""xAI Grok Imagine video simulator.

Written from the documented wire format (shared/providers/video-wave2.md §5: the xai-sdk proto,
Vercel's and LiteLLM's REST clients, third-party copies of xAI's REST pages), not from our
adapter. The reference shows no image route, so only video is served.

Routes (the simulator's origin stands for ``https://api.x.ai``; ``Authorization: Bearer <key>``):

- ``POST /v1/videos/generations`` (text-to-video; ``image: {url}`` start frame;
  ``reference_images: [{url}]``), ``POST /v1/videos/edits`` and ``POST /v1/videos/extensions``
  (both need ``video: {url}``): answer only ``{"request_id": "<uuid>"}``.
- ``GET /v1/videos/{request_id}``: ``{"status": "pending"}`` while working (no separate queued and
  running states), then ``{"status": "done", "video": {url, duration, respect_moderation: true},
  "model", "usage": {"cost_in_usd_ticks"}, "progress": 100}``, or, with HTTP 200, ``failed`` with
  ``error: {code: "internal_error", message}``, ``done`` with ``respect_moderation: false`` and
  **no URL** (moderated), or ``expired``.
- ``GET /xai-vidgen-bucket/xai-video-<uuid>.mp4``: the video (a real H.264 MP4, distinct per
  request), minted when first shown; 404 after ``output_ttl_seconds`` (24 h per the SDK).

Errors (``extra["error_style"]``; the reference has a CONFLICT on the body): ``"xai"`` (default)
``{"code": "<gRPC status text>", "error": "<message>"}``, or ``"openai"``
``{"error": {"message", "type", "param", "code"}}``. A missing or unknown key is **400** (an xAI
quirk, ``extra["bad_key_status"]``); a body that does not deserialise (no ``prompt``, ``image`` as a
string, edits without ``video``) is 422; bad values are 400; an unknown model or request id is 404
(UNCONFIRMED); 429 when ``extra["max_pending"]`` requests are already pending or on injected faults.
The gRPC status texts in ``code`` are inferred from xAI's ``"Client specified an invalid
argument"``.

No callbacks, no cancel, no list: a lost create response cannot be recovered.

Prompt directives: ``[sim:queue=S]``/``[sim:run=S]`` (together the pending time); ``[sim:fail]``
``failed``; ``[sim:moderated]`` ``done`` without a URL; ``[sim:expired]`` ``expired`` when done.

``SimConfig.extra`` knobs: ``error_style`` ("xai"), ``bad_key_status`` (400), ``default_duration``
(8 per the SDK docstring; LiteLLM uses 6: CONFLICT), ``allow_1080p`` (False), ``flat_image_url``
(False: a top-level ``image_url`` string is ignored like any unknown field; True: used as the start
image, as some gateways do), ``pending_shape`` ("status": ``{"status": "pending"}``; "progress": adds
``progress``; "request_id": only ``{"request_id"}``, as some gateways answer), ``result_ttl_seconds``
(None = never; after it a finished request shows ``expired``), ``max_pending`` (None = unlimited).
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, StoredFile, bearer, route_path

MODELS = ("grok-imagine-video", "grok-imagine-video-1.5", "grok-imagine-video-1.5-preview")
ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3")
ENDPOINTS = ("generations", "edits", "extensions")
# Cost per second in ticks (assumed 1e-10 USD: 5e8 ticks = $0.05; the unit is UNCONFIRMED).
TICKS_PER_SECOND = {"480p": 500_000_000, "720p": 800_000_000, "1080p": 1_200_000_000}
GRPC_TEXT = {
    400: "Client specified an invalid argument",
    401: "The request does not have valid authentication credentials",
    403: "The caller does not have permission to execute the specified operation",
    404: "Some requested entity was not found",
    422: "Client specified an invalid argument",
    429: "Some resource has been exhausted",
    500: "Internal error",
    502: "The service is currently unavailable",
    503: "The service is currently unavailable",
    504: "The deadline expired before the operation could complete",
}


class XaiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _deserialize(detail: str) -> XaiError:
    return XaiError(422, f"Failed to deserialize the JSON body into the target type: {detail}")


class XaiSimulator(Simulator):
    name = "xai"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.tasks: dict[str, SimTask] = {}

    def _x(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    # -- wire format -------------------------------------------------------
    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        if status == 429:
            message = "Too many requests: your team has exceeded its rate limit for this model."
        code = GRPC_TEXT.get(status, "Unknown error")
        if self._x("error_style", "xai") == "openai":
            kind = "invalid_request_error" if status < 500 else "server_error"
            return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                                status_code=status, headers=headers)
        return JSONResponse({"code": code, "error": message}, status_code=status, headers=headers)

    def status_of(self, task: SimTask, now: float) -> str:
        if task.phase(now) != "done":
            return "pending"
        ttl = self._x("result_ttl_seconds", None)
        if task.outcome == "expired" or (ttl is not None and now > task.finished_at + float(ttl)):
            return "expired"
        return "failed" if task.outcome == "fail" else "done"

    def video_object(self, task: SimTask, origin: str, now: float) -> dict[str, Any]:
        status = self.status_of(task, now)
        if status == "pending":
            shape = self._x("pending_shape", "status")
            if shape == "request_id":
                return {"request_id": task.id}
            body: dict[str, Any] = {"status": "pending"}
            if shape == "progress":
                body["progress"] = task.progress(now)
            return body
        if status == "expired":
            return {"status": "expired"}
        if status == "failed":
            return {"status": "failed", "video": {"duration": 0, "respect_moderation": True}, "model": "",
                    "error": {"code": "internal_error", "message": "Video generation failed"}}
        model, duration = task.input["model"], task.input["duration"]
        video: dict[str, Any] = {"duration": duration, "respect_moderation": task.outcome != "moderated"}
        if task.outcome != "moderated":
            video = {"url": origin + self._mint(task, now)} | video
        ticks = TICKS_PER_SECOND[task.input["resolution"]] * duration
        return {"status": "done", "video": video, "model": model, "usage": {"cost_in_usd_ticks": ticks},
                "progress": 100}

    def _mint(self, task: SimTask, now: float) -> str:
        path: str | None = task.data.get("path")
        if path is None:
            path = f"/xai-vidgen-bucket/xai-video-{uuid.uuid4()}.mp4"
            expires = max(now, task.finished_at) + self.config.output_ttl_seconds
            self.files.files[path] = StoredFile(media.mp4(f"xai:{task.id}"), "video/mp4", expires)
            task.data["path"] = path
        return path

    async def download(self, request: Request) -> Response:
        if (injected := await self.fault("download")) is not None:
            return injected
        stored = self.files.get(route_path(request))
        if stored is None:
            return self.expired_file_response()
        return Response(stored.data, media_type=stored.content_type)

    # -- routes ------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            *(Route(f"/v1/videos/{e}", self._create_handler(e), methods=["POST"]) for e in ENDPOINTS),
            Route("/v1/videos/{request_id}", self.get_video, methods=["GET"]),
            Route("/xai-vidgen-bucket/{name}", self.download, methods=["GET"]),
        ]

    def _auth(self, request: Request) -> Response | None:
        key = bearer(request)
        if self.config.key_ok(key):
            return None
        if key is None:
            message = "No API key provided. Pass it as 'Authorization: Bearer <key>'."
        else:
            message = f"Incorrect API key provided: {key[:2]}***{key[-2:]}. You can obtain an API key from " \
                      "https://console.x.ai."
        return self.error_response(int(self._x("bad_key_status", 400)), message)

    def _create_handler(self, endpoint: str) -> Any:
        async def create(request: Request) -> Response:
            return await self.create(request, endpoint)
        return create

    async def create(self, request: Request, endpoint: str) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("create")) is not None:
            return injected
        try:
            body = json.loads(await request.body())
        except ValueError:
            return self.error_response(400, "The request body is not valid JSON.")
        if not isinstance(body, dict):
            return self.error_response(422, "Failed to deserialize the JSON body into the target type: "
                                            "invalid type, expected a struct")
        try:
            inp = self.validate(endpoint, body)
        except XaiError as err:
            return self.error_response(err.status, err.message)
        limit = self._x("max_pending", None)
        now = time.time()
        if limit is not None and sum(t.phase(now) != "done" for t in self.tasks.values()) >= int(limit):
            return self.error_response(429, "rate limited")
        task = SimTask.create(str(uuid.uuid4()), self.config, inp["prompt"], input=inp,
                              data={"endpoint": endpoint})
        self.tasks[task.id] = task
        digest = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
        self.record_creation(f"{endpoint}:{digest}")  # no idempotency: a retried POST is billed again
        if (injected := await self.fault("create", after_effect=True)) is not None:
            return injected
        return JSONResponse({"request_id": task.id})

    def validate(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """Check a create body as the REST API does; returns the normalised input."""
        prompt = body.get("prompt")
        if prompt is None:
            raise _deserialize("missing field `prompt`")
        if not isinstance(prompt, str):
            raise _deserialize("invalid type for `prompt`, expected a string")
        if not prompt.strip():
            raise XaiError(400, "prompt must not be empty")
        model = body.get("model", MODELS[0])
        if model not in MODELS:
            raise XaiError(404, f"The model {model} does not exist or your team does not have access to it.")
        image = body.get("image")
        if image is None and self._x("flat_image_url", False) and isinstance(body.get("image_url"), str):
            image = {"url": body["image_url"]}
        for name, value in (("image", image), ("video", body.get("video"))):
            if value is not None and not (isinstance(value, dict) and isinstance(value.get("url"), str)):
                raise _deserialize(f"invalid type for `{name}`, expected struct {{url}}")
            if value is not None and not value["url"].startswith(("https://", "http://", "data:")):
                raise XaiError(400, f"{name}.url must be an https URL or a data URI")
        if endpoint != "generations" and body.get("video") is None:
            raise _deserialize("missing field `video`")
        refs = body.get("reference_images")
        if refs is not None and not (isinstance(refs, list)
                                     and all(isinstance(r, dict) and isinstance(r.get("url"), str) for r in refs)):
            raise _deserialize("invalid type for `reference_images`, expected a sequence of {url}")
        duration = body.get("duration", int(self._x("default_duration", 8)))
        if isinstance(duration, bool) or not isinstance(duration, int) or not 1 <= duration <= 15:
            raise XaiError(400, f"Invalid duration {json.dumps(duration)}: must be an integer from 1 to 15 seconds")
        ratio = body.get("aspect_ratio", "16:9")
        if ratio not in ASPECT_RATIOS:
            raise XaiError(400, f"Invalid aspect_ratio {json.dumps(ratio)}: expected one of {', '.join(ASPECT_RATIOS)}")
        resolution = body.get("resolution", "480p")
        allowed = ("480p", "720p", "1080p") if self._x("allow_1080p", False) else ("480p", "720p")
        if resolution not in allowed:
            raise XaiError(400, f"Invalid resolution {json.dumps(resolution)}: expected one of {', '.join(allowed)}")
        return {"model": model, "prompt": prompt, "duration": duration, "aspect_ratio": ratio,
                "resolution": resolution, "image": image}

    async def get_video(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("get")) is not None:
            return injected
        task = self.tasks.get(request.path_params["request_id"])
        if task is None:
            return self.error_response(404, f"Video request {request.path_params['request_id']} not found.")
        return JSONResponse(self.video_object(task, self.origin(request), time.time()))
