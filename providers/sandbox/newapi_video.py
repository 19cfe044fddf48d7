"""new-api unified video tasks (``/v1/video/generations``) for any model a gateway routes.

Written from shared/providers replicate-fal-suno-gateways.md §4.1 and video-wave2.md §8 (the
n1n gateway's video formats), with the upstream bodies of video-wave2.md §2-§6 and
video-sora-veo-kling-runway.md §2, not from our adapter. The tick clock, timeout sweep, auth,
error envelopes and ``TaskDto`` come from ``gateway.py`` (a new-api gateway never runs a job:
it stores a row per task and refreshes it from the upstream on each tick, 15 s in new-api).

- ``POST /v1/video/generations`` (JSON or ``multipart/form-data``; ``model*, prompt*, image,
  images[], duration`` (number or string) | ``seconds``, ``size``, ``metadata{}``) -> 200 with
  the OpenAI video object ``{"id","task_id","object":"video","model","status":"queued",
  "progress":0,"created_at"}`` and header ``X-New-Api-Other-Ratios`` — or, with the
  ``openapi_doc`` envelope, new-api's published ``{"task_id","status":"queued"}`` (no ``id``).
  Any model is routed (``models`` restricts); an empty one gets new-api's 503 "无可用渠道".
- ``GET /v1/video/generations/{task_id}`` in the envelope chosen by ``envelope`` (or by model
  through ``envelopes_by_model``; ``auto``: ``realtime`` for Veo/Gemini models, else
  ``task_dto``). Where the media is:

  ========================  =================================================  ================
  ``task_dto`` (code)       ``{"code":"success","message":"","data":<TaskDto>}``  ``result_url``
  ``legacy_dto`` (2025-04)  envelope + TaskDto without ``result_url``          raw ``data``
  ``realtime`` (Gemini)     envelope + ``{error,format,metadata,status,task_id,url}``  ``url``
  ``openapi_doc``           bare ``{task_id,status,url,format,metadata,error}``  ``url``
  ``sora_doc``              bare ``{id,status,progress,video_url,metadata,error}``  ``video_url``
  ``openai_video``          bare OpenAI video object                            ``metadata.url``
  ========================  =================================================  ================

- Stored statuses ``NOT_START`` (or ``initial_status``, e.g. ``""``) until the gateway's first
  tick, then ``SUBMITTED``/``QUEUED`` -> ``IN_PROGRESS`` -> ``SUCCESS`` | ``FAILURE``, with
  new-api's default progress ``0% / 10% / 20% / 30% / 100%``. The OpenAI-style envelopes map
  them with ``ToVideoStatus``: ``queued``, ``in_progress``, ``completed``, ``failed`` and
  **``unknown``** for ``NOT_START``/``""`` (a client must treat it as queued). ``realtime``
  reads the upstream live (no tick lag): ``queued``, ``processing``, ``succeeded``,
  ``failed``. Only the top-level status is reliable: after the timeout sweep ``data`` keeps
  the stale upstream body.
- ``TaskDto.data`` is the raw upstream body of the model's family (``platform`` its new-api
  channel type): Kling ``data.task_result.videos[].url`` (50), MiniMax Hailuo (35, a
  ``file_id`` only: the URL came from ``/files/retrieve``), Doubao Seedance
  ``content.video_url`` (54), Wan/DashScope ``output.video_url`` (17), Vidu
  ``creations[].url`` (52), Jimeng ``data.video_url`` (51), Grok ``video.url`` (48), Veo
  ``response.generateVideoResponse.generatedSamples[].video.uri`` (24); other models an
  illustrative ``{id,status,video_url,error}`` (1). On failure ``fail_reason`` is the
  upstream's message and ``result_url`` falls back to it (new-api's ``GetResultURL``).
- Outputs are real H.264 MP4s (``media.mp4``) at URLs that stop working
  ``output_ttl_seconds`` after the task finished. No cancel route, no callbacks.
- Errors: task errors ``{"code","message","data":null}`` (400 ``invalid_request``, 403
  ``quota_not_enough``, 429 with every message rewritten to "当前分组上游负载已饱和，请稍后再试",
  400 ``task_not_exist`` for unknown or foreign ids), auth errors OpenAI-style (401).

Directives (in the prompt): ``[sim:fail]`` / ``[sim:fail=<reason>]`` upstream failure;
``[sim:moderated]`` the family's moderation failure (Veo: ``raiMediaFiltered*`` with no error,
Grok: ``done`` without a URL); ``[sim:stuck]`` runs until the sweep; ``[sim:lost]`` the
upstream never answers (``NOT_START`` until the sweep); ``[sim:saturated]`` submit 429;
``[sim:quota]`` submit 403; ``[sim:rejected]`` the upstream refuses the submit (400
``fail_to_fetch_task`` carrying its body); ``[sim:queue=S]``, ``[sim:run=S]``.

Fault route names: ``submit``, ``fetch``, ``download``.

``SimConfig.extra``: ``envelope`` ("auto"), ``envelopes_by_model`` ({}), ``initial_status``
("NOT_START"; "" is UNCONFIRMED for video, new-api stores it for Midjourney),
``models`` (None = any), and ``gateway.py``'s ``gateway_tick_seconds`` (0.25),
``gateway_task_timeout_seconds`` (86400), ``public_task_ids`` (true).
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox.base import SimTask, directives
from providers.sandbox.gateway import (
    VIDEO_PROGRESS,
    VIDEO_STATUS,
    NewApiGateway,
    Snapshot,
    View,
    read_form_fields,
    read_json_object,
)

ENVELOPES = ("task_dto", "legacy_dto", "realtime", "openapi_doc", "sora_doc", "openai_video")
REALTIME_STATUS = {"queued": "queued", "running": "processing", "succeeded": "succeeded"}
CHINA = timezone(timedelta(hours=8))

Body = Callable[[SimTask, str, str, str], dict[str, Any]]
"""Raw upstream poll body: (task, stage, video url, failure reason); stage is queued, running,
succeeded, failed or moderated."""


def _ms(t: float) -> int:
    return int(t * 1000)


def _changed(task: SimTask, stage: str) -> float:
    return {"queued": task.created_at, "running": task.started_at}.get(stage, task.finished_at)


def _rid(task: SimTask, stage: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"{task.id}:{stage}"))


def kling_body(task: SimTask, stage: str, url: str, reason: str) -> dict[str, Any]:
    data: dict[str, Any] = {
        "task_id": task.data["upstream_id"],
        "task_status": {"queued": "submitted", "running": "processing", "succeeded": "succeed"}.get(stage, "failed"),
        "task_status_msg": reason, "task_info": {"external_task_id": ""},
        "created_at": _ms(task.created_at), "updated_at": _ms(_changed(task, stage)),
    }
    if stage == "succeeded":
        data["task_result"] = {"videos": [{"id": _rid(task, "video"), "url": url,
                                           "duration": str(task.data["seconds"])}]}
    return {"code": 0, "message": "SUCCEED", "request_id": _rid(task, stage), "data": data}


def hailuo_body(task: SimTask, stage: str, url: str, reason: str) -> dict[str, Any]:
    done = stage == "succeeded"
    width, height = task.data["dims"]
    return {"task_id": task.data["upstream_id"],
            "status": {"queued": "Queueing", "running": "Processing", "succeeded": "Success"}.get(stage, "Fail"),
            "file_id": str(int(task.data["upstream_id"]) + 1) if done else "",
            "video_width": width if done else 0, "video_height": height if done else 0,
            "base_resp": {"status_code": {"failed": 1000, "moderated": 1027}.get(stage, 0),
                          "status_msg": reason or "success"}}


def doubao_body(task: SimTask, stage: str, url: str, reason: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": task.data["upstream_id"], "model": task.data["model"],
        "status": {"queued": "queued", "running": "running", "succeeded": "succeeded"}.get(stage, "failed"),
        "error": None, "created_at": int(task.created_at), "updated_at": int(_changed(task, stage)),
    }
    if stage in ("failed", "moderated"):
        code = "OutputVideoSensitiveContentDetected" if stage == "moderated" else "InternalServiceError"
        body["error"] = {"code": code, "message": reason}
    if stage == "succeeded":
        body.update(content={"video_url": url}, usage={"completion_tokens": 108900, "total_tokens": 108900},
                    seed=int(task.data["row_id"]), resolution="720p", ratio="16:9",
                    duration=task.data["seconds"], framespersecond=24)
    return body


def _china(t: float) -> str:
    """DashScope's task times: Beijing time, no zone, milliseconds."""
    return datetime.fromtimestamp(t, CHINA).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def wan_body(task: SimTask, stage: str, url: str, reason: str) -> dict[str, Any]:
    output: dict[str, Any] = {
        "task_id": task.data["upstream_id"],
        "task_status": {"queued": "PENDING", "running": "RUNNING", "succeeded": "SUCCEEDED"}.get(stage, "FAILED"),
        "submit_time": _china(task.created_at),
    }
    if stage != "queued":
        output["scheduled_time"] = _china(task.started_at)
    if stage not in ("queued", "running"):
        output["end_time"] = _china(task.finished_at)
    body: dict[str, Any] = {"request_id": _rid(task, stage), "output": output}
    if stage == "succeeded":
        prompt = str(task.input.get("prompt") or "")
        output.update(video_url=url, orig_prompt=prompt, actual_prompt=prompt)
        width, height = task.data["dims"]
        body["usage"] = {"video_count": 1, "video_duration": task.data["seconds"], "video_ratio": f"{width}*{height}"}
    elif stage in ("failed", "moderated"):
        output.update(code="DataInspectionFailed" if stage == "moderated" else "InternalError", message=reason)
    return body


