"""Midjourney simulator: the midjourney-proxy API as a new-api gateway serves it.

Written from shared/providers images-wave2.md §8 (midjourney-proxy, -plus and trueai) and
replicate-fal-suno-gateways.md §4.2 (the same API through new-api), not from our adapter.
Two layers are simulated, because clients see both:

**The proxy** (midjourney-proxy-plus / trueai style) runs the tasks on one Discord account
with ``concurrency`` slots and a wait queue of ``queue_size``:

- ``POST /mj/submit/imagine`` ``{prompt*, base64Array?, botType?, notifyHook?, state?}``,
  ``/mj/submit/blend`` ``{base64Array*: 2-5, dimensions: PORTRAIT|SQUARE|LANDSCAPE}``,
  ``/mj/submit/describe`` ``{base64* | link}``, ``/mj/insight-face/swap``
  ``{sourceBase64|sourceUrl*, targetBase64|targetUrl*}``, ``/mj/submit/action``
  ``{taskId*, customId*, enableRemix?}`` and ``/mj/submit/modal`` ``{taskId*, prompt?,
  maskBase64?}`` answer ``{code, description, result, properties}`` — HTTP 200 whatever the
  code (``trueai_http_status``: 400 for codes 4/24, 404 for code 3). Codes: 1 submitted
  (``result`` = task id); 22 queued behind busy slots ("排队中，前面还有N个任务",
  ``properties.numberOfQueues``); 23 queue full ("队列已满，请稍后尝试", no task); 24 banned
  prompt ("可能包含敏感词", ``properties.promptEn`` and ``properties.bannedWord``); 21 either
  "任务已存在" (the same upscale asked again: ``result`` is the existing task,
  ``properties.status``/``imageUrl``) or "Waiting for window confirm" (the child task needs
  the modal step: ``properties.finalPrompt``, ``remix: true``); 3 related task missing; 4
  validation ("关联任务状态错误" when the parent is not ``SUCCESS``).
- Task statuses ``NOT_START`` (waiting for a slot) -> ``SUBMITTED`` -> ``IN_PROGRESS``
  (progress ``"0%"``, ``"15%"`` ... ``"93%"``, a preview ``imageUrl``) -> ``SUCCESS`` |
  ``FAILURE`` (``failReason``, progress ``""``); ``MODAL`` while an action waits for
  ``/mj/submit/modal``. Times are epoch **milliseconds**.
- ``SUCCESS`` carries ``buttons`` ``[{customId, emoji, label, type, style}]`` with Discord
  component ids specific to the task: on a grid ``MJ::JOB::upsample::N::<hash>`` (U1-U4),
  ``MJ::JOB::reroll::0::<hash>::SOLO``, ``MJ::JOB::variation::N::<hash>`` (V1-V4); on an
  upscale ``MJ::JOB::upsample_v6_2x_{subtle,creative}::1::<hash>::SOLO``,
  ``MJ::JOB::{high,low}_variation::1::<hash>::SOLO``, ``MJ::Inpaint::1::<hash>::SOLO``,
  ``MJ::Outpaint::{50,75}::1::<hash>::SOLO`` (zoom out), ``MJ::CustomZoom::<hash>``,
  ``MJ::JOB::pan_{left,right,up,down}::1::<hash>::SOLO`` and ``MJ::BOOKMARK::<hash>`` (❤️,
  not an action); on a describe ``MJ::Job::PicReader::N`` and ``MJ::Job::PicReader::all``
  (not an action). Grids are 2x2 PNGs whose quadrant N has the colour of
  ``media.png("<task id>:N")``; ``upsample::N`` yields that quadrant as one image.
- Modal step: custom zoom (the modal prompt needs ``--zoom`` 1-2), vary region (needs
  ``maskBase64``) and describe's PicReader always; reroll / variation / vary / pan when the
  account has remix on (``remix_mode``) or the action says ``enableRemix: true`` (how plus
  reads that flag is UNCONFIRMED). An empty modal prompt reuses the task's prompt.
- ``describe`` results: the suggested prompts ("1️⃣ ...\\n\\n2️⃣ ...") in
  ``properties.finalPrompt`` and ``promptEn``; ``imageUrl`` is the input image.
- ``notifyHook``: an unsigned POST of the whole task object (as the proxy holds it: raw
  image URL, ``progress ""`` on failure) on every status/progress change, never backwards,
  one attempt, no retry. Only hints: they run ahead of the gateway's stored row.
- A task still running ``proxy_task_timeout_seconds`` after it started fails "任务超时".

**The gateway** (new-api) answers reads from its own row, refreshed on its tick (see
``gateway.py``; new-api's MJ loop runs every 15 s):

- Auth ``Authorization: Bearer sk-...``, or ``mj-api-secret`` when Authorization is empty or
  literally ``midjourney-proxy``; 401 OpenAI-style body. Each key sees only its own tasks.
- ``GET /mj/task/{id}/fetch`` -> the row (all keys present; ``customId``, ``botType``,
  ``maskBase64`` never filled; ``properties`` only ``finalPrompt``/``finalZhPrompt``); until
  the first tick ``status ""``, ``progress "0%"``, ``buttons null``; ``FAILURE`` forced to
  ``"100%"``. Unknown/foreign id -> 400 ``{"description":"task_no_found ","type":
  "upstream_error","code":4}``.
- ``POST /mj/task/list-by-condition {"ids": [...]}`` -> a bare JSON array of the caller's
  rows in row order (unknown ids omitted).
- ``imageUrl`` becomes ``{origin}/mj/image/{id}`` (plus ``?rand=`` until ``SUCCESS``) with
  ``forward_image_url`` (new-api's default); that route streams the proxy's file without
  auth, answers 400 ``midjourney_task_not_found`` for unknown ids and passes the CDN's 404
  through once the file expired. Without forwarding the raw, expiring CDN URL is returned.
- ``rewrite_codes``: new-api rewrites submit code 22 -> 1 and 21 -> 1 (except for INPAINT and
  CUSTOM_ZOOM), so a MODAL child may come back as code 1.
- Gateway errors ``{"description","type":"upstream_error","code"}``: 400 code 4, or 429
  code 30 "当前分组负载已饱和..." (injected 429s).

Directives (in the prompt; an action inherits its parent's, a modal prompt brings its own):
``[sim:fail]`` / ``[sim:fail=<reason>]`` FAILURE; ``[sim:stuck]`` runs until the proxy
timeout; ``[sim:banned=<word>]`` code 24; ``[sim:queue_full]`` code 23; ``[sim:queue=S]``
(SUBMITTED seconds), ``[sim:run=S]``.

Fault route names: ``submit`` (every submit route), ``fetch``, ``list``, ``image``
(``/mj/image``), ``download`` (CDN files).

``SimConfig.extra``: ``gateway_tick_seconds`` (0.25), ``concurrency`` (3; read when the simulator
starts), ``queue_size``
(10), ``remix_mode`` (false), ``rewrite_codes`` (false), ``forward_image_url`` (true),
``notify_enabled`` (true; new-api strips ``notifyHook`` unless its admin enabled it),
``notify_timeout_seconds`` (5), ``proxy_task_timeout_seconds`` (300), ``banned_words`` ([]),
``repeat_upscale_exists`` (true), ``trueai_http_status`` (false).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import heapq
import json
import re
import secrets
import struct
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, directives
from providers.sandbox.gateway import NewApiGateway, Snapshot, read_json_object

DISCORD_INSTANCE = "1118138338562560102"
PROGRESS_STEPS = (0, 15, 31, 46, 62, 78, 93)
SATURATED = "当前分组负载已饱和，请稍后再试，或升级账户以提升服务质量。"
DIMENSIONS = {"SQUARE": (64, 64), "PORTRAIT": (64, 96), "LANDSCAPE": (96, 64)}
BOT_TYPES = ("MID_JOURNEY", "NIJI_JOURNEY")
DATA_URL = re.compile(r"^data:(image/[\w.+-]+);base64,(.+)$", re.S)
ZOOM = re.compile(r"--zoom\s+([0-9.]+)")
NUMBERS = ("1️⃣", "2️⃣", "3️⃣", "4️⃣")


@dataclass(frozen=True)
class Act:
    """What a button does when sent to ``/mj/submit/action``."""

    action: str  # the child task's action (new-api's names)
    output: str  # "grid", "single" (one quadrant / one image) or "upscale2x"
    modal: str  # "never", "always", or "remix" (only with remix on)
    index: int
    label: str  # for the child's description ("/up <parent> U2")


def _colour(seed: str) -> bytes:
    """The colour media.png gives ``seed`` (first three bytes of its sha256)."""
    return hashlib.sha256(seed.encode()).digest()[:3]


def grid_png(seeds: list[str], width: int, height: int) -> bytes:
    """A 2x2 grid PNG: quadrant N (1 top-left, 2 top-right, 3, 4) coloured like media.png(seeds[N-1])."""
    colours = [_colour(s) for s in seeds]
    half_w, half_h = width // 2, height // 2
    raw = b"".join(
        b"\x00" + colours[0 if y < half_h else 2] * half_w + colours[1 if y < half_h else 3] * (width - half_w)
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _button(custom_id: str, emoji: str, label: str) -> dict[str, Any]:
    return {"customId": custom_id, "emoji": emoji, "label": label, "type": 2, "style": 2}


Buttons = list[tuple[dict[str, Any], Act | None]]  # each button with what it does (None: not an action)


def grid_buttons(h: str) -> Buttons:
    out: Buttons = [(_button(f"MJ::JOB::upsample::{i}::{h}", "", f"U{i}"),
                     Act("UPSCALE", "single", "never", i, f"U{i}")) for i in range(1, 5)]
    out.append((_button(f"MJ::JOB::reroll::0::{h}::SOLO", "🔄", ""), Act("REROLL", "grid", "remix", 0, "R")))
    out += [(_button(f"MJ::JOB::variation::{i}::{h}", "", f"V{i}"), Act("VARIATION", "grid", "remix", i, f"V{i}"))
            for i in range(1, 5)]
    return out


def upscale_buttons(h: str) -> Buttons:
    out: Buttons = [
        (_button(f"MJ::JOB::upsample_v6_2x_{kind}::1::{h}::SOLO", "", f"Upscale ({kind.title()})"),
         Act("UPSCALE", "upscale2x", "never", 1, f"Upscale ({kind.title()})")) for kind in ("subtle", "creative")
    ]
    out += [
        (_button(f"MJ::JOB::high_variation::1::{h}::SOLO", "🪄", "Vary (Strong)"),
         Act("HIGH_VARIATION", "grid", "remix", 1, "Vary (Strong)")),
        (_button(f"MJ::JOB::low_variation::1::{h}::SOLO", "🪄", "Vary (Subtle)"),
         Act("LOW_VARIATION", "grid", "remix", 1, "Vary (Subtle)")),
        (_button(f"MJ::Inpaint::1::{h}::SOLO", "🖌️", "Vary (Region)"),
         Act("INPAINT", "grid", "always", 1, "Vary (Region)")),
        (_button(f"MJ::Outpaint::50::1::{h}::SOLO", "🔍", "Zoom Out 2x"),
         Act("ZOOM", "grid", "never", 1, "Zoom Out 2x")),
        (_button(f"MJ::Outpaint::75::1::{h}::SOLO", "🔍", "Zoom Out 1.5x"),
         Act("ZOOM", "grid", "never", 1, "Zoom Out 1.5x")),
        (_button(f"MJ::CustomZoom::{h}", "🔍", "Custom Zoom"), Act("CUSTOM_ZOOM", "grid", "always", 1, "Custom Zoom")),
    ]
    out += [(_button(f"MJ::JOB::pan_{d}::1::{h}::SOLO", e, ""), Act("PAN", "grid", "remix", 1, f"pan_{d}"))
            for d, e in (("left", "⬅️"), ("right", "➡️"), ("up", "⬆️"), ("down", "⬇️"))]
    out.append((_button(f"MJ::BOOKMARK::{h}", "❤️", ""), None))
    return out


def describe_buttons() -> Buttons:
    out: Buttons = [
        (_button(f"MJ::Job::PicReader::{i}", "", str(i)), Act("IMAGINE", "grid", "always", i, f"PicReader {i}"))
        for i in range(1, 5)
    ]
    out.append((_button("MJ::Job::PicReader::all", "🎉", "Imagine all"), None))
    return out


def suggested_prompts(image: bytes) -> str:
    shade = hashlib.sha256(image).hexdigest()[:6]
    styles = ("minimalist flat colour field", "in the style of colour-field painting",
              "soft studio light, matte texture", "abstract square composition")
    return "\n\n".join(f"{n} a #{shade} square, {s} --ar 1:1" for n, s in zip(NUMBERS, styles, strict=True))


def _decode_data_url(value: Any) -> tuple[bytes, str] | None:
    if not isinstance(value, str):
        return None
    m = DATA_URL.match(value.strip())
    if m is None:
        return None
    try:
        return base64.b64decode(m.group(2), validate=True), m.group(1)
    except (binascii.Error, ValueError):
        return None


def _ms(t: float) -> int:
    return int(t * 1000)


class MidjourneySimulator(NewApiGateway):
    """A new-api gateway in front of a midjourney-proxy-plus with one Discord account."""

    name = "midjourney"
    platform = "midjourney"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.slots = [0.0] * max(1, int(self.config.extra.get("concurrency", 3)))  # heap of free-at times
        self._notify_tasks: set[asyncio.Task[None]] = set()
        self.notify_log: list[dict[str, Any]] = []

    # -- config --------------------------------------------------------------
    def _x(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    @property
    def timeout_seconds(self) -> float:
        """new-api's 24 h sweep does not apply to Midjourney rows (the proxy times tasks out)."""
        return 0.0

    # -- wire format -----------------------------------------------------------
    def mj_error(self, status: int, description: str, code: int = 4,
                 headers: dict[str, str] | None = None) -> Response:
        return JSONResponse({"description": description, "type": "upstream_error", "code": code},
                            status_code=status, headers=headers)

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        if status == 429:
            return self.mj_error(429, f"{message} {SATURATED}", 30, headers)
        return self.mj_error(status, f"{message} ", 4, headers)

    def reply(self, code: int, description: str, result: str | None = None,
              properties: dict[str, Any] | None = None, action: str = "") -> Response:
        """A proxy submit answer, as the gateway passes it on."""
        rewritten = code == 22 or (code == 21 and action not in ("INPAINT", "CUSTOM_ZOOM"))
        if rewritten and self._x("rewrite_codes", False):
            code = 1
        status = 200
        if self._x("trueai_http_status", False):
            status = {3: 404, 4: 400, 24: 400}.get(code, 200)
        body = {"code": code, "description": description, "result": result, "properties": properties or {}}
        return JSONResponse(body, status_code=status)

    # -- routes ----------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/mj/submit/imagine", self.imagine, methods=["POST"]),
            Route("/mj/submit/blend", self.blend, methods=["POST"]),
            Route("/mj/submit/describe", self.describe, methods=["POST"]),
            Route("/mj/submit/action", self.action, methods=["POST"]),
            Route("/mj/submit/modal", self.modal, methods=["POST"]),
            Route("/mj/insight-face/swap", self.swap, methods=["POST"]),
            Route("/mj/task/{task_id}/fetch", self.fetch, methods=["GET"]),
            Route("/mj/task/list-by-condition", self.list_by_condition, methods=["POST"]),
            Route("/mj/image/{task_id}", self.image, methods=["GET"]),
        ]

    async def _begin(self, request: Request) -> tuple[int, dict[str, Any]] | Response:
        user = self.authenticate(request)
        if isinstance(user, Response):
            return user
        if (injected := await self.fault("submit")) is not None:
            return injected
        body = await read_json_object(request)
        if body is None:
            return self.mj_error(400, "bind_request_body_failed ")
        return user, body

    def _banned(self, prompt: str) -> str | None:
        forced = directives(prompt).get("banned")
        if forced is not None:
            return forced or "nude"
        words = [str(w).lower() for w in self._x("banned_words", [])]
        return next((w for w in words if re.search(rf"\b{re.escape(w)}\b", prompt.lower())), None)

    # -- the proxy's queue -------------------------------------------------------
    def _busy_seconds(self, task: SimTask) -> float:
        """How long the task holds a slot (SUBMITTED + IN_PROGRESS)."""
        if task.outcome == "stuck":
            return task.queue_seconds + float(self._x("proxy_task_timeout_seconds", 300.0))
        return task.queue_seconds + task.run_seconds

    def _admit(self, task: SimTask, at: float) -> int | None:
        """Queue ``task`` for a slot at ``at``: how many wait (itself included; 0 = a slot is free),
        or ``None`` when the wait queue is full."""
        waiting = sum(1 for t in self.tasks.values()
                      if t.data.get("admitted") is not None and t.data["admitted"] <= at < t.data["start"])
        if self.slots[0] > at and waiting >= int(self._x("queue_size", 10)):
            return None
        start = max(at, heapq.heappop(self.slots))
        heapq.heappush(self.slots, start + self._busy_seconds(task))
        task.data["admitted"], task.data["start"] = at, start
        return waiting + 1 if start > at else 0

    # -- the proxy's view of a task ---------------------------------------------
    def _marks(self, task: SimTask) -> tuple[float, float, float] | None:
        """(start, running, finish) once the task is queued at the proxy; None while in MODAL."""
        if task.data.get("admitted") is None:
            return None
        start = float(task.data["start"])
        return start, start + task.queue_seconds, start + self._busy_seconds(task)

    def _step_times(self, task: SimTask, running: float, finish: float) -> list[float]:
        n = len(PROGRESS_STEPS)
        return [t for i in range(n) if (t := running + task.run_seconds * i / n) < finish]

    def _state(self, task: SimTask, at: float) -> tuple[str, str]:
        marks = self._marks(task)
        if marks is None or at < task.data["admitted"]:
            return ("MODAL" if task.data["modal"] else "NOT_START"), "0%"
        start, running, finish = marks
        if at < start:
            return "NOT_START", "0%"
        if at < running:
            return "SUBMITTED", "0%"
        if at < finish:
            steps = self._step_times(task, running, finish)
            return "IN_PROGRESS", f"{PROGRESS_STEPS[sum(1 for t in steps if t <= at) - 1]}%"
        return ("SUCCESS", "100%") if task.outcome not in ("fail", "stuck") else ("FAILURE", "")

    def _publish(self, task: SimTask, key: str, data: bytes, name: str) -> str:
        files: dict[str, str] = task.data.setdefault("files", {})
        if key not in files:
            marks = self._marks(task)
            finish = marks[2] if marks else time.time()
            ttl = max(0.0, finish + self.config.output_ttl_seconds - time.time())
            files[key] = self.files.publish(data, "image/png", name, ttl=ttl)
        return task.data["origin"] + files[key]

    def _result_image(self, task: SimTask) -> str:
        output = task.data["output"]
        if output == "describe":
            return str(task.data["input_image"])
        if output == "grid":
            w, h = task.data["dims"]
            data = grid_png([f"{task.id}:{i}" for i in range(1, 5)], w, h)
        else:
            side = 128 if output == "upscale2x" else 64
            data = media.png(task.data["seed"], side, side)
        return self._publish(task, "result", data, f"{task.data['hash']}.png")

    def proxy_object(self, task: SimTask, at: float) -> dict[str, Any]:
        """The task as the proxy holds it at ``at`` (what ``notifyHook`` receives)."""
        status, progress = self._state(task, at)
        marks = self._marks(task)
        image: str | None = None
        if status == "IN_PROGRESS" and progress != "0%" and task.data["output"] != "describe":
            image = self._publish(task, "preview", media.png("preview:" + task.id, 16, 16),
                                  f"preview_{task.data['hash']}.png")
        elif status == "SUCCESS":
            image = self._result_image(task)
        fail_reason = None
        if status == "FAILURE":
            fail_reason = "任务超时" if task.outcome == "stuck" else task.data["fail_reason"]
        props: dict[str, Any] = {"discordInstanceId": DISCORD_INSTANCE, "finalPrompt": task.data["promptEn"]}
        if task.data.get("notify"):
            props["notifyHook"] = task.data["notify"]
        return {
            "id": task.id, "action": task.data["action"], "botType": task.data["botType"],
            "prompt": task.data["prompt"], "promptEn": task.data["promptEn"],
            "description": task.data["description"], "state": task.data["state"],
            "submitTime": task.data["submit_ms"],
            "startTime": _ms(marks[0]) if marks and status not in ("MODAL", "NOT_START") else None,
            "finishTime": _ms(marks[2]) if marks and status in ("SUCCESS", "FAILURE") else None,
            "imageUrl": image, "status": status, "progress": progress, "failReason": fail_reason,
            "properties": props,
            "buttons": [b for b, _ in task.data["buttons"]] if status == "SUCCESS" else [],
        }

    # -- the gateway's row -------------------------------------------------------
    def upstream(self, task: SimTask, at: float) -> Snapshot | None:
        obj = self.proxy_object(task, at)
        return Snapshot(obj["status"], at, obj)

    def initial(self, task: SimTask) -> Snapshot:
        return Snapshot("", task.created_at, None, progress="0%")

    def row(self, task: SimTask, origin: str) -> dict[str, Any]:
        """``MidjourneyDto`` of the gateway's stored row (every key, no omitempty)."""
        up = self.view(task).data
        if up is None:  # as inserted at submit, before the gateway's first poll
            return {"id": task.id, "action": task.data["action"], "customId": "", "botType": "",
                    "prompt": task.data["request_prompt"], "promptEn": "",
                    "description": task.data["submit_description"], "state": "",
                    "submitTime": task.data["submit_ms"], "startTime": 0, "finishTime": 0, "imageUrl": "",
                    "videoUrl": "", "videoUrls": None, "status": "", "progress": "0%", "failReason": "",
                    "buttons": None, "maskBase64": "", "properties": None}
        image = up["imageUrl"] or ""
        if image and self._x("forward_image_url", True):
            image = f"{origin}/mj/image/{task.id}"
            if up["status"] != "SUCCESS":
                image += f"?rand={time.time_ns()}"
        return {
            "id": task.id, "action": up["action"], "customId": "", "botType": "",
            "prompt": task.data["request_prompt"], "promptEn": up["promptEn"],
            "description": up["description"], "state": up["state"] or "",
            "submitTime": up["submitTime"], "startTime": up["startTime"] or 0,
            "finishTime": up["finishTime"] or 0, "imageUrl": image, "videoUrl": "", "videoUrls": None,
            "status": up["status"], "progress": "100%" if up["status"] == "FAILURE" else up["progress"],
            "failReason": up["failReason"] or "", "buttons": up["buttons"], "maskBase64": "",
            "properties": {"finalPrompt": up["properties"]["finalPrompt"], "finalZhPrompt": ""},
        }

    # -- creating tasks ------------------------------------------------------------
    def new_mj_id(self) -> str:
        """The proxy's ids: epoch milliseconds and three random digits."""
        while (task_id := f"{int(time.time() * 1000)}{secrets.randbelow(1000):03d}") in self.tasks:
            continue
        return task_id

    def _new_task(self, request: Request, body: dict[str, Any], *, action: str, prompt: str, output: str,
                  description: str, task_id: str | None = None, modal: bool = False, **data: Any) -> SimTask:
        task_id = task_id or self.new_mj_id()
        hook = body.get("notifyHook")
        notify = hook if isinstance(hook, str) and hook and self._x("notify_enabled", True) else None
        bot = body.get("botType") if body.get("botType") in BOT_TYPES else "MID_JOURNEY"
        task = SimTask.create(task_id, self.config, prompt, input=body)
        h = str(uuid.uuid4())
        buttons = (describe_buttons() if output == "describe" else grid_buttons(h) if output == "grid"
                   else upscale_buttons(h))
        task.data.update({
            "action": action, "output": output, "prompt": prompt, "promptEn": prompt,
            "request_prompt": str(body.get("prompt") or "") if action != "DESCRIBE" else "",
            "description": description, "state": body.get("state"),
            "botType": bot, "notify": notify, "hash": h, "buttons": buttons,
            "acts": {b["customId"]: act for b, act in buttons}, "submit_ms": _ms(task.created_at),
            "origin": self.origin(request), "modal": modal, "admitted": None, "dims": (64, 64),
            "fail_reason": directives(prompt).get("fail") or "[Invalid parameter] Invalid value",
            "children": {}, **data,
        })
        return task

    async def _launch(self, task: SimTask, user: int, identity: str) -> Response:
        """Queue a new task at the proxy (codes 1/22/23), store it and count one creation."""
        ahead = None if "queue_full" in directives(task.data["prompt"]) else self._admit(task, task.created_at)
        if ahead is None:
            return self.reply(23, "队列已满，请稍后尝试", None, {"discordInstanceId": DISCORD_INSTANCE})
        self._store(task, user, identity, "提交成功" if not ahead else f"排队中，前面还有{ahead}个任务")
        if (injected := await self.fault("submit", after_effect=True)) is not None:
            return injected
        if not ahead:
            return self.reply(1, "提交成功", task.id, {"discordInstanceId": DISCORD_INSTANCE})
        return self.reply(22, task.data["submit_description"], task.id,
                          {"discordInstanceId": DISCORD_INSTANCE, "numberOfQueues": ahead})

    def _store(self, task: SimTask, user: int, identity: str, description: str) -> None:
        task.data["submit_description"] = description
        self.add_task(task, user)
        self.record_creation(identity)
        self._schedule_notify(task)

    # -- submit routes -----------------------------------------------------------------
    async def imagine(self, request: Request) -> Response:
        begun = await self._begin(request)
        if isinstance(begun, Response):
            return begun
        user, body = begun
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return self.reply(4, "prompt不能为空")
        if (word := self._banned(prompt)) is not None:
            return self.reply(24, "可能包含敏感词", None, {"promptEn": prompt, "bannedWord": word})
        task = self._new_task(request, body, action="IMAGINE", prompt=prompt, output="grid",
                              description=f"/imagine {prompt}")
        return await self._launch(task, user, "IMAGINE:" + json.dumps(body, sort_keys=True))

    async def blend(self, request: Request) -> Response:
        begun = await self._begin(request)
        if isinstance(begun, Response):
            return begun
        user, body = begun
        images = body.get("base64Array")
        if not isinstance(images, list) or not 2 <= len(images) <= 5:
            return self.reply(4, "base64List参数错误")
        if any(_decode_data_url(i) is None for i in images):
            return self.reply(4, "base64格式错误")
        dims = body.get("dimensions") or "SQUARE"
        if dims not in DIMENSIONS:
            return self.reply(4, "dimensions参数错误")
        task_id = self.new_mj_id()
        task = self._new_task(request, body, action="BLEND", prompt="", output="grid", task_id=task_id,
                              description=f"/blend {task_id} {len(images)}", dims=DIMENSIONS[dims])
        return await self._launch(task, user, "BLEND:" + json.dumps(body, sort_keys=True))

    async def describe(self, request: Request) -> Response:
        begun = await self._begin(request)
        if isinstance(begun, Response):
            return begun
        user, body = begun
        link = body.get("link")
        if not body.get("base64") and not (isinstance(link, str) and link):
            return self.reply(4, "base64不能为空")
        decoded = _decode_data_url(body.get("base64")) if body.get("base64") else None
        if body.get("base64") and decoded is None:
            return self.reply(4, "base64格式错误")
        image = decoded[0] if decoded else str(link).encode()
        text = suggested_prompts(image)
        task_id = self.new_mj_id()
        task = self._new_task(request, body, action="DESCRIBE", prompt=text, output="describe", task_id=task_id,
                              description=f"/describe {task_id}.png")
        task.data["input_image"] = (task.data["origin"] + self.files.publish(image, decoded[1], f"{task.id}.png")
                                    if decoded else link)
        return await self._launch(task, user, "DESCRIBE:" + hashlib.sha256(image).hexdigest())

    async def swap(self, request: Request) -> Response:
        begun = await self._begin(request)
        if isinstance(begun, Response):
            return begun
        user, body = begun
        if not (body.get("sourceBase64") or body.get("sourceUrl")) or not (body.get("targetBase64")
                                                                           or body.get("targetUrl")):
            return self.reply(4, "参数错误")
        task = self._new_task(request, body, action="SWAP_FACE", prompt="", output="single",
                              description="/swap", seed="swap:" + json.dumps(body, sort_keys=True))
        task.data["buttons"], task.data["acts"] = [], {}
        return await self._launch(task, user, "SWAP_FACE:" + json.dumps(body, sort_keys=True))

    async def action(self, request: Request) -> Response:
        begun = await self._begin(request)
        if isinstance(begun, Response):
            return begun
        user, body = begun
        parent_id, custom_id = body.get("taskId"), body.get("customId")
        if not isinstance(parent_id, str) or not isinstance(custom_id, str) or not parent_id or not custom_id:
            return self.reply(4, "参数错误")
        parent = self.own_task(parent_id, user)
        if parent is None:
            return self.reply(3, "关联任务不存在或已失效")
        if self._state(parent, time.time())[0] != "SUCCESS":
            return self.reply(4, "关联任务状态错误")
        acts: dict[str, Act | None] = parent.data["acts"]
        if custom_id not in acts:
            return self.reply(4, "customId参数错误")
        act = acts[custom_id]
        if act is None:
            return self.reply(4, "不支持的操作")
        existing = self.tasks.get(parent.data["children"].get(custom_id, ""))
        if (act.action == "UPSCALE" and existing is not None and self._x("repeat_upscale_exists", True)
                and self._state(existing, time.time())[0] != "FAILURE"):
            now_obj = self.proxy_object(existing, time.time())
            return self.reply(21, "任务已存在", existing.id,
                              {"status": now_obj["status"], "imageUrl": now_obj["imageUrl"]}, act.action)
        prompt = parent.data["promptEn"]
        if parent.data["output"] == "describe":
            prompt = prompt.split("\n\n")[act.index - 1].split(" ", 1)[1]
        remix = bool(self._x("remix_mode", False)) or body.get("enableRemix") is True
        modal = act.modal == "always" or (act.modal == "remix" and remix)
        seed = f"{parent.id}:{act.index}" if act.output == "single" else str(parent.data.get("seed", parent.id))
        task = self._new_task(request, body, action=act.action, prompt=prompt, output=act.output,
                              description=f"/up {parent.id} {act.label}", modal=modal, seed=seed,
                              dims=parent.data["dims"])
        task.data["request_prompt"] = ""
        task.data["botType"] = parent.data["botType"]
        parent.data["children"][custom_id] = task.id
        identity = f"{act.action}:{parent.id}:{custom_id}"
        if not modal:
            return await self._launch(task, user, identity)
        self._store(task, user, identity, "Waiting for window confirm")
        if (injected := await self.fault("submit", after_effect=True)) is not None:
            return injected
        return self.reply(21, "Waiting for window confirm", task.id, {"finalPrompt": prompt, "remix": True},
                          act.action)

    async def modal(self, request: Request) -> Response:
        begun = await self._begin(request)
        if isinstance(begun, Response):
            return begun
        user, body = begun
        task_id = body.get("taskId")
        if not isinstance(task_id, str) or not task_id:
            return self.reply(4, "参数错误")
        task = self.own_task(task_id, user)
        if task is None:
            return self.reply(3, "关联任务不存在或已失效")
        if not task.data["modal"] or task.data["admitted"] is not None:
            return self.reply(4, "关联任务状态错误")
        given = body.get("prompt")
        prompt = given if isinstance(given, str) and given.strip() else task.data["prompt"]
        action = task.data["action"]
        if (word := self._banned(prompt)) is not None:
            return self.reply(24, "可能包含敏感词", None, {"promptEn": prompt, "bannedWord": word})
        zoom = ZOOM.search(prompt)
        if action == "CUSTOM_ZOOM" and (zoom is None or not 1.0 <= _float(zoom.group(1)) <= 2.0):
            return self.reply(4, "参数错误: --zoom 1-2")
        if action == "INPAINT" and not body.get("maskBase64"):
            return self.reply(4, "maskBase64不能为空")
        fresh = SimTask.create(task.id, self.config, prompt)
        task.outcome, task.queue_seconds, task.run_seconds = fresh.outcome, fresh.queue_seconds, fresh.run_seconds
        now = time.time()
        ahead = None if "queue_full" in directives(prompt) else self._admit(task, now)
        if ahead is None:
            return self.reply(23, "队列已满，请稍后尝试", None, {"discordInstanceId": DISCORD_INSTANCE})
        task.data.update(prompt=prompt, promptEn=prompt,
                         fail_reason=directives(prompt).get("fail") or task.data["fail_reason"])
        hook = body.get("notifyHook")
        if isinstance(hook, str) and hook and self._x("notify_enabled", True):
            task.data["notify"] = hook
        self._schedule_notify(task, since=now)
        if not ahead:
            return self.reply(1, "提交成功", task.id, {"discordInstanceId": DISCORD_INSTANCE})
        return self.reply(22, f"排队中，前面还有{ahead}个任务", task.id,
                          {"discordInstanceId": DISCORD_INSTANCE, "numberOfQueues": ahead})

    # -- read routes --------------------------------------------------------------------
    async def fetch(self, request: Request) -> Response:
        user = self.authenticate(request)
        if isinstance(user, Response):
            return user
        if (injected := await self.fault("fetch")) is not None:
            return injected
        task = self.own_task(request.path_params["task_id"], user)
        if task is None:
            return self.mj_error(400, "task_no_found ")
        return JSONResponse(self.row(task, self.origin(request)))

    async def list_by_condition(self, request: Request) -> Response:
        user = self.authenticate(request)
        if isinstance(user, Response):
            return user
        if (injected := await self.fault("list")) is not None:
            return injected
        body = await read_json_object(request)
        ids = body.get("ids") if body is not None else None
        if body is None or (ids is not None and not isinstance(ids, list)):
            return self.mj_error(400, "bind_request_body_failed ")
        found = [t for i in dict.fromkeys(x for x in (ids or []) if isinstance(x, str))
                 if (t := self.own_task(i, user)) is not None]
        found.sort(key=lambda t: int(t.data["row_id"]))
        origin = self.origin(request)
        return JSONResponse([self.row(t, origin) for t in found])

    async def image(self, request: Request) -> Response:
        """new-api's image proxy: no auth, streams the proxy's current image."""
        if (injected := await self.fault("image")) is not None:
            return injected
        task = self.tasks.get(request.path_params["task_id"])
        if task is None:
            return JSONResponse({"error": "midjourney_task_not_found"}, status_code=400)
        up = self.view(task).data
        url = str(up["imageUrl"] or "") if up else ""
        if not url:
            return JSONResponse({"error": "http_get_image_failed"}, status_code=500)
        stored = self.files.get(url.removeprefix(task.data["origin"]))
        if stored is None:
            return JSONResponse({"error": "Not Found"}, status_code=404)
        return Response(stored.data, media_type=stored.content_type)

    # -- notifyHook --------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Cancel notifications still pending (call before the event loop closes)."""
        pending = list(self._notify_tasks)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _notify_times(self, task: SimTask, since: float) -> list[float]:
        marks = self._marks(task)
        if marks is None:
            return [task.created_at]  # entering MODAL
        start, running, finish = marks
        return [t for t in (start, *self._step_times(task, running, finish), finish) if t >= since]

    def _schedule_notify(self, task: SimTask, since: float | None = None) -> None:
        if not task.data.get("notify"):
            return
        times = self._notify_times(task, task.created_at if since is None else since)
        t = asyncio.get_running_loop().create_task(self._run_notify(task, times))
        self._notify_tasks.add(t)
        t.add_done_callback(self._notify_tasks.discard)

    async def _run_notify(self, task: SimTask, times: list[float]) -> None:
        sent = task.data.setdefault("notified", [])
        async with self.callback_client(float(self._x("notify_timeout_seconds", 5.0))) as client:
            for when in times:
                await asyncio.sleep(max(0.0, when - time.time()))
                body = self.proxy_object(task, when)
                key = [body["status"], body["progress"]]
                if sent and sent[-1] == key:
                    continue
                sent.append(key)
                status: int | None = None
                try:
                    resp = await client.post(str(task.data["notify"]), content=json.dumps(body).encode(),
                                             headers={"content-type": "application/json"})
                    status = resp.status_code
                except httpx.HTTPError:
                    pass
                self.notify_log.append({"task": task.id, "status": body["status"], "progress": body["progress"],
                                        "http_status": status})


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return -1.0
