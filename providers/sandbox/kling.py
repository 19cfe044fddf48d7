"""Kling official API simulator: video tasks, image tasks and the follow-up operations.

Written from Kling's documented wire format (shared/providers/video-sora-veo-kling-runway.md
§0 and §3, video-wave2.md §9 "Kling's further endpoints", and the KLING-DOC API reference),
not from our adapter.

Families (each is its own namespace: a task is only found under the family it was created on):

- ``/v1/videos/text2video``, ``/v1/videos/image2video``: generation (``task_result.videos``).
- ``/v1/videos/video-extend``: continues the Kling video ``video_id`` (about 4.5 s more; the
  result's ``task_info.parent_video`` is the source ``{id, url, duration}``). Only videos of
  ``extra["extendable_models"]`` (v1.0/v1.5/v1.6), at most ``video_retention_seconds`` old,
  and at most 3 minutes long after the extension.
- ``/v1/videos/lip-sync`` (legacy): parameters nested under ``input``: ``video_id`` (a Kling
  video) or ``video_url``; ``mode`` ``text2video`` (``text`` <= 120 chars, ``voice_id``,
  ``voice_language`` zh/en, ``voice_speed`` 0.8-2.0) or ``audio2video`` (``audio_type``
  ``file`` with raw base64 ``audio_file``, or ``url`` with ``audio_url``). Field errors read
  like Kling's: "input.mode: must not be null", "Audio type is null".
- ``/v1/videos/effects``: ``effect_scene`` from ``extra["effect_scenes"]`` (unknown or
  retired: 1201); single-image scenes take ``input.image``, dual-image scenes exactly two
  ``input.images``, legacy dual scenes also ``input.model_name`` and ``input.mode``;
  ``input.duration`` ``"5"``/``"10"``.
- ``/v1/videos/multi-image2video``: ``kling-v1-6``, ``image_list`` of 1-4 ``{image}``,
  ``prompt`` required, ``mode``/``duration``/``aspect_ratio`` as text-to-video.
- ``/v1/images/generations``: ``prompt`` required, ``n`` 1-9 images
  (``task_result.images[{index, url}]``), ``resolution`` 1k/2k, eight aspect ratios, optional
  reference ``image`` (``image_reference`` subject/face needs kling-v1-5 and an image).
- ``/v1/images/kolors-virtual-try-on``: ``human_image`` and ``cloth_image`` -> one image.

Routes per family ``{path}`` (one of the above):

- ``POST {path}``: create; answers the envelope
  ``{code: 0, message: "SUCCEED", request_id, data: {task_id, task_status: "submitted",
  task_info: {external_task_id}, created_at, updated_at}}``.
- ``GET {path}/{id}``: query one task; ``id`` is the ``task_id`` **or** the
  ``external_task_id`` given at creation (documented: "choose one"; filled directly into the path).
- ``GET {path}?pageNum=1&pageSize=30``: list (newest first; pageNum 1-1000, pageSize 1-500),
  ``data`` is an array of task objects.
- ``GET /bs2/upload-kling-api/.../{task}-{i}_{raw|watermark}_{video|image}_1.{mp4|png}?x-exp=..&x-t=..&x-sign=..``:
  the outputs (real H.264 MP4s and PNGs, distinct per task and index), at signed URLs that stop
  working (404) after ``output_ttl_seconds``. The URLs are fixed per task (re-querying does not
  refresh them).

Auth: ``Authorization: Bearer <JWT>``, HS256 signed with the secret key, ``iss`` = access key,
``exp`` required, ``nbf`` honoured, no leeway (``extra["jwt_leeway"]``). Failures are HTTP 401
with code 1001 (empty), 1002 (not a JWT / wrong alg / claim missing), 1000 (unknown access
key or bad signature), 1003 (``nbf`` in the future), 1004 (expired).

Statuses: ``submitted -> processing -> succeed | failed`` (ms timestamps; ``task_status_msg``
carries the failure reason). A failed task is still ``code: 0, message: "SUCCEED"`` (the
documented trap). Succeeded video tasks carry ``task_result.videos[{id, url, duration: "5.1"}]``,
image tasks ``task_result.images[{index, url}]`` (both plus ``watermark_url`` when
``watermark_info.enabled``), and ``final_unit_deduction`` (illustrative units: video by mode and
length, one per image).

Errors: envelope ``{code, message, request_id}`` with Kling's business codes: 1200/1201 (400)
for bad parameters (``duration``, ``mode``, ``aspect_ratio``, ``cfg_scale``, a ``data:`` prefix
on a base64 image, duplicate ``external_task_id``, an unknown source ``video_id`` ...), 1203
(404) unknown model or task, 1202 (404) unknown route or method, 1301 (400) content policy,
1102 balance exhausted, 1302 rate limit, 1303 concurrency over the resource-pack limit (all
429), 5000/5001/5002 (500/503/504). Injected 429 faults answer with ``extra["fault_429_code"]``
(default 1302). Concurrency is counted per resource pack: ``video`` (every video family),
``image`` (an image task holds ``n`` slots) and ``try-on``.

Callbacks: when ``callback_url`` is set, the bare task object (not the envelope) is POSTed,
unsigned, on every status change (``processing``, then ``succeed``/``failed``; also
``submitted`` at creation if ``extra["callback_on_submit"]``). Retries on network errors and
5xx (``extra["callback_retries"]``, default 2).

Directives, in any text field of the body (base64 media aside), e.g. the prompt or a lip-sync
``input.text``: ``[sim:queue=S]``, ``[sim:run=S]`` timings; ``[sim:fail]`` /
``[sim:fail=reason]`` task fails (code 0 envelope); ``[sim:filtered]`` task fails with the
risk-control message; request-level (no task created): ``[sim:blocked]`` 1301,
``[sim:balance]`` 1102, ``[sim:ratelimit]`` 1302, ``[sim:concurrency]`` 1303;
``[sim:callback=drop|duplicate|reorder]`` callback faults for that task.

``SimConfig.extra`` knobs: ``access_key``/``secret_key`` (default ``sandbox-ak``/``sandbox-sk``;
``SimConfig.api_keys`` may add ``"AK:SK"`` pairs), ``jwt_leeway`` (0), ``concurrency``
(None = unlimited; active slots per resource pack, an int for every pack or
``{"video"|"image"|"try-on": n}``, else 1303), ``balance_units`` (None = unlimited;
units deducted per task, else 1102), ``balance_http_status`` (429; one project saw 400),
``fault_429_code`` (1302), ``error_data_null`` (False; add ``"data": null`` to error
envelopes), ``durations`` ({model: [..]} override), ``callback_mode``
(``normal|drop|duplicate|reorder``), ``callback_on_submit`` (False), ``callback_retries`` (2),
``extendable_models`` (kling-v1, kling-v1-5, kling-v1-6), ``extend_reject_code`` (1201; the code
for a ``video_id`` that is unknown, too old or from a newer model is UNCONFIRMED, 1203 answers
404), ``video_retention_seconds`` (30 days), ``effect_scenes`` ({scene: ``single`` | ``dual`` |
``dual_legacy``}; default the documented live dual scenes plus legacy ``heart_gesture``),
``negative_prompt_with_image`` (False: image generation refuses ``negative_prompt`` with a
reference ``image``, UNCONFIRMED), ``try_on_external_task_id`` (True; False: try-on ignores
``external_task_id``, whose support is UNCONFIRMED).

All keys belong to one simulated account: tasks, ``external_task_id`` uniqueness and the
concurrency count are shared by every key. Each task keeps its create body as received in
``task.data["body"]`` (for tests).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import heapq
import hmac
import json
import re
import secrets
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import FileStore, SimConfig, SimTask, Simulator, directives, new_id, route_path

VIDEO_FAMILIES = ("text2video", "image2video", "video-extend", "lip-sync", "effects", "multi-image2video")
IMAGE_FAMILIES = ("generations", "kolors-virtual-try-on")
FAMILIES = VIDEO_FAMILIES + IMAGE_FAMILIES
# Resource packs with their own concurrency count; every video family uses "video".
POOLS = {"generations": "image", "kolors-virtual-try-on": "try-on"}

T2V_MODELS = frozenset({"kling-v1", "kling-v1-6", "kling-v2-master", "kling-v2-1-master",
                        "kling-v2-5-turbo", "kling-v2-6", "kling-v3"})
I2V_MODELS = T2V_MODELS | {"kling-v1-5", "kling-v2-1"}
MODELS = {
    "text2video": T2V_MODELS,
    "image2video": I2V_MODELS,
    "multi-image2video": frozenset({"kling-v1-6"}),
    "generations": frozenset({"kling-v1", "kling-v1-5", "kling-v2", "kling-v2-new", "kling-v2-1",
                              "kling-v3", "kling-image-o1"}),
    "kolors-virtual-try-on": frozenset({"kolors-virtual-try-on-v1", "kolors-virtual-try-on-v1-5"}),
}
DEFAULT_MODELS = {"multi-image2video": "kling-v1-6", "kolors-virtual-try-on": "kolors-virtual-try-on-v1"}
# Older models only do 5 s and 10 s; kling-v3 does 3-15 s (Capability Map).
DEFAULT_DURATIONS: dict[str, tuple[str, ...]] = {"kling-v3": tuple(str(n) for n in range(3, 16))}
LEGACY_DURATIONS = ("5", "10")
ASPECT_RATIOS = ("16:9", "9:16", "1:1")
IMAGE_ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3", "21:9")
MODES = ("std", "pro")
# Units per 5 s of video (only used for final_unit_deduction and the balance knob).
UNITS_PER_5S = {"std": 1.0, "pro": 3.5}

EXTENDABLE_MODELS = ("kling-v1", "kling-v1-5", "kling-v1-6")
EXTEND_SECONDS = 4.5  # "each call adds about 4-5 s"
MAX_EXTENDED_SECONDS = 180.0
RETENTION_SECONDS = 30 * 86400.0
# An uploaded lip-sync video (2-10 s) is not inspected; its result is given this length.
UPLOADED_VIDEO_SECONDS = 5.0
# The documented live dual-image scenes, and the one legacy dual scene not yet retired.
EFFECT_SCENES = {"hug_pro": "dual", "kiss_pro": "dual", "fight_pro": "dual", "heart_gesture_pro": "dual",
                 "cheers_2026": "dual", "heart_gesture": "dual_legacy"}

FAIL_MESSAGE = "Image pixel is invalid"
FILTERED_MESSAGE = "Failure to pass the risk control system"
ACCOUNT = "5739745938"
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_DIRECTIVE_TEXT = 4000  # longer strings are media (base64), not text

_AUTH_MESSAGES = {
    1000: "Authentication failed",
    1001: "Authorization is empty",
    1002: "Authorization is invalid",
    1003: "Authorization is not yet valid",
    1004: "Authorization has expired",
}
_OUTPUT_NAME = re.compile(r"^(\d+)-(\d+)_(raw|watermark)_(video_1\.mp4|image_1\.png)$")
_URL = re.compile(r"^https?://[^/\s]+")


def _ms(ts: float) -> int:
    return int(ts * 1000)


def family_path(family: str) -> str:
    return f"/v1/{'images' if family in IMAGE_FAMILIES else 'videos'}/{family}"


class KlingError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _bad(message: str, code: int = 1201) -> KlingError:
    return KlingError(400, code, message)


@dataclass
class Plan:
    """A create request as the simulator understood it."""

    input: dict[str, Any]  # what ``SimTask.input`` records
    units: float
    seconds: float = 0.0  # length of the output video (video families)
    images: int = 0  # number of output images (image families)
    parent: SimTask | None = None  # the Kling video a task starts from (extend, lip-sync by video_id)
    parent_url: str = ""  # lip-sync's uploaded ``video_url``
    callback_url: str = ""
    external_task_id: str = ""
    watermark: bool = False


class _RevocableFiles(FileStore):
    """FileStore that also remembers when ``/_sim/expire-files`` was called.

    Kling's output URLs are signed and generated on demand (no bytes kept per task); any URL
    minted before the last ``expire_all`` stops working.
    """

    revoked_before: float = 0.0

    def expire_all(self) -> None:
        super().expire_all()
        self.revoked_before = time.time()


class KlingSimulator(Simulator):
    name = "kling"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.revocable = _RevocableFiles(self.config)
        self.files = self.revocable
        self.tasks: dict[str, SimTask] = {}
        self.by_external_id: dict[str, str] = {}
        self.video_ids: dict[str, str] = {}  # output video id -> task id (sources of extend, lip-sync)
        self.order: dict[str, list[str]] = {f: [] for f in FAMILIES}
        # Per resource pack, a heap of finish times of the slots held (an image task holds n).
        self._active: dict[str, list[float]] = {"video": [], "image": [], "try-on": []}
        self.units_used = 0.0
        self._cdn_secret = secrets.token_bytes(32)
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self.callbacks_sent = 0
        self.app.add_exception_handler(HTTPException, self._http_exception)

    # -- wire format -------------------------------------------------------
    def kling_error(self, status: int, code: int, message: str,
                    headers: dict[str, str] | None = None) -> Response:
        body: dict[str, Any] = {"code": code, "message": message, "request_id": str(uuid.uuid4())}
        if self.config.extra.get("error_data_null"):
            body["data"] = None
        return JSONResponse(body, status_code=status, headers=headers)

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        if status == 429:
            code = int(self.config.extra.get("fault_429_code", 1302))
            text = {1102: "Account balance not enough", 1303: "parallel task over resource pack limit"}.get(
                code, "request is too fast, exceeding the platform's rate limit")
            return self.kling_error(429, code, text, headers)
        code = {503: 5001, 504: 5002}.get(status, 5000 if status >= 500 else 1200)
        text = {5000: "Server internal error", 5001: "Server temporarily unavailable",
                5002: "Server internal timeout"}.get(code, message)
        return self.kling_error(status, code, text, headers)

    async def _http_exception(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code in (404, 405):
            return self.kling_error(404, 1202, "The requested method is invalid")
        return self.kling_error(exc.status_code, 1200, str(exc.detail))

    def envelope(self, data: Any) -> Response:
        return JSONResponse({"code": 0, "message": "SUCCEED", "request_id": str(uuid.uuid4()), "data": data})

    def status_of(self, task: SimTask, now: float) -> str:
        phase = task.phase(now)
        if phase == "queued":
            return "submitted"
        if phase == "running":
            return "processing"
        return "failed" if task.outcome in ("fail", "filtered") else "succeed"

    def task_object(self, task: SimTask, origin: str, now: float | None = None) -> dict[str, Any]:
        """The task as Kling shows it (``data`` of a query, and the callback body)."""
        now = time.time() if now is None else now
        status = self.status_of(task, now)
        updated = {"submitted": task.created_at, "processing": task.started_at}.get(status, task.finished_at)
        info: dict[str, Any] = {}
        if ext := task.data.get("external_task_id"):
            info["external_task_id"] = ext
        if parent := self.tasks.get(task.data.get("parent", "")):
            info["parent_video"] = self._video(parent, origin, now, watermark=False)
        elif task.data.get("parent_url"):
            info["parent_video"] = {"id": "", "url": task.data["parent_url"], "duration": ""}
        obj: dict[str, Any] = {
            "task_id": task.id,
            "task_status": status,
            "task_status_msg": "",
            "task_info": info,
            "created_at": _ms(task.created_at),
            "updated_at": _ms(updated),
        }
        if status == "failed":
            obj["task_status_msg"] = task.data.get("fail_message") or FAIL_MESSAGE
            obj["task_result"] = {}
            obj["final_unit_deduction"] = "0"
        elif status == "succeed":
            watermark = bool(task.data.get("watermark"))
            if task.data["family"] in IMAGE_FAMILIES:
                images = []
                for i in range(task.data["images"]):
                    image = {"index": i, "url": self._output_url(task, origin, i, "raw", now)}
                    if watermark:
                        image["watermark_url"] = self._output_url(task, origin, i, "watermark", now)
                    images.append(image)
                obj["task_result"] = {"images": images}
            else:
                obj["task_result"] = {"videos": [self._video(task, origin, now, watermark)]}
            obj["watermark_info"] = {"enabled": watermark}
            obj["final_unit_deduction"] = _fmt_units(task.data["units"])
        return obj

    def _video(self, task: SimTask, origin: str, now: float, watermark: bool) -> dict[str, Any]:
        video: dict[str, Any] = {
            "id": task.data["video_id"],
            "url": self._output_url(task, origin, 0, "raw", now),
            "duration": f"{task.data['seconds']:.1f}",
        }
        if watermark:
            video["watermark_url"] = self._output_url(task, origin, 0, "watermark", now)
        return video

    # -- signed, expiring output URLs ---------------------------------------
    def _sign(self, path: str, exp_ms: int, minted_ms: int) -> str:
        msg = f"{path}|{exp_ms}|{minted_ms}".encode()
        return hmac.new(self._cdn_secret, msg, hashlib.sha256).hexdigest()[:32]

    def _output_url(self, task: SimTask, origin: str, index: int, variant: str, now: float) -> str:
        sig = task.data.get("url_sig")
        if sig is None:  # minted once, when the result is first shown; stable afterwards
            minted = max(now, task.finished_at)
            sig = (_ms(minted + self.config.output_ttl_seconds), _ms(minted))
            task.data["url_sig"] = sig
        exp_ms, minted_ms = sig
        family = task.data["family"]
        name = "image_1.png" if family in IMAGE_FAMILIES else "video_1.mp4"
        path = f"/bs2/upload-kling-api/{ACCOUNT}/{family}/{task.id}-{index}_{variant}_{name}"
        return f"{origin}{path}?x-exp={exp_ms}&x-t={minted_ms}&x-sign={self._sign(path, exp_ms, minted_ms)}"

    async def download(self, request: Request) -> Response:
        if (injected := await self.fault("download")) is not None:
            return injected
        path = route_path(request)  # below the mount point (/kling in the sandbox server)
        q = request.query_params
        match = _OUTPUT_NAME.match(request.path_params["name"])
        try:
            exp_ms, minted_ms = int(q.get("x-exp", "")), int(q.get("x-t", ""))
        except ValueError:
            return self.expired_file_response()
        task = self.tasks.get(match.group(1)) if match is not None else None
        ok = (
            match is not None
            and task is not None
            and hmac.compare_digest(q.get("x-sign", ""), self._sign(path, exp_ms, minted_ms))
            and exp_ms > _ms(time.time())
            and minted_ms > _ms(self.revocable.revoked_before)
        )
        if not ok or match is None or task is None:
            return self.expired_file_response()
        index, variant = int(match.group(2)), match.group(3)
        if task.data["family"] in IMAGE_FAMILIES:
            return Response(media.png(f"kling:{task.id}:{index}:{variant}"), media_type="image/png")
        return Response(media.mp4(f"kling:{task.id}:{variant}"), media_type="video/mp4")

    # -- routes ------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = []
        for family in FAMILIES:
            path = family_path(family)
            routes += [
                Route(path, self._create_handler(family), methods=["POST"]),
                Route(path, self._list_handler(family), methods=["GET"]),
                Route(f"{path}/{{id}}", self._get_handler(family), methods=["GET"]),
            ]
        cdn = "/bs2/upload-kling-api/{account}/{family}/{name}"
        routes.append(Route(cdn, self.download, methods=["GET"]))
        return routes

    def key_pairs(self) -> dict[str, str]:
        extra = self.config.extra
        pairs = {str(extra.get("access_key", "sandbox-ak")): str(extra.get("secret_key", "sandbox-sk"))}
        for item in self.config.api_keys:
            ak, sep, sk = item.partition(":")
            if sep and ak and sk:
                pairs[ak] = sk
        return pairs

    def _auth(self, request: Request) -> Response | None:
        code = self.check_jwt(request.headers.get("authorization", ""))
        if code is None:
            return None
        return self.kling_error(401, code, _AUTH_MESSAGES[code])

    def check_jwt(self, authorization: str) -> int | None:
        """Validate a Kling API token like Kling does; ``None`` if good, else the 100x code."""
        if not authorization.strip():
            return 1001
        token = bearer_token(authorization)
        if token is None:
            return 1002
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            return 1002
        if header.get("alg") != "HS256" or not isinstance(claims.get("iss"), str):
            return 1002
        secret = self.key_pairs().get(claims["iss"])
        if secret is None:
            return 1000
        leeway = float(self.config.extra.get("jwt_leeway", 0))
        try:
            with warnings.catch_warnings():  # sandbox secrets are shorter than 32 bytes
                warnings.filterwarnings("ignore", message="The HMAC key", category=UserWarning)
                jwt.decode(token, secret, algorithms=["HS256"], leeway=leeway,
                           options={"require": ["exp"], "verify_aud": False})
        except jwt.InvalidSignatureError:
            return 1000
        except jwt.ExpiredSignatureError:
            return 1004
        except jwt.ImmatureSignatureError:
            return 1003
        except jwt.InvalidTokenError:
            return 1002
        return None

    def _create_handler(self, family: str) -> Any:
        async def create(request: Request) -> Response:
            return await self.create(request, family)
        return create

    def _get_handler(self, family: str) -> Any:
        async def get(request: Request) -> Response:
            return await self.get_task(request, family)
        return get

    def _list_handler(self, family: str) -> Any:
        async def list_(request: Request) -> Response:
            return await self.list_tasks(request, family)
        return list_

    async def create(self, request: Request, family: str) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("create")) is not None:
            return injected
        try:
            body = json.loads(await request.body())
        except ValueError:
            return self.kling_error(400, 1200, "Invalid request parameters: body is not valid JSON")
        if not isinstance(body, dict):
            return self.kling_error(400, 1200, "Invalid request parameters: body must be a JSON object")
        try:
            plan = self.validate(family, body)
            d = directives(" ".join(_texts(body)))
            self.admit(d, family, plan)
        except KlingError as err:
            return self.kling_error(err.status, err.code, err.message)

        now = time.time()
        task_id = _numeric_id()
        outcome = "succeed"
        if "filtered" in d:
            outcome = "filtered"
        elif "fail" in d:
            outcome = "fail"
        task = SimTask(
            id=task_id, created_at=now,
            queue_seconds=float(d.get("queue") or self.config.queue_seconds),
            run_seconds=float(d.get("run") or self.config.run_seconds),
            outcome=outcome,
            input=plan.input,
            # The create body as received (for tests to check what a client sent).
            data={"family": family, "units": plan.units, "body": body},
        )
        if family in IMAGE_FAMILIES:
            task.data["images"] = plan.images
        else:
            task.data["seconds"] = plan.seconds
            task.data["video_id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, "kling:" + task_id))
            self.video_ids[task.data["video_id"]] = task_id
        if plan.parent is not None:
            task.data["parent"] = plan.parent.id
        if plan.parent_url:
            task.data["parent_url"] = plan.parent_url
        ext = plan.external_task_id
        if ext:
            task.data["external_task_id"] = ext
            self.by_external_id[ext] = task_id
        if plan.watermark:
            task.data["watermark"] = True
        if outcome == "filtered":
            task.data["fail_message"] = FILTERED_MESSAGE
        elif outcome == "fail" and d["fail"]:
            task.data["fail_message"] = d["fail"]
        self.tasks[task_id] = task
        self.order[family].append(task_id)
        pool = POOLS.get(family, "video")
        for _ in range(plan.images if pool == "image" else 1):
            heapq.heappush(self._active[pool], task.finished_at)
        self.units_used += plan.units
        # The client's identity for the request: its external_task_id, else a digest of the body
        # (bodies may carry megabytes of base64 image).
        identity = ext or hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
        self.record_creation(f"{family}:{identity}")
        if plan.callback_url:
            mode = d.get("callback") or str(self.config.extra.get("callback_mode", "normal"))
            self._schedule_callbacks(task, plan.callback_url, mode, self.origin(request))
        if (injected := await self.fault("create", after_effect=True)) is not None:
            return injected
        return self.envelope({
            "task_id": task_id,
            "task_info": {"external_task_id": ext},
            "task_status": "submitted",
            "created_at": _ms(now),
            "updated_at": _ms(now),
        })

    def validate(self, family: str, body: dict[str, Any]) -> Plan:
        """Check the create body as documented for ``family``; returns the normalised request."""
        validators = {
            "text2video": self._generation, "image2video": self._generation,
            "multi-image2video": self._generation, "video-extend": self._extend,
            "lip-sync": self._lip_sync, "effects": self._effects,
            "generations": self._image_generation, "kolors-virtual-try-on": self._try_on,
        }
        plan = validators[family](family, body)

        callback = body.get("callback_url") or ""
        if not isinstance(callback, str) or (callback and not _URL.match(callback)):
            raise _bad("Invalid parameter: callback_url is not a valid URL")
        plan.callback_url = callback

        ext = body.get("external_task_id") or ""
        if family == "kolors-virtual-try-on" and not self.config.extra.get("try_on_external_task_id", True):
            ext = ""  # the UNCONFIRMED variant: try-on ignores the field
        if not isinstance(ext, str):
            raise _bad("Invalid parameter: external_task_id must be a string")
        if ext and ext in self.by_external_id:
            raise _bad(f"external_task_id '{ext}' already exists, it must be unique within the account")
        plan.external_task_id = ext

        wm = body.get("watermark_info")
        if wm is not None and not (isinstance(wm, dict) and isinstance(wm.get("enabled", False), bool)):
            raise _bad("Invalid parameter: watermark_info must be {\"enabled\": boolean}")
        plan.watermark = bool(wm and wm.get("enabled"))
        return plan

    def _model(self, family: str, body: dict[str, Any]) -> str:
        model = body.get("model_name")
        if model is None or model == "":
            model = DEFAULT_MODELS.get(family, "kling-v1")  # the legacy ``model`` field also means V1
        if not isinstance(model, str):
            raise _bad("Invalid parameter: model_name must be a string")
        if model not in MODELS[family]:
            raise KlingError(404, 1203, f"model_name '{model}' is not supported by {family}")
        return model

    def _generation(self, family: str, body: dict[str, Any]) -> Plan:
        """text2video, image2video and multi-image2video: prompt, mode, duration and their images."""
        model = self._model(family, body)
        multi_custom = body.get("multi_shot") is True and body.get("shot_type") == "customize"
        _text(body, "prompt", required=family != "image2video" and not multi_custom)
        _text(body, "negative_prompt")
        _cfg_scale(body)

        mode = body.get("mode", "std")
        if mode not in MODES:
            raise _bad(f"Invalid parameter: mode value '{mode}' is invalid, expected std or pro")

        duration = body.get("duration", "5")
        if isinstance(duration, int) and not isinstance(duration, bool):
            duration = str(duration)  # Kling's JSON binding coerces numbers to the string enum
        allowed = self.durations(model)
        if not isinstance(duration, str) or duration not in allowed:
            raise _bad(f"Invalid parameter: duration value '{duration}' is invalid for model {model}, "
                       f"supported: {', '.join(allowed)}")

        if family != "image2video":
            ratio = body.get("aspect_ratio", "16:9")
            if ratio not in ASPECT_RATIOS:
                raise _bad(f"Invalid parameter: aspect_ratio value '{ratio}' is invalid")

        sound = body.get("sound", "off")
        if sound not in ("on", "off"):
            raise _bad(f"Invalid parameter: sound value '{sound}' is invalid")

        if family == "image2video":
            image, tail = body.get("image"), body.get("image_tail")
            if not image and not tail:
                raise _bad("Invalid parameter: image and image_tail cannot both be empty")
            for name, value in (("image", image), ("image_tail", tail)):
                if value:
                    _check_image(name, value)
            exclusive = [k for k in ("image_tail", "static_mask", "dynamic_masks", "camera_control")
                         if body.get(k)]
            if len(exclusive) > 1 and "image_tail" in exclusive:
                raise _bad(f"Invalid parameter: {' and '.join(exclusive)} cannot be used together")
        elif family == "multi-image2video":
            images = body.get("image_list")
            if not isinstance(images, list) or not 1 <= len(images) <= 4:
                raise _bad("Invalid parameter: image_list must hold 1 to 4 images")
            for i, item in enumerate(images):
                if not isinstance(item, dict) or not item.get("image"):
                    raise _bad(f"Invalid parameter: image_list[{i}].image must not be empty")
                _check_image(f"image_list[{i}].image", item["image"])

        units = UNITS_PER_5S[mode] * int(duration) / 5
        return Plan({"model_name": model, "mode": mode, "duration": duration}, units, seconds=int(duration) + 0.1)

    def _extend(self, family: str, body: dict[str, Any]) -> Plan:
        video_id = body.get("video_id")
        if not isinstance(video_id, str) or not video_id:
            raise _bad("Invalid parameter: video_id must not be empty")
        code = int(self.config.extra.get("extend_reject_code", 1201))
        status = 404 if code == 1203 else 400
        parent = self.source_video(video_id)
        if parent is None:
            raise KlingError(status, code, f"Invalid parameter: video_id '{video_id}' does not exist or has "
                                           "expired")
        model = parent.input.get("model_name")
        if model not in self.config.extra.get("extendable_models", EXTENDABLE_MODELS):
            raise KlingError(status, code, f"Invalid parameter: video_id '{video_id}' was not generated by a "
                                           "model that supports video extension")
        seconds = parent.data["seconds"] + EXTEND_SECONDS
        if seconds > MAX_EXTENDED_SECONDS:
            raise _bad("Invalid parameter: the video would exceed 3 minutes after extension")
        _text(body, "prompt")
        _text(body, "negative_prompt")
        _cfg_scale(body)
        return Plan({"model_name": model, "video_id": video_id}, UNITS_PER_5S["std"], seconds=seconds,
                    parent=parent)

    def _lip_sync(self, family: str, body: dict[str, Any]) -> Plan:
        inp = body.get("input")
        if not isinstance(inp, dict):
            raise _bad("input: must not be null")
        video_id, video_url = inp.get("video_id"), inp.get("video_url")
        if bool(video_id) == bool(video_url):
            raise _bad("Invalid parameter: exactly one of input.video_id and input.video_url is required")
        parent = None
        seconds = UPLOADED_VIDEO_SECONDS
        if video_id:
            parent = self.source_video(video_id) if isinstance(video_id, str) else None
            if parent is None:
                raise _bad(f"Invalid parameter: input.video_id '{video_id}' does not exist or has expired")
            seconds = parent.data["seconds"]
        elif not isinstance(video_url, str) or not _URL.match(video_url):
            raise _bad("Invalid parameter: input.video_url is not a valid URL")

        mode = inp.get("mode")
        if mode is None:
            raise _bad("input.mode: must not be null")
        if mode == "text2video":
            text = inp.get("text")
            if not isinstance(text, str) or not text:
                raise _bad("input.text: must not be null")
            if len(text) > 120:
                raise _bad("Invalid parameter: input.text cannot exceed 120 characters")
            if not isinstance(inp.get("voice_id"), str) or not inp["voice_id"]:
                raise _bad("input.voice_id: must not be null")
            language = inp.get("voice_language", "zh")
            if language not in ("zh", "en"):
                raise _bad(f"Invalid parameter: input.voice_language value '{language}' is invalid")
            speed = inp.get("voice_speed", 1.0)
            if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0.8 <= speed <= 2.0:
                raise _bad("Invalid parameter: input.voice_speed must be in [0.8, 2.0]")
        elif mode == "audio2video":
            audio_type = inp.get("audio_type")
            if audio_type is None:
                raise _bad("Audio type is null")
            if audio_type == "file":
                if not inp.get("audio_file"):
                    raise _bad("input.audio_file: must not be null")
                _check_base64("input.audio_file", inp["audio_file"])
            elif audio_type == "url":
                url = inp.get("audio_url")
                if not isinstance(url, str) or not _URL.match(url):
                    raise _bad("Invalid parameter: input.audio_url is not a valid URL")
            else:
                raise _bad(f"Invalid parameter: input.audio_type value '{audio_type}' is invalid")
        else:
            raise _bad(f"Invalid parameter: input.mode value '{mode}' is invalid")
        source = {"video_id": video_id} if video_id else {"video_url": video_url}
        return Plan({"mode": mode, **source}, UNITS_PER_5S["std"] * seconds / 5, seconds=seconds,
                    parent=parent, parent_url="" if video_id else str(video_url))

    def _effects(self, family: str, body: dict[str, Any]) -> Plan:
        scene = body.get("effect_scene")
        if not isinstance(scene, str) or not scene:
            raise _bad("effect_scene: must not be null")
        kind = self.config.extra.get("effect_scenes", EFFECT_SCENES).get(scene)
        if kind is None:
            raise _bad(f"Invalid parameter: effect_scene '{scene}' is not supported")
        inp = body.get("input")
        if not isinstance(inp, dict):
            raise _bad("input: must not be null")
        if kind == "single":
            if not inp.get("image"):
                raise _bad("input.image: must not be null")
            _check_image("input.image", inp["image"])
        else:
            images = inp.get("images")
            if not isinstance(images, list) or len(images) != 2:
                raise _bad(f"Invalid parameter: effect_scene '{scene}' needs exactly 2 images in input.images")
            for i, image in enumerate(images):
                _check_image(f"input.images[{i}]", image)
            if kind == "dual_legacy":
                if not isinstance(inp.get("model_name"), str) or not inp["model_name"]:
                    raise _bad("input.model_name: must not be null")
                if inp.get("mode") not in MODES:
                    raise _bad(f"Invalid parameter: input.mode value '{inp.get('mode')}' is invalid")
        duration = inp.get("duration", "5")
        if isinstance(duration, int) and not isinstance(duration, bool):
            duration = str(duration)
        if duration not in LEGACY_DURATIONS:
            raise _bad(f"Invalid parameter: input.duration value '{duration}' is invalid")
        return Plan({"effect_scene": scene, "duration": duration}, UNITS_PER_5S["std"] * int(duration) / 5,
                    seconds=int(duration) + 0.1)

    def _image_generation(self, family: str, body: dict[str, Any]) -> Plan:
        model = self._model(family, body)
        _text(body, "prompt", required=True)
        negative = _text(body, "negative_prompt")
        image = body.get("image")
        if image:
            _check_image("image", image)
            if negative and not self.config.extra.get("negative_prompt_with_image", False):
                raise _bad("Invalid parameter: negative_prompt is not supported with a reference image")
        reference = body.get("image_reference")
        if reference is not None:
            if reference not in ("subject", "face"):
                raise _bad(f"Invalid parameter: image_reference value '{reference}' is invalid")
            if model != "kling-v1-5" or not image:
                raise _bad("Invalid parameter: image_reference needs model kling-v1-5 and an image")
        for name in ("image_fidelity", "human_fidelity"):
            value = body.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not 0 <= value <= 1):
                raise _bad(f"Invalid parameter: {name} must be in [0, 1]")
        resolution = body.get("resolution", "1k")
        if resolution not in ("1k", "2k"):
            raise _bad(f"Invalid parameter: resolution value '{resolution}' is invalid")
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 9:
            raise _bad("Invalid parameter: n must be an integer in [1, 9]")
        ratio = body.get("aspect_ratio", "16:9")
        if ratio not in IMAGE_ASPECT_RATIOS:
            raise _bad(f"Invalid parameter: aspect_ratio value '{ratio}' is invalid")
        return Plan({"model_name": model, "n": n, "resolution": resolution, "aspect_ratio": ratio},
                    float(n), images=n)

    def _try_on(self, family: str, body: dict[str, Any]) -> Plan:
        model = self._model(family, body)
        for name in ("human_image", "cloth_image"):
            if not body.get(name):
                raise _bad(f"{name}: must not be null")
            _check_image(name, body[name])
        return Plan({"model_name": model}, 1.0, images=1)

    def source_video(self, video_id: str) -> SimTask | None:
        """The task whose video ``video_id`` is, if it succeeded and is still within retention."""
        task = self.tasks.get(self.video_ids.get(video_id, ""))
        now = time.time()
        if task is None or self.status_of(task, now) != "succeed":
            return None
        retention = float(self.config.extra.get("video_retention_seconds", RETENTION_SECONDS))
        return task if now - task.finished_at <= retention else None

    def durations(self, model: str) -> tuple[str, ...]:
        override = self.config.extra.get("durations") or {}
        if model in override:
            return tuple(str(x) for x in override[model])
        return DEFAULT_DURATIONS.get(model, LEGACY_DURATIONS)

    def admit(self, d: dict[str, str], family: str, plan: Plan) -> None:
        """Account-level checks before a task is created (balance, rate, concurrency)."""
        extra = self.config.extra
        balance_status = int(extra.get("balance_http_status", 429))
        if "blocked" in d:
            raise KlingError(400, 1301, "Failure to pass the risk control system")
        if "balance" in d:
            raise KlingError(balance_status, 1102, "Account balance not enough")
        if "ratelimit" in d:
            raise KlingError(429, 1302, "request is too fast, exceeding the platform's rate limit")
        if "concurrency" in d:
            raise KlingError(429, 1303, "parallel task over resource pack limit")
        balance = extra.get("balance_units")
        if balance is not None and self.units_used + plan.units > float(balance):
            raise KlingError(balance_status, 1102, "Account balance not enough")
        pool = POOLS.get(family, "video")
        limit = extra.get("concurrency")
        if isinstance(limit, dict):
            limit = limit.get(pool)
        if limit is not None:
            active = self._active[pool]
            now = time.time()
            while active and active[0] <= now:
                heapq.heappop(active)
            if len(active) + (plan.images if pool == "image" else 1) > int(limit):
                raise KlingError(429, 1303, "parallel task over resource pack limit")

    def find(self, family: str, ident: str) -> SimTask | None:
        task = self.tasks.get(ident)
        if task is None and ident in self.by_external_id:
            task = self.tasks.get(self.by_external_id[ident])
        if task is None or task.data["family"] != family:
            return None
        return task

    async def get_task(self, request: Request, family: str) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("get")) is not None:
            return injected
        task = self.find(family, request.path_params["id"])
        if task is None:
            return self.kling_error(404, 1203, "task not found")
        return self.envelope(self.task_object(task, self.origin(request)))

    async def list_tasks(self, request: Request, family: str) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("list")) is not None:
            return injected
        try:
            page = int(request.query_params.get("pageNum", "1"))
            size = int(request.query_params.get("pageSize", "30"))
        except ValueError:
            return self.kling_error(400, 1201, "Invalid parameter: pageNum and pageSize must be integers")
        if not 1 <= page <= 1000 or not 1 <= size <= 500:
            return self.kling_error(400, 1201, "Invalid parameter: pageNum must be in [1, 1000], "
                                               "pageSize in [1, 500]")
        ids = self.order[family]
        end = len(ids) - (page - 1) * size
        chosen = ids[max(0, end - size):max(0, end)][::-1]
        origin = self.origin(request)
        return self.envelope([self.task_object(self.tasks[i], origin) for i in chosen])

    # -- callbacks ---------------------------------------------------------
    def _schedule_callbacks(self, task: SimTask, url: str, mode: str, origin: str) -> None:
        t = asyncio.get_running_loop().create_task(self._run_callbacks(task, url, mode, origin))
        self._callback_tasks.add(t)
        t.add_done_callback(self._callback_tasks.discard)

    async def _run_callbacks(self, task: SimTask, url: str, mode: str, origin: str) -> None:
        if mode == "drop":
            return
        times = [task.started_at, task.finished_at]
        if self.config.extra.get("callback_on_submit"):
            times.insert(0, task.created_at)
        held: list[bytes] = []
        async with self.callback_client(10) as client:
            for i, at in enumerate(times):
                await asyncio.sleep(max(0.0, at - time.time()))
                body = json.dumps(self.task_object(task, origin, now=at + 1e-6)).encode()
                if mode == "reorder" and i < len(times) - 1:
                    held.append(body)  # delivered after the final status instead
                    continue
                await self._post_callback(client, url, body)
                if mode == "duplicate":
                    await self._post_callback(client, url, body)
            for body in reversed(held):
                await self._post_callback(client, url, body)

    async def _post_callback(self, client: httpx.AsyncClient, url: str, body: bytes) -> None:
        retries = int(self.config.extra.get("callback_retries", 2))
        for attempt in range(retries + 1):
            try:
                resp = await client.post(url, content=body, headers={"content-type": "application/json"})
                self.callbacks_sent += 1
                if resp.status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2 * (attempt + 1))


def bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _texts(value: Any) -> Iterator[str]:
    """Every text in a request body (where directives may sit), skipping base64 media."""
    if isinstance(value, str):
        if len(value) <= MAX_DIRECTIVE_TEXT:
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from _texts(item)


def _text(body: dict[str, Any], name: str, required: bool = False) -> str:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise _bad(f"Invalid parameter: {name} must be a string")
    if required and not value:
        raise _bad(f"Invalid parameter: {name} must not be empty")
    if value and len(value) > 2500:
        raise _bad(f"Invalid parameter: {name} cannot exceed 2500 characters")
    return value or ""


def _cfg_scale(body: dict[str, Any]) -> None:
    cfg = body.get("cfg_scale")
    if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, int | float) or not 0 <= cfg <= 1):
        raise _bad("Invalid parameter: cfg_scale must be in [0, 1]")


def _check_image(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise _bad(f"Invalid parameter: {name} must be a URL or a Base64 string")
    if not value.startswith(("http://", "https://")):
        _check_base64(name, value)


def _check_base64(name: str, value: Any) -> None:
    """Raw base64 as Kling wants it: no ``data:`` prefix, at most 10 MB."""
    if not isinstance(value, str):
        raise _bad(f"Invalid parameter: {name} must be a Base64 string")
    if value.startswith("data:"):
        raise _bad(f"Invalid parameter: {name} Base64 must not carry a 'data:' prefix")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(f"Invalid parameter: {name} is neither a URL nor valid Base64") from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise _bad(f"Invalid parameter: {name} exceeds 10MB")


def _numeric_id() -> str:
    return "7" + new_id("0123456789", 17)


def _fmt_units(units: float) -> str:
    return str(int(units)) if units == int(units) else f"{units:g}"


def make_token(access_key: str = "sandbox-ak", secret_key: str = "sandbox-sk", ttl: int = 1800,
               nbf_offset: int = -5, now: float | None = None) -> str:
    """An API token as Kling's docs build it (for tests, benchmarks and the demo)."""
    ts = int(time.time() if now is None else now)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The HMAC key", category=UserWarning)
        return jwt.encode({"iss": access_key, "exp": ts + ttl, "nbf": ts + nbf_offset}, secret_key,
                          algorithm="HS256", headers={"typ": "JWT"})