def vidu_body(task: SimTask, stage: str, url: str, reason: str) -> dict[str, Any]:
    creations = []
    if stage == "succeeded":
        creations = [{"id": str(int(task.data["upstream_id"]) + 1), "url": url, "cover_url": "",
                      "watermarked_url": url}]
    return {"id": task.data["upstream_id"],
            "state": {"queued": "queueing", "running": "processing", "succeeded": "success"}.get(stage, "failed"),
            "err_code": reason, "credits": 20, "payload": "", "bgm": False, "off_peak": False,
            "creations": creations}


def jimeng_body(task: SimTask, stage: str, url: str, reason: str) -> dict[str, Any]:
    if stage in ("failed", "moderated"):
        code = 50511 if stage == "moderated" else 50500
        return {"code": code, "data": None, "message": reason, "request_id": _rid(task, stage), "status": code,
                "time_elapsed": "18.2ms"}
    data: dict[str, Any] = {"status": {"queued": "in_queue", "running": "generating"}.get(stage, "done"),
                            "video_url": url}
    if stage == "succeeded":
        data["aigc_meta_tagged"] = True
    return {"code": 10000, "data": data, "message": "Success", "request_id": _rid(task, stage), "status": 10000,
            "time_elapsed": "21.7ms"}


def grok_body(task: SimTask, stage: str, url: str, reason: str) -> dict[str, Any]:
    if stage in ("queued", "running"):
        return {"status": "pending"}
    if stage == "succeeded":
        return {"status": "done", "video": {"url": url, "duration": task.data["seconds"], "respect_moderation": True},
                "model": task.data["model"], "usage": {"cost_in_usd_ticks": 500000000}, "progress": 100}
    if stage == "moderated":  # xAI: "done" without a URL
        return {"status": "done", "video": {"duration": 0, "respect_moderation": False}, "model": task.data["model"]}
    return {"status": "failed", "video": {"duration": 0, "respect_moderation": True}, "model": "",
            "error": {"code": "internal_error", "message": reason}}


