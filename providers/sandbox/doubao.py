"""Volcengine Ark simulator: Seedance video tasks and synchronous Seedream images.

Written from Ark's documented wire format (shared/providers/video-wave2.md §3 and
images-wave2.md §5), not from an adapter. All routes need ``Authorization: Bearer <ARK_API_KEY>``.

Video (``seedance`` models):

- ``POST /api/v3/contents/generations/tasks`` -> ``{"id": "cgt-<yyyymmddhhmmss>-<xxxxx>"}``.
  ``content[]``: one ``text`` item whose text may end in ``--ratio/--rt``, ``--duration/--dur``,
  ``--frames`` (25+4n, instead of a duration), ``--resolution/--rs``, ``--framespersecond/--fps``
  (24), ``--seed`` (-1 random), ``--camerafixed/--cf`` and ``--watermark/--wm`` flags; and
  ``image_url`` items (``{"image_url": {"url"}, "role"}``): one image without a role or with
  ``first_frame``; ``first_frame`` + ``last_frame`` (both roles required); or 1-4
  ``reference_image`` (lite-i2v and 2.x only, never mixed with frames). 2.x models also take
  ``video_url``/``audio_url`` items (``reference_video``/``reference_audio``). Models from 1.5 on
  take the parameters as top-level fields too (``resolution``, ``ratio``, ``duration``,
  ``frames``, ``seed``, ``camera_fixed``, ``watermark``, ``generate_audio``, ``draft``); 1.0
  models only as flags. Also ``callback_url``, ``return_last_frame``, ``service_tier``
  (default | flex) and ``execution_expires_after``.
- ``GET .../tasks/{id}``: ``queued -> running -> succeeded | failed``; ``cancelled`` after a
  DELETE while queued; ``expired`` for a flex task still queued after
  ``execution_expires_after``. Unix-second ``created_at``/``updated_at``; succeeded tasks carry
  ``content.video_url`` (and ``last_frame_url``), TOS-signed URLs that answer 403 XML once
  ``output_ttl_seconds`` (24 h by default) after generation have passed or when altered, and
  ``usage`` (tokens). The task stays queryable for 7 days, its URL dies after 24 h.
- ``GET .../tasks?page_num=&page_size=&filter.status=&filter.task_ids=&filter.model=``:
  ``{"total", "items"}``, newest first; ``filter.task_ids`` may repeat.
- ``DELETE .../tasks/{id}``: cancels a queued task; a running one is refused (400); a finished
  one is deleted (GET then 404). Answers ``{}``.
- Callbacks: the GET body, unsigned, POSTed to ``callback_url`` on each status change (queued,
  running, succeeded/failed/expired); retried up to 3 times when there is no 2xx within 5 s.

Images (``seedream``/``seededit`` models): ``POST /api/v3/images/generations`` answers
synchronously (after ``[sim:run=S]`` or ``run_seconds``) with ``{"model", "created", "data",
"usage"}``; ``data[]`` items are ``{"url"|"b64_json", "size"}`` or, for a failed member of a
group, ``{"error": {"code", "message"}}`` inside the 200. ``sequential_image_generation: "auto"``
returns up to ``max_images`` (default ``extra["group_images"]``, 4). A request is counted as a
billed generation (``Stats.record_creation``) as soon as at least one image is made, before any
after-effect fault; ``billed_images`` counts the images.

Errors: ``{"error": {"code", "message" (ending in "Request id: ..."), "param", "type"}}``: 400
``MissingParameter``/``InvalidParameter`` (flags and fields included), 400
``InputTextSensitiveContentDetected``/``InputImageSensitiveContentDetected``, 401
``AuthenticationError``, 403 ``AccountOverdueError``, 404 ``InvalidEndpointOrModel.NotFound`` /
``ModelNotOpen``, 429 ``RateLimitExceeded.EndpointRPMExceeded`` / ``QuotaExceeded`` /
``ServerOverloaded``, 500 ``InternalServiceError``. Model ids follow the region: ``doubao-...`` on
the China host, without the prefix (``dreamina-`` for 2.0 video) on BytePlus.

Prompt directives (in the text item or ``prompt``): ``[sim:queue=S]``, ``[sim:run=S]``;
``[sim:sensitive]`` / ``[sim:image_sensitive]`` -> 400 input moderation at create;
``[sim:output_sensitive]`` -> video task failed with ``extra["output_moderation_code"]``, image
request 400 ``OutputImageSensitiveContentDetected``; ``[sim:fail]`` / ``[sim:fail=Code]`` -> task
failed with ``InternalServiceError`` / Code (an image request: 500); ``[sim:partial]`` /
``[sim:partial=0,2]`` -> those group members (default the last) fail inside the 200;
``[sim:images=N]`` -> group size; ``[sim:quota]`` / ``[sim:overloaded]`` -> 429 with those codes.

``SimConfig.extra`` knobs: ``region`` ("cn" | "byteplus"), ``endpoints`` ({"ep-...": model id}),
``not_open_models`` ([]), ``account_overdue`` (False), ``rpm`` (None; creates per minute per
model), ``fault_429_code`` ("RateLimitExceeded.EndpointRPMExceeded"), ``param_conflict``
("body_wins" | "flags_wins" | "error": a parameter given both as flag and field, UNCONFIRMED),
``legacy_body_params`` ("reject" | "ignore": top-level parameters sent to a 1.0 model),
``durations`` ({model id: [...]}; 1.0: 5/10, later 4-12, UNCONFIRMED), ``output_moderation_code``
("OutputVideoSensitiveContentDetected", UNCONFIRMED), ``cancel_running_code``
("InvalidAction.TaskRunning", UNCONFIRMED), ``list_order`` ("newest", UNCONFIRMED),
``max_page_size`` (500, UNCONFIRMED), ``retention_seconds`` (7 days),
``cancelled_retention_seconds`` (24 h), ``callback_on_cancel`` (False, UNCONFIRMED),
``callback_retries`` (3), ``callback_timeout`` (5.0), ``callback_retry_delay`` (0.2),
``group_images`` (4), ``image_timestamp_field`` ("created"; the SDK type says "created_at":
CONFLICT).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import re
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, StoredFile, bearer, directives, route_path

TASKS = "/api/v3/contents/generations/tasks"
RATIOS = ("16:9", "4:3", "1:1", "3:4", "9:16", "21:9", "adaptive")
RESOLUTIONS = ("480p", "720p", "1080p")
TERMINAL = ("succeeded", "failed", "cancelled", "expired")
FLAG_NAMES = {"ratio": "ratio", "rt": "ratio", "duration": "duration", "dur": "duration", "frames": "frames",
              "resolution": "resolution", "rs": "resolution", "framespersecond": "framespersecond",
              "fps": "framespersecond", "seed": "seed", "camerafixed": "camera_fixed", "cf": "camera_fixed",
              "watermark": "watermark", "wm": "watermark"}
BODY_PARAMS = ("resolution", "ratio", "duration", "frames", "seed", "camera_fixed", "watermark", "generate_audio",
               "draft")
FLAG = re.compile(r"--([a-z]+)\s+(\S+)")
ERROR_TYPES = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound", 429: "TooManyRequests",
               500: "InternalServerError", 502: "BadGateway", 503: "ServiceUnavailable", 504: "GatewayTimeout"}
SENSITIVE = {
    "InputTextSensitiveContentDetected": "The request failed because the input text may contain sensitive "
                                         "information.",
    "InputImageSensitiveContentDetected": "The request failed because the input image may contain sensitive "
                                          "information.",
    "OutputVideoSensitiveContentDetected": "The request failed because the output video may contain sensitive "
                                           "information.",
    "OutputImageSensitiveContentDetected": "The request failed because the output image may contain sensitive "
                                           "information.",
}


@dataclass(frozen=True)
class VideoModel:
    """What a Seedance model takes: text only or images (first/last frames; reference images),
    parameters as top-level fields, durations."""

    text_only: bool
    reference: bool
    body_params: bool
    durations: tuple[int, ...]
    default_resolution: str = "1080p"
    needs_image: bool = False
    media_refs: bool = False
    audio: bool = False


_V10 = (5, 10)
_LATER = tuple(range(4, 13))
VIDEO_STEMS = {
    "seedance-1-0-pro-250528": VideoModel(False, False, False, _V10),
    "seedance-1-0-pro-fast-251015": VideoModel(False, False, False, _V10),
    "seedance-1-0-lite-t2v-250428": VideoModel(True, False, False, _V10, "720p"),
    "seedance-1-0-lite-i2v-250428": VideoModel(False, True, False, _V10, "720p", needs_image=True),
    "seedance-1-5-pro-251215": VideoModel(False, False, True, _LATER, audio=True),
    "seedance-2-0-260128": VideoModel(False, True, True, _LATER, media_refs=True, audio=True),
    "seedance-2-0-fast-260128": VideoModel(False, True, True, _LATER, "720p", media_refs=True, audio=True),
}


@dataclass(frozen=True)
class ImageModel:
    """What a Seedream/SeedEdit model takes: reference images, size labels, group output.

    ``output_format`` is accepted and, like 4.x does, not acted on: every output is a PNG here.
    """

    max_refs: int
    labels: tuple[str, ...]
    default_size: str
    group: bool
    min_refs: int = 0
    china_only: bool = False


IMAGE_STEMS = {
    "seedream-3-0-t2i-250415": ImageModel(0, (), "1024x1024", False),
    "seededit-3-0-i2i-250628": ImageModel(1, ("adaptive",), "adaptive", False, min_refs=1),
    "seedream-4-0-250828": ImageModel(14, ("1K", "2K", "4K"), "2048x2048", True),
    "seedream-4-5-251128": ImageModel(14, ("2K", "4K"), "2048x2048", True),
    "seedream-5-0-260128": ImageModel(14, ("2K", "4K"), "2048x2048", True),
    "seedream-5-0-lite-260128": ImageModel(14, ("2K", "4K"), "2048x2048", True, china_only=True),
    "seedream-5-0-pro-260628": ImageModel(14, ("2K", "4K"), "2048x2048", True, china_only=True),
}
LABEL_SIZES = {"1K": (1024, 1024), "2K": (2048, 2048), "4K": (4096, 4096)}


class ArkError(Exception):
    def __init__(self, status: int, code: str, message: str, param: str = "") -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def _invalid(param: str, why: str) -> ArkError:
    return ArkError(400, "InvalidParameter",
                    f"The parameter `{param}` specified in the request is not valid: {why}.", param)


def _missing(param: str) -> ArkError:
    return ArkError(400, "MissingParameter", f"The request failed because it is missing one or multiple required "
                                             f"parameters: `{param}`.", param)


def _dimensions(resolution: str, ratio: str) -> tuple[int, int]:
    short = {"480p": 480, "720p": 720, "1080p": 1080}[resolution]
    a, b = (16, 9) if ratio == "adaptive" else (int(x) for x in ratio.split(":"))
    long = int(round(short * max(a, b) / min(a, b) / 16) * 16)
    return (long, short) if a >= b else (short, long)


def _http_or_data_url(value: Any, kinds: str = "image") -> bool:
    if not isinstance(value, str):
        return False
    if value.startswith(f"data:{kinds}/") and ";base64," in value:
        return True
    parts = urlsplit(value)
    return (parts.scheme in ("http", "https") and bool(parts.hostname)) or value.startswith("asset://")


class DoubaoSimulator(Simulator):
    name = "doubao"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config or SimConfig(output_ttl_seconds=86400.0))
        self.tasks: dict[str, SimTask] = {}
        self.billed_images = 0
        self.callback_log: list[dict[str, Any]] = []
        self._creates: dict[str, deque[float]] = {}
        self._tos_secret = secrets.token_bytes(32)
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self.app.add_exception_handler(HTTPException, self._http_exception)

    def _x(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    # -- wire format ---------------------------------------------------------
    def ark_error(self, err: ArkError, headers: dict[str, str] | None = None) -> Response:
        request_id = _request_id()
        body = {"error": {"code": err.code, "message": f"{err.message} Request id: {request_id}",
                          "param": err.param, "type": ERROR_TYPES.get(err.status, "Error")}}
        return JSONResponse(body, status_code=err.status, headers={"X-Request-Id": request_id, **(headers or {})})

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        code = {429: str(self._x("fault_429_code", "RateLimitExceeded.EndpointRPMExceeded")),
                500: "InternalServiceError"}.get(status, "ServiceUnavailable")
        text = {429: "The request has exceeded the rate limit. Please try again later.",
                500: "The service encountered an unexpected internal error."}.get(status, message)
        return self.ark_error(ArkError(status, code, text), headers)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return self.ark_error(ArkError(405, "MethodNotAllowed", "The method is not allowed for this path."))
        return self.ark_error(ArkError(exc.status_code, "NotFound", "The requested resource is not found."))

    def status(self, task: SimTask, now: float | None = None) -> str:
        now = time.time() if now is None else now
        phase = task.phase(now)
        expires_after = task.data["expires_after"]
        if phase == "canceled":
            return "cancelled"
        if expires_after is not None and task.queue_seconds > expires_after and now >= task.created_at + expires_after:
            return "expired"
        if phase == "queued":
            return "queued"
        if phase == "running":
            return "running"
        return "failed" if task.outcome == "fail" else "succeeded"

    def _updated_at(self, task: SimTask, status: str) -> float:
        if status == "cancelled" and task.canceled_at is not None:
            return task.canceled_at
        if status == "expired":
            return task.created_at + float(task.data["expires_after"])
        return {"queued": task.created_at, "running": task.started_at}.get(status, task.finished_at)

    def task_object(self, task: SimTask, origin: str, now: float | None = None) -> dict[str, Any]:
        """The task as GET, list items and callbacks show it."""
        status = self.status(task, now)
        params = task.data["params"]
        body: dict[str, Any] = {"id": task.id, "model": task.data["model"], "status": status, "error": None,
                                "created_at": int(task.created_at), "updated_at": int(self._updated_at(task, status))}
        if status == "failed":
            body["error"] = task.data["error"]
        if status == "succeeded":
            body["content"] = self._content(task, origin)
            w, h = _dimensions(params["resolution"], params["ratio"])
            tokens = int(w * h * params["framespersecond"] * params["seconds"] // 1024)
            body["usage"] = {"completion_tokens": tokens, "total_tokens": tokens}
        body |= {"seed": params["seed"], "resolution": params["resolution"], "ratio": params["ratio"]}
        body |= {"frames": params["frames"]} if params.get("frames") else {"duration": params["duration"]}
        body |= {"framespersecond": params["framespersecond"], "service_tier": task.data["service_tier"]}
        if task.data["expires_after"] is not None:
            body["execution_expires_after"] = task.data["expires_after"]
        if "generate_audio" in params:
            body["generate_audio"] = params["generate_audio"]
        return body

    def _content(self, task: SimTask, origin: str) -> dict[str, str]:
        paths: dict[str, str] | None = task.data.get("paths")
        if paths is None:
            stem = f"/ark-content-generation-cn-beijing/{task.data['model']}/{uuid.uuid4().hex}"
            paths = {"video_url": self._publish(stem + ".mp4", media.mp4(f"ark:{task.id}"), "video/mp4",
                                                task.finished_at)}
            if task.data["return_last_frame"]:
                paths["last_frame_url"] = self._publish(stem + "_last_frame.png", media.png(f"ark:last:{task.id}"),
                                                        "image/png", task.finished_at)
            task.data["paths"] = paths
        return {name: origin + path for name, path in paths.items()}

    # -- TOS-signed, expiring output URLs --------------------------------------
    def _publish(self, path: str, data: bytes, content_type: str, made_at: float) -> str:
        """Store a file and return its signed path + query (valid ``output_ttl_seconds`` from ``made_at``)."""
        ttl = self.config.output_ttl_seconds
        self.files.files[path] = StoredFile(data, content_type, made_at + ttl)
        date = datetime.fromtimestamp(made_at, UTC).strftime("%Y%m%dT%H%M%SZ")
        expires = max(1, math.ceil(ttl))
        query = {"X-Tos-Algorithm": "TOS4-HMAC-SHA256",
                 "X-Tos-Credential": f"AKLTSIMULATED/{date[:8]}/cn-beijing/tos/request",
                 "X-Tos-Date": date, "X-Tos-Expires": expires,
                 "X-Tos-Signature": self._sign(path, date, expires), "X-Tos-SignedHeaders": "host"}
        return f"{path}?{urlencode(query)}"

    def _sign(self, path: str, date: str, expires: int | str) -> str:
        return hmac.new(self._tos_secret, f"{path}\n{date}\n{expires}".encode(), hashlib.sha256).hexdigest()

    async def download(self, request: Request) -> Response:
        if (injected := await self.fault("download")) is not None:
            return injected
        path, q = route_path(request), request.query_params
        expected = self._sign(path, q.get("X-Tos-Date", ""), q.get("X-Tos-Expires", ""))
        stored = self.files.get(path)
        if not hmac.compare_digest(expected, q.get("X-Tos-Signature", "")):
            return _tos_error("SignatureDoesNotMatch", "The request signature we calculated does not match the "
                                                       "signature you provided.")
        if stored is None:
            return _tos_error("AccessDenied", "Request has expired.")
        return Response(stored.data, media_type=stored.content_type)

    # -- routes ----------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route(TASKS, self.create_task, methods=["POST"]),
            Route(TASKS, self.list_tasks, methods=["GET"]),
            Route(TASKS + "/{id}", self.get_task, methods=["GET"]),
            Route(TASKS + "/{id}", self.delete_task, methods=["DELETE"]),
            Route("/api/v3/images/generations", self.generate_images, methods=["POST"]),
            Route("/ark-content-generation-cn-beijing/{path:path}", self.download, methods=["GET"]),
        ]

    def _auth(self, request: Request) -> None:
        if not self.config.key_ok(bearer(request)):
            raise ArkError(401, "AuthenticationError", "The API key or AK/SK in the request is missing or invalid.")

    async def _json_body(self, request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except ValueError:
            raise _invalid("body", "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _invalid("body", "the request body must be a JSON object")
        return body

    def _resolve_model(self, value: Any, table: dict[str, Any], kind: str) -> tuple[str, Any]:
        """(model id, spec) for a model id or endpoint id of this region, else 404."""
        if not isinstance(value, str) or not value:
            raise _missing("model")
        model = str(self._x("endpoints", {}).get(value, value))
        for stem, spec in table.items():
            if model == self._model_id(stem, spec):
                if model in self._x("not_open_models", []):
                    raise ArkError(404, "ModelNotOpen", f"Your account has not activated the model {model}. "
                                                        "Please activate it in the Ark console.")
                return model, spec
        raise ArkError(404, "InvalidEndpointOrModel.NotFound",
                       f"The {kind} model or endpoint {value} does not exist or you do not have access to it.")

    def _model_id(self, stem: str, spec: VideoModel | ImageModel) -> str | None:
        """The id of a model on this region's host: ``doubao-`` in China, bare (or ``dreamina-``) on BytePlus."""
        if self._x("region", "cn") != "byteplus":
            return "doubao-" + stem
        if isinstance(spec, ImageModel) and spec.china_only:
            return None
        return "dreamina-" + stem if stem.startswith("seedance-2") else stem

    def _admit(self, model: str, prompt: str, now: float) -> None:
        """Account checks of a valid request: overdue balance, input moderation, 429s."""
        if self._x("account_overdue", False):
            raise ArkError(403, "AccountOverdueError", "The request failed because your account has an overdue "
                                                       "balance.")
        d = directives(prompt)
        for directive, code in (("sensitive", "InputTextSensitiveContentDetected"),
                                ("image_sensitive", "InputImageSensitiveContentDetected")):
            if directive in d:
                raise ArkError(400, code, SENSITIVE[code])
        if "quota" in d:
            raise ArkError(429, "QuotaExceeded", "The request failed because your quota has been exceeded.")
        if "overloaded" in d:
            raise ArkError(429, "ServerOverloaded", "The service is overloaded. Please try again later.")
        recent = self._creates.setdefault(model, deque())
        while recent and recent[0] <= now - 60:
            recent.popleft()
        rpm = self._x("rpm", None)
        if rpm is not None and len(recent) >= int(rpm):
            raise ArkError(429, "RateLimitExceeded.EndpointRPMExceeded",
                           f"The request has exceeded the RPM limit ({int(rpm)}) of the model {model}.")
        recent.append(now)

    # -- video tasks -------------------------------------------------------------
    async def create_task(self, request: Request) -> Response:
        try:
            self._auth(request)
        except ArkError as err:
            return self.ark_error(err)
        if (injected := await self.fault("create")) is not None:
            return injected
        try:
            body = await self._json_body(request)
            model, spec = self._resolve_model(body.get("model"), VIDEO_STEMS, "video")
            text, images = self._check_content(body.get("content"), spec)
            params = self._video_params(model, spec, body, text, bool(images))
            self._check_task_fields(body)
            now = time.time()
            self._admit(model, text, now)
        except ArkError as err:
            return self.ark_error(err)

        task = self._new_task(model, body, text, params, now)
        self.tasks[task.id] = task
        self.record_creation(json.dumps(body, sort_keys=True))
        if isinstance(body.get("callback_url"), str):
            self._spawn(self._callbacks(task, body["callback_url"], self.origin(request)))
        if (injected := await self.fault("create", after_effect=True)) is not None:
            return injected
        return JSONResponse({"id": task.id}, headers={"X-Request-Id": _request_id()})

    def _check_content(self, content: Any, spec: VideoModel) -> tuple[str, list[dict[str, Any]]]:
        """The text and the image items of ``content[]``, checked against the role rules."""
        if not isinstance(content, list) or not content:
            raise _missing("content")
        texts, images = [], []
        for i, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                texts.append(item["text"])
            elif kind == "image_url" and _http_or_data_url(_url_of(item, kind)):
                if item.get("role", "first_frame") not in ("first_frame", "last_frame", "reference_image"):
                    raise _invalid(f"content[{i}].role", f"unknown role {json.dumps(item.get('role'))}")
                images.append(item)
            elif kind in ("video_url", "audio_url"):
                media_kind = kind.split("_")[0]
                if not spec.media_refs:
                    raise _invalid(f"content[{i}]", f"{kind} items are not supported by this model")
                if not _http_or_data_url(_url_of(item, kind), media_kind):
                    raise _invalid(f"content[{i}].{kind}", "expected {\"url\": <http(s) URL or data URL>}")
                if item.get("role") != f"reference_{media_kind}":
                    raise _invalid(f"content[{i}].role", f"a {kind} item needs the role reference_{media_kind}")
            else:
                raise _invalid(f"content[{i}]", "expected a text item or an image_url item with a valid url")
        if len(texts) != 1:
            raise _invalid("content", "exactly one text item is required")
        roles = sorted(item.get("role", "first_frame") for item in images)
        if images and spec.text_only:
            raise _invalid("content", "this model only generates video from text")
        if not images and spec.needs_image:
            raise _invalid("content", "this model needs at least one image_url item")
        if "reference_image" in roles:
            if not spec.reference:
                raise _invalid("content", "this model does not support reference_image")
            if set(roles) != {"reference_image"}:
                raise _invalid("content", "reference_image cannot be mixed with first_frame or last_frame")
            if len(roles) > 4:
                raise _invalid("content", "at most 4 reference images are allowed")
        elif len(images) == 2:
            explicit = sorted(str(item.get("role")) for item in images)
            if explicit != ["first_frame", "last_frame"]:
                raise _invalid("content", "two images need the roles first_frame and last_frame")
        elif len(images) > 2 or roles == ["last_frame"]:
            raise _invalid("content", "expected one first_frame image or a first_frame and a last_frame image")
        return texts[0], images

    def _video_params(self, model: str, spec: VideoModel, body: dict[str, Any], text: str,
                      has_image: bool) -> dict[str, Any]:
        """Generation parameters from the text's flags and (newer models) the top-level fields."""
        flags: dict[str, str] = {}
        for name, value in FLAG.findall(text):
            if name in FLAG_NAMES:
                flags[FLAG_NAMES[name]] = value
        fields = {k: body[k] for k in BODY_PARAMS if k in body}
        if fields and not spec.body_params:
            if self._x("legacy_body_params", "reject") == "reject":
                name = next(iter(fields))
                raise _invalid(name, f"{model} takes its parameters as --flags in the text, not as `{name}`")
            fields = {}
        conflict = self._x("param_conflict", "body_wins")
        both = set(fields) & set(flags)
        if both and conflict == "error":
            raise _invalid(sorted(both)[0], "given both as a --flag in the text and as a field")
        merged: dict[str, Any] = flags | fields if conflict == "body_wins" else fields | flags
        return self._typed_params(model, spec, merged, has_image)

    def _typed_params(self, model: str, spec: VideoModel, raw: dict[str, Any], has_image: bool) -> dict[str, Any]:
        def number(name: str) -> int:
            value = raw[name]
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str)
                                                                          and re.fullmatch(r"-?\d+", value))):
                raise _invalid(name, f"{json.dumps(value)} is not an integer")
            return int(value)

        def flag(name: str) -> bool:
            value = raw.get(name, False)
            if isinstance(value, bool):
                return value
            if value not in ("true", "false"):
                raise _invalid(name, f"{json.dumps(value)} is not true or false")
            return bool(value == "true")

        ratio = raw.get("ratio", "adaptive" if has_image else "16:9")
        if ratio not in RATIOS:
            raise _invalid("ratio", f"{json.dumps(ratio)} is not one of {', '.join(RATIOS)}")
        resolution = raw.get("resolution", spec.default_resolution)
        if resolution not in RESOLUTIONS:
            raise _invalid("resolution", f"{json.dumps(resolution)} is not one of {', '.join(RESOLUTIONS)}")
        params: dict[str, Any] = {"ratio": ratio, "resolution": resolution, "camera_fixed": flag("camera_fixed"),
                                  "watermark": flag("watermark"), "frames": None}
        if "duration" in raw and "frames" in raw:
            raise _invalid("frames", "use either duration or frames")
        allowed = tuple(self._x("durations", {}).get(model, spec.durations))
        if "frames" in raw:
            frames = number("frames")
            if frames < 25 or (frames - 25) % 4 or (frames - 1) / 24 > max(allowed):
                raise _invalid("frames", f"{frames} is not 25+4n within the model's duration range")
            params |= {"frames": frames, "duration": None, "seconds": (frames - 1) / 24}
        else:
            duration = number("duration") if "duration" in raw else 5
            if duration not in allowed:
                raise _invalid("duration", f"{duration} is not supported by {model} ({allowed[0]}-{allowed[-1]})")
            params |= {"duration": duration, "seconds": duration}
        fps = number("framespersecond") if "framespersecond" in raw else 24
        if fps != 24:
            raise _invalid("framespersecond", "only 24 is supported")
        seed = number("seed") if "seed" in raw else -1
        if not -1 <= seed <= 2**32 - 1:
            raise _invalid("seed", "must be -1 or within [0, 2^32-1]")
        params |= {"framespersecond": fps, "seed": secrets.randbelow(2**31) if seed == -1 else seed}
        if "generate_audio" in raw:
            if not spec.audio or not isinstance(raw["generate_audio"], bool):
                raise _invalid("generate_audio", f"not supported by {model} or not a boolean")
            params["generate_audio"] = raw["generate_audio"]
        return params

    def _check_task_fields(self, body: dict[str, Any]) -> None:
        callback = body.get("callback_url")
        parts = urlsplit(callback) if isinstance(callback, str) else None
        if callback is not None and (parts is None or parts.scheme not in ("http", "https") or not parts.hostname):
            raise _invalid("callback_url", "not a valid http(s) URL")
        if not isinstance(body.get("return_last_frame", False), bool):
            raise _invalid("return_last_frame", "not a boolean")
        if body.get("service_tier", "default") not in ("default", "flex"):
            raise _invalid("service_tier", "expected default or flex")
        expires = body.get("execution_expires_after")
        if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int) or expires <= 0):
            raise _invalid("execution_expires_after", "expected a positive number of seconds")

    def _new_task(self, model: str, body: dict[str, Any], text: str, params: dict[str, Any], now: float) -> SimTask:
        d = directives(text)
        outcome, error = "succeed", None
        if "output_sensitive" in d:
            code = str(self._x("output_moderation_code", "OutputVideoSensitiveContentDetected"))
            outcome, error = "fail", {"code": code, "message": SENSITIVE.get(code, "The output video may contain "
                                                                                   "sensitive information.")}
        elif "fail" in d:
            outcome, error = "fail", {"code": d["fail"] or "InternalServiceError",
                                      "message": "The service encountered an unexpected internal error."}
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d%H%M%S")
        flex = body.get("service_tier") == "flex"
        return SimTask(
            id=f"cgt-{stamp}-{secrets.token_hex(3)[:5]}",
            created_at=now,
            queue_seconds=float(d.get("queue") or self.config.queue_seconds),
            run_seconds=float(d.get("run") or self.config.run_seconds),
            outcome=outcome,
            input=body,
            data={"model": model, "params": params, "error": error,
                  "return_last_frame": bool(body.get("return_last_frame", False)),
                  "service_tier": "flex" if flex else "default",
                  "expires_after": body.get("execution_expires_after") if flex else None},
        )

    def _visible(self, task_id: str, now: float) -> SimTask | None:
        """A task still kept: 7 days after creation, 24 h after a cancel."""
        task = self.tasks.get(task_id)
        if task is None or now - task.created_at > float(self._x("retention_seconds", 7 * 86400)):
            return None
        if task.canceled_at is not None and now - task.canceled_at > float(self._x("cancelled_retention_seconds",
                                                                                    86400)):
            return None
        return task

    async def get_task(self, request: Request) -> Response:
        try:
            self._auth(request)
        except ArkError as err:
            return self.ark_error(err)
        if (injected := await self.fault("get")) is not None:
            return injected
        task = self._visible(request.path_params["id"], time.time())
        if task is None:
            return self.ark_error(_not_found(request.path_params["id"]))
        return JSONResponse(self.task_object(task, self.origin(request)))

    async def list_tasks(self, request: Request) -> Response:
        try:
            self._auth(request)
        except ArkError as err:
            return self.ark_error(err)
        if (injected := await self.fault("list")) is not None:
            return injected
        q = request.query_params
        try:
            page_num, page_size = int(q.get("page_num", "1")), int(q.get("page_size", "10"))
        except ValueError:
            return self.ark_error(_invalid("page_size", "page_num and page_size must be integers"))
        if page_num < 1 or not 1 <= page_size <= int(self._x("max_page_size", 500)):
            return self.ark_error(_invalid("page_size", "page_num must be >= 1 and page_size within the limit"))
        now = time.time()
        tasks = [t for t in (self._visible(i, now) for i in list(self.tasks)) if t is not None]
        if status := q.get("filter.status"):
            tasks = [t for t in tasks if self.status(t, now) == status]
        if ids := q.getlist("filter.task_ids"):
            tasks = [t for t in tasks if t.id in ids]
        if model := q.get("filter.model"):
            tasks = [t for t in tasks if t.data["model"] == model]
        tasks.sort(key=lambda t: t.created_at, reverse=self._x("list_order", "newest") == "newest")
        page = tasks[(page_num - 1) * page_size:page_num * page_size]
        origin = self.origin(request)
        return JSONResponse({"total": len(tasks), "items": [self.task_object(t, origin, now) for t in page]})

    async def delete_task(self, request: Request) -> Response:
        try:
            self._auth(request)
        except ArkError as err:
            return self.ark_error(err)
        if (injected := await self.fault("delete")) is not None:
            return injected
        now = time.time()
        task = self._visible(request.path_params["id"], now)
        if task is None:
            return self.ark_error(_not_found(request.path_params["id"]))
        status = self.status(task, now)
        if status == "queued":
            task.canceled_at = now
        elif status == "running":
            return self.ark_error(ArkError(400, str(self._x("cancel_running_code", "InvalidAction.TaskRunning")),
                                           f"The task {task.id} is running and cannot be cancelled.", "id"))
        else:
            del self.tasks[task.id]
        return JSONResponse({})

    # -- images (synchronous) -------------------------------------------------------
    async def generate_images(self, request: Request) -> Response:
        try:
            self._auth(request)
        except ArkError as err:
            return self.ark_error(err)
        if (injected := await self.fault("images")) is not None:
            return injected
        try:
            body = await self._json_body(request)
            model, spec = self._resolve_model(body.get("model"), IMAGE_STEMS, "image")
            prompt, refs, sizes = self._check_image_request(spec, body)
            self._admit(model, prompt, time.time())
        except ArkError as err:
            return self.ark_error(err)

        d = directives(prompt)
        await asyncio.sleep(float(d.get("run") or self.config.run_seconds))  # the request is held while it runs
        if "output_sensitive" in d:
            code = "OutputImageSensitiveContentDetected"
            return self.ark_error(ArkError(400, code, SENSITIVE[code]))
        if "fail" in d:
            return self.error_response(500, "internal error")
        width, height = sizes
        count = 1
        if spec.group and body.get("sequential_image_generation") == "auto":
            options = body.get("sequential_image_generation_options") or {}
            most = min(int(options.get("max_images", 15)), 15 - len(refs))
            count = max(1, min(most, int(d.get("images") or self._x("group_images", 4))))
        failing = {count - 1} if d.get("partial") == "" else {int(i) for i in (d.get("partial") or "").split(",") if i}
        items, made = [], 0
        origin, now = self.origin(request), time.time()
        for i in range(count):
            if i in failing:
                code = "OutputImageSensitiveContentDetected"
                items.append({"error": {"code": code, "message": SENSITIVE[code]}})
                continue
            data = media.png(f"ark:image:{uuid.uuid4()}", max(1, width // 16), max(1, height // 16))
            item: dict[str, Any] = {"size": f"{width}x{height}"}
            if body.get("response_format", "url") == "b64_json":
                item["b64_json"] = base64.b64encode(data).decode()
            else:
                path = f"/ark-content-generation-cn-beijing/{model}/{_request_id()}_{i}.png"
                item["url"] = origin + self._publish(path, data, "image/png", now)
            items.append(item)
            made += 1
        if made:  # billed now, whatever happens to the answer
            self.billed_images += made
            self.record_creation(json.dumps(body, sort_keys=True))
        if (injected := await self.fault("images", after_effect=True)) is not None:
            return injected
        tokens = made * width * height // 256
        return JSONResponse({"model": model, str(self._x("image_timestamp_field", "created")): int(now), "data": items,
                             "usage": {"generated_images": made, "output_tokens": tokens, "total_tokens": tokens}},
                            headers={"X-Request-Id": _request_id()})

    def _check_image_request(self, spec: ImageModel, body: dict[str, Any]) -> tuple[str, list[str], tuple[int, int]]:
        """(prompt, reference images, output size) of a valid images request."""
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise _missing("prompt")
        image = body.get("image")
        refs = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(refs, list) or not all(_http_or_data_url(r) for r in refs):
            raise _invalid("image", "expected an image URL or data URL, or a list of them")
        if not spec.min_refs <= len(refs) <= spec.max_refs:
            raise _invalid("image", f"this model takes {spec.min_refs} to {spec.max_refs} images")
        if body.get("response_format", "url") not in ("url", "b64_json"):
            raise _invalid("response_format", "expected url or b64_json")
        if not isinstance(body.get("watermark", True), bool):
            raise _invalid("watermark", "not a boolean")
        if body.get("stream"):
            raise _invalid("stream", "streaming is not simulated")
        if "output_format" in body and body["output_format"] not in ("png", "jpeg"):
            raise _invalid("output_format", "expected png or jpeg")
        mode = body.get("sequential_image_generation", "disabled")
        if mode not in ("auto", "disabled") or (mode == "auto" and not spec.group):
            raise _invalid("sequential_image_generation", "expected auto (group models only) or disabled")
        options = body.get("sequential_image_generation_options")
        if options is not None:
            most = options.get("max_images", 15) if isinstance(options, dict) else None
            if isinstance(most, bool) or not isinstance(most, int) or not 1 <= most <= 15:
                raise _invalid("sequential_image_generation_options.max_images", "expected 1 to 15")
            if mode == "auto" and len(refs) + most > 15:
                raise _invalid("sequential_image_generation_options.max_images",
                               "reference images and output images together must not exceed 15")
        return prompt, refs, self._image_size(spec, body.get("size", spec.default_size))

    def _image_size(self, spec: ImageModel, size: Any) -> tuple[int, int]:
        if size in spec.labels:
            return LABEL_SIZES.get(size, (1024, 1024))
        match = re.fullmatch(r"(\d+)x(\d+)", size) if isinstance(size, str) else None
        if match is None:
            raise _invalid("size", f"expected WIDTHxHEIGHT or one of {', '.join(spec.labels) or 'no labels'}")
        width, height = int(match.group(1)), int(match.group(2))
        if not spec.group:  # Seedream 3.0: each side 512-2048
            ok = 512 <= width <= 2048 and 512 <= height <= 2048
        else:
            ok = 1280 * 720 <= width * height <= 4096 * 4096 and 1 / 16 <= width / height <= 16
        if not ok:
            raise _invalid("size", f"{size} is outside the model's size range")
        return width, height

    # -- callbacks -------------------------------------------------------------------
    def _spawn(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._callback_tasks.add(t)
        t.add_done_callback(self._callback_tasks.discard)

    async def _callbacks(self, task: SimTask, url: str, origin: str) -> None:
        """POST the task on each status change until it is terminal or deleted.

        Statuses passed while the sender was not looking (a busy loop) are still sent, in order,
        each rendered as it was at its own moment.
        """
        sent: set[str] = set()
        async with self.callback_client(float(self._x("callback_timeout", 5.0))) as client:
            while self.tasks.get(task.id) is task:
                now = time.time()
                status = self.status(task, now)
                steps = [("queued", task.created_at)]
                if status in ("running", "succeeded", "failed"):
                    steps.append(("running", task.started_at + 1e-6))
                if status in TERMINAL:
                    steps.append((status, now))
                for step, at in steps:
                    if step in sent or (step == "cancelled" and not self._x("callback_on_cancel", False)):
                        continue
                    sent.add(step)
                    body = json.dumps(self.task_object(task, origin, now=at)).encode()
                    await self._deliver(client, url, task.id, step, body)
                if status in TERMINAL:
                    return
                boundary = task.started_at if status == "queued" else task.finished_at
                await asyncio.sleep(min(0.25, max(0.01, boundary - time.time())))

    async def _deliver(self, client: httpx.AsyncClient, url: str, task_id: str, status: str, body: bytes) -> None:
        retries, delay = int(self._x("callback_retries", 3)), float(self._x("callback_retry_delay", 0.2))
        for attempt in range(retries + 1):
            entry: dict[str, Any] = {"id": task_id, "status": status, "attempt": attempt + 1}
            try:
                resp = await client.post(url, content=body, headers={"content-type": "application/json"})
                entry["status_code"] = resp.status_code
            except httpx.HTTPError as exc:
                entry["error"] = type(exc).__name__
            self.callback_log.append(entry)
            if 200 <= entry.get("status_code", 0) < 300:
                return
            if attempt < retries:
                await asyncio.sleep(delay)


def _url_of(item: dict[str, Any], kind: str) -> Any:
    """``item[kind]["url"]`` of a content item, or None."""
    media_obj = item.get(kind)
    return media_obj.get("url") if isinstance(media_obj, dict) else None


def _request_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S") + secrets.token_hex(12)


def _not_found(task_id: str) -> ArkError:
    return ArkError(404, "ResourceNotFound", f"The specified task {task_id} is not found.", "id")


def _tos_error(code: str, message: str) -> Response:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n  <Code>{code}</Code>\n  <Message>{message}</Message>\n'
            f"  <RequestId>{secrets.token_hex(12)}</RequestId>\n</Error>\n")
    return Response(body.encode(), status_code=403, media_type="application/xml")