def veo_body(task: SimTask, stage: str, url: str, reason: str) -> dict[str, Any]:
    name = f"models/{task.data['model']}/operations/{task.data['upstream_id']}"
    if stage == "queued":
        return {"name": name}
    if stage == "running":
        return {"name": name, "done": False}
    if stage == "failed":
        return {"name": name, "done": True, "error": {"code": 13, "message": reason}}
    kind = "type.googleapis.com/google.ai.generativelanguage.v1beta.PredictLongRunningResponse"
    result: dict[str, Any] = {"generatedSamples": [{"video": {"uri": url}}]}
    if stage == "moderated":  # "succeeded" with no video and no error object
        result = {"raiMediaFilteredCount": 1, "raiMediaFilteredReasons": [reason]}
    return {"name": name, "done": True, "response": {"@type": kind, "generateVideoResponse": result}}


def generic_body(task: SimTask, stage: str, url: str, reason: str) -> dict[str, Any]:
    return {"id": task.data["upstream_id"],
            "status": {"queued": "queued", "running": "processing", "succeeded": "completed"}.get(stage, "failed"),
            "video_url": url or None, "error": {"message": reason} if reason else None}


def _numeric_id() -> str:
    return str(secrets.randbelow(9 * 10**17) + 10**17)


@dataclass(frozen=True)
class Family:
    """One kind of upstream channel behind the gateway."""

    platform: str  # new-api channel type, as TaskDto.platform shows it
    queued: str  # the stored status while the upstream queues the task
    body: Body
    new_id: Callable[[], str]
    failure: str
    moderation: str


FAMILIES: dict[str, Family] = {
    "kling": Family("50", "SUBMITTED", kling_body, _numeric_id, "Image pixel is invalid (simulated)",
                    "Failure to pass the risk control system"),
    "hailuo": Family("35", "QUEUED", hailuo_body, _numeric_id, "unknown error (simulated)",
                     "output video sensitive"),
    "doubao": Family("54", "QUEUED", doubao_body,
                     lambda: time.strftime("cgt-%Y%m%d%H%M%S-") + secrets.token_hex(3)[:5],
                     "The service encountered an unexpected internal error (simulated).",
                     "The request failed because the output video may contain sensitive information."),
    "wan": Family("17", "QUEUED", wan_body, lambda: str(uuid.uuid4()), "Internal error (simulated).",
                  "Output data may contain inappropriate content."),
    "vidu": Family("52", "QUEUED", vidu_body, _numeric_id, "InternalServiceFailure", "CreationPolicyViolation"),
    "jimeng": Family("51", "QUEUED", jimeng_body, lambda: str(secrets.randbelow(9 * 10**18) + 10**18),
                     "Internal Error", "Post Img Risk Not Pass"),
    "grok": Family("48", "QUEUED", grok_body, lambda: str(uuid.uuid4()), "Video generation failed",
                   "video withheld by moderation (respect_moderation: false)"),
    "veo": Family("24", "QUEUED", veo_body, lambda: secrets.token_hex(6),
                  "Video generation failed due to an internal error (simulated).",
                  "We encountered an issue with the audio for your prompt. You have not been charged for this "
                  "attempt."),
    "generic": Family("1", "QUEUED", generic_body, lambda: "video_" + secrets.token_hex(12),
                      "video generation failed (simulated)", "content policy violation (simulated)"),
}
PREFIXES = (("kling", "kling"), ("minimax", "hailuo"), ("hailuo", "hailuo"), ("doubao", "doubao"),
            ("seedance", "doubao"), ("wan", "wan"), ("vidu", "vidu"), ("jimeng", "jimeng"), ("grok", "grok"),
            ("veo", "veo"), ("gemini", "veo"))


def family_of(model: str) -> str:
    lower = model.lower()
    return next((fam for prefix, fam in PREFIXES if lower.startswith(prefix)), "generic")


def _dims(size: Any) -> tuple[int, int]:
    """Pixels from ``size`` ("1280x720", "720*1280", "1080P"); 1280x720 by default."""
    text = str(size or "").lower().replace("*", "x")
    width, _, height = text.partition("x")
    if width.isdigit() and height.isdigit():
        return int(width), int(height)
    if text.rstrip("p").isdigit():
        lines = int(text.rstrip("p"))
        return lines * 16 // 9, lines
    return 1280, 720


class NewApiVideoSimulator(NewApiGateway):
    """A new-api gateway whose video channels serve whatever model is asked for."""

    name = "newapi"

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/video/generations", self.submit, methods=["POST"]),
            Route("/v1/video/generations/{task_id}", self.fetch, methods=["GET"]),
        ]

    def envelope(self, model: str) -> str:
        by_model: dict[str, str] = self.config.extra.get("envelopes_by_model", {})
        chosen = str(by_model.get(model) or self.config.extra.get("envelope", "auto"))
        if chosen == "auto":
            return "realtime" if family_of(model) == "veo" else "task_dto"
        return chosen if chosen in ENVELOPES else "task_dto"

    # -- submit ------------------------------------------------------------------
    async def submit(self, request: Request) -> Response:
        user = self.authenticate(request)
        if isinstance(user, Response):
            return user
        if (injected := await self.fault("submit")) is not None:
            return injected
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            body = await read_form_fields(request)
        else:
            body = await read_json_object(request)
        if body is None:
            return self.task_error(400, "invalid_request", "invalid request body")
        model = str(body.get("model") or "")
        served = self.config.extra.get("models")
        if not model or (served is not None and model not in served):
            return self.openai_error(503, f"当前分组 default 下对于模型 {model} 无可用渠道", "model_not_found")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return self.task_error(400, "invalid_request", "prompt is required")
        meta = body.get("metadata")
        if isinstance(meta, str):  # multipart forms carry metadata as a JSON string
            try:
                meta = json.loads(meta)
            except ValueError:
                return self.task_error(400, "invalid_request", "metadata must be a JSON object")
        meta = {k: v for k, v in meta.items() if k != "model"} if isinstance(meta, dict) else {}
        duration = body.get("duration") or body.get("seconds") or meta.get("duration") or 5
        try:
            seconds = int(float(duration))
        except (TypeError, ValueError):
            return self.task_error(400, "invalid_request", f"invalid duration: {duration!r}")
        images = body.get("images") if isinstance(body.get("images"), list) else []
        traps = directives(prompt)
        if "saturated" in traps:
            return self.task_error(429, "fail_to_fetch_task", "upstream 429")
        if "quota" in traps:
            return self.task_error(403, "quota_not_enough", "user quota is not enough")
        if "rejected" in traps:
            upstream = json.dumps({"code": "InvalidParameter", "message": "the parameter prompt is invalid"})
            return self.task_error(400, "fail_to_fetch_task", upstream)
        fam = family_of(model)
        upstream_id = FAMILIES[fam].new_id()
        task = SimTask.create(self.new_task_id(upstream_id), self.config, prompt, input=body)
        task.data.update(model=model, family=fam, upstream_id=upstream_id, seconds=seconds,
                         dims=_dims(body.get("size")), metadata=meta, quota=0, origin=self.origin(request),
                         action="generate" if body.get("image") or images or body.get("input_reference")
                         else "textGenerate",
                         fail_reason=traps.get("fail") or "")
        self.add_task(task, user)
        self.record_creation(json.dumps(body, sort_keys=True, default=str))
        if (injected := await self.fault("submit", after_effect=True)) is not None:
            return injected
        headers = {"X-New-Api-Other-Ratios": json.dumps({"seconds": seconds})}
        if self.envelope(model) == "openapi_doc":
            return JSONResponse({"task_id": task.id, "status": "queued"}, headers=headers)
        return JSONResponse({"id": task.id, "task_id": task.id, "object": "video", "model": model,
                             "status": "queued", "progress": 0, "created_at": int(task.created_at)},
                            headers=headers)

    # -- upstream ----------------------------------------------------------------
    def stage(self, task: SimTask, at: float) -> str:
        phase = task.phase(at)
        if phase == "queued":
            return "queued"
        if phase == "running" or task.outcome == "stuck":
            return "running"
        if task.outcome == "moderated":
            return "moderated"
        return "failed" if task.outcome == "fail" else "succeeded"

    def _video_url(self, task: SimTask) -> str:
        path = self.publish_once(task, "video", "mp4", f"newapi:{task.id}", f"{task.data['upstream_id']}.mp4")
        return str(task.data["origin"]) + path

    def upstream(self, task: SimTask, at: float) -> Snapshot | None:
        if task.outcome == "lost":
            return None
        fam = FAMILIES[task.data["family"]]
        stage = self.stage(task, at)
        reason = ""
        if stage in ("failed", "moderated"):
            reason = task.data["fail_reason"] if stage == "failed" and task.data["fail_reason"] else \
                fam.failure if stage == "failed" else fam.moderation
        url = self._video_url(task) if stage == "succeeded" else ""
        body = fam.body(task, stage, url, reason)
        started = self.observed_at(task, task.started_at)
        if stage == "queued":
            return Snapshot(fam.queued, task.created_at, body, progress=VIDEO_PROGRESS[fam.queued])
        if stage == "running":
            return Snapshot("IN_PROGRESS", task.started_at, body, start_time=started,
                            progress=VIDEO_PROGRESS["IN_PROGRESS"])
        finished = self.observed_at(task, task.finished_at)
        return Snapshot("SUCCESS" if stage == "succeeded" else "FAILURE", task.finished_at, body,
                        fail_reason=reason, result_url=url, start_time=started, finish_time=finished,
                        progress="100%")

    def initial(self, task: SimTask) -> Snapshot:
        status = str(self.config.extra.get("initial_status", "NOT_START"))
        body = FAMILIES[task.data["family"]].body(task, "queued", "", "")
        return Snapshot(status, task.created_at, body, progress="0%")

    # -- fetch -------------------------------------------------------------------
    async def fetch(self, request: Request) -> Response:
        user = self.authenticate(request)
        if isinstance(user, Response):
            return user
        if (injected := await self.fault("fetch")) is not None:
            return injected
        task = self.own_task(request.path_params["task_id"], user)
        if task is None:
            return self.task_error(400, "task_not_exist", "task_not_exist")
        envelope = self.envelope(task.data["model"])
        if envelope == "realtime":
            return self.success(self.realtime(task))
        view = self.view(task)
        if envelope == "task_dto":
            return self.success(self.task_dto(task, view))
        if envelope == "legacy_dto":
            return self.success({"task_id": task.id, "action": task.data["action"], "status": view.status,
                                 "fail_reason": view.fail_reason, "submit_time": int(task.created_at),
                                 "start_time": view.start_time, "finish_time": view.finish_time,
                                 "progress": view.progress, "data": view.data})
        return JSONResponse(self.openai_shapes(task, view, envelope))

    def task_dto(self, task: SimTask, view: View) -> dict[str, Any]:
        dto = super().task_dto(task, view)
        dto["platform"] = FAMILIES[task.data["family"]].platform  # the channel that served this model
        return dto

    def realtime(self, task: SimTask) -> dict[str, Any]:
        """Gemini/Vertex channels: new-api asks the upstream at fetch time (no tick lag)."""
        now = time.time()
        snap = self.upstream(task, now)
        if snap is None:  # the upstream does not answer for this task
            return {"error": None, "format": "mp4", "metadata": None, "status": "queued", "task_id": task.id,
                    "url": ""}
        error = {"code": "video_generation_failed", "message": snap.fail_reason} if snap.fail_reason else None
        return {"error": error, "format": "mp4", "metadata": None,
                "status": REALTIME_STATUS.get(self.stage(task, now), "failed"), "task_id": task.id,
                "url": snap.result_url}

    def openai_shapes(self, task: SimTask, view: View, envelope: str) -> dict[str, Any]:
        status = VIDEO_STATUS.get(view.status, "unknown")
        progress = int(view.progress.rstrip("%") or 0)
        error = {"code": "video_generation_failed", "message": view.fail_reason} if view.fail_reason else None
        width, height = task.data["dims"]
        if envelope == "openapi_doc":
            meta = {"duration": task.data["seconds"], "fps": 24, "width": width, "height": height,
                    "seed": int(task.data["row_id"])}
            return {"task_id": task.id, "status": status, "url": view.result_url, "format": "mp4",
                    "metadata": meta, "error": error}
        if envelope == "sora_doc":
            return {"id": task.id, "status": status, "progress": progress, "video_url": view.result_url or None,
                    "metadata": {"seconds": str(task.data["seconds"]), "size": f"{width}x{height}"},
                    "error": error}
        video: dict[str, Any] = {"id": task.id, "object": "video", "model": task.data["model"], "status": status,
                                 "progress": progress, "created_at": int(task.created_at),
                                 "seconds": str(task.data["seconds"]), "size": f"{width}x{height}"}
        if view.finish_time:
            video["completed_at"] = view.finish_time
        if view.result_url:
            video["metadata"] = {"url": view.result_url}
        if error:
            video["error"] = error
        return video
