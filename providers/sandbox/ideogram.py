"""Ideogram API simulator (the 3.0 routes, plus the V4 / v2 routes and their signed webhooks).

Written from Ideogram's documented wire format (shared/providers/images-wave2.md §0.3 and §2),
not from our adapter.

Synchronous routes (header ``Api-Key``; ``multipart/form-data``, and JSON on ``generate``; the
request is held ``run_seconds``, or ``[sim:run=S]``, while the images "render"):

- ``POST /v1/ideogram-v3/generate`` (``prompt``*), ``/remix`` (``image``*, ``prompt``*,
  ``image_weight`` 1-100), ``/reframe`` (``image``*, ``resolution``*), ``/replace-background``
  (``image``*, ``prompt``*), ``/inpaint`` and its legacy alias ``/edit`` (``image``*, ``mask``*
  of the image's size, ``prompt``*). Options: ``seed`` (0-2147483647), ``resolution`` (the
  69-value enum) **or** ``aspect_ratio`` (15 values, default ``1x1``), ``rendering_speed``,
  ``magic_prompt`` (``AUTO ON OFF``), ``negative_prompt``, ``num_images`` (1-8), ``style_type``,
  ``style_codes`` (8-hex codes; not with ``style_type`` or ``style_reference_images``),
  ``style_preset``, ``color_palette``, repeated ``style_reference_images`` /
  ``character_reference_images`` parts (JPEG/PNG/WebP, 10 MB each and in total).
- ``POST /v1/ideogram-v4/generate`` (``prompt``, ``seed``, ``magic_prompt_option``) and, without
  ``async``/``webhook_url``, ``POST /v2/image/{operation}/{model}`` (``generate``, ``remix``,
  ``inpaint``, ``reframe``, ``replace-background``; model ``ideogram-3`` / ``ideogram-4-5``).

Answer: ``{created: ISO string, data: [{url, prompt, resolution, is_image_safe, seed,
style_type}]}`` (V4/v2 add ``response_type: "url"``, v2 ``generation_id`` and ``seed``). URLs are
ephemeral, ``/api/images/ephemeral/<id>.png?exp=<unix>&sig=<hex>``, a real PNG (1/16 of the
resolution per side), 404 after ``output_ttl_seconds``. Magic Prompt (``ON``/``AUTO``) rewrites the
returned ``prompt``. An unsafe image is ``is_image_safe: false`` with ``url: null`` inside the 200.

Asynchronous routes: ``POST /v1/ideogram-v4/async/generate[?webhook_url=]`` (prompt in
``text_prompt`` or ``prompt``, the CONFLICT in §2.6) -> ``{generation_id}``; v2 routes with form
field ``async=true`` and/or ``webhook_url`` -> ``{generation_id, seed}``. Poll ``GET
/v1/generations/{id}`` or ``/v2/generations/{id}``: ``status`` ``pending`` -> ``completed`` (with
``response_type`` and ``data``) | ``failed``. When done, the poll body is POSTed to the webhook,
signed with Ed25519: headers ``X-Ideogram-Webhook-Generation-Id``, ``-User-Id``, ``-Timestamp``,
``-Key-Id`` and ``-Signature`` (lowercase hex) over
``"{generation_id}\\n{user_id}\\n{timestamp}\\n{sha256_hex(body)}"``; the public key is served at
``GET /v1/.well-known/jwks.json`` (OKP/Ed25519 JWK). Non-2xx deliveries are retried.

Errors (``{"error": ...}``; v2 402/429 add ``reject_reason`` and ``max_inflight_requests``): 400
naming the field, 401 bad key (403 on remix), 402 quota (``insufficient_funds``), 404 unknown
generation, 422 safety (``[sim:safety]`` or a word in ``extra["banned_words"]``), 429 when
``max_inflight`` requests (sync in flight plus pending async) are already running.

Prompt directives: ``[sim:run=S]`` (sync hold; async with ``[sim:queue=S]``), ``[sim:unsafe]``
every image unsafe, ``[sim:unsafe=N]`` the first N, ``[sim:safety]`` 422, ``[sim:fail]`` async
generation ``failed``. Each generation is counted in ``Stats.creations`` when it happens (before
any after-effect fault); ``images_billed`` counts its images.

``SimConfig.extra`` knobs: ``max_inflight`` (10), ``image_quota`` (None = unlimited images),
``banned_words`` ([]), ``rendering_speeds`` (with ``BALANCED``, the CONFLICT in §2.2),
``v4_prompt_fields`` (["text_prompt", "prompt"]), ``v2_models`` (["ideogram-3", "ideogram-4-5"]),
``user_id`` ("sim-user"), ``webhook_retries`` (3), ``webhook_retry_delay`` (1.0; schedule
UNCONFIRMED), ``webhook_duplicate`` (False), ``strict_webhook_urls`` (False: the real API wants
HTTPS on a public host, which a loopback test receiver is not).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from providers.sandbox import media
from providers.sandbox.base import SimConfig, SimTask, Simulator, StoredFile, directives, new_id
from providers.sandbox.stability import Form, FormError, image_size, parse_form

ASPECT_RATIOS = {"1x1": "1024x1024", "16x9": "1312x736", "9x16": "736x1312", "4x3": "1152x864",
                 "3x4": "864x1152", "3x2": "1248x832", "2x3": "832x1248", "16x10": "1280x800",
                 "10x16": "800x1280", "5x4": "1120x896", "4x5": "896x1120", "2x1": "1408x704",
                 "1x2": "704x1408", "3x1": "1536x512", "1x3": "512x1536"}
RESOLUTIONS = frozenset({
    "512x1536", "576x1408", "576x1472", "576x1536", "640x1344", "640x1408", "640x1472", "640x1536", "704x1152",
    "704x1216", "704x1280", "704x1344", "704x1408", "704x1472", "736x1312", "768x1088", "768x1216", "768x1280",
    "768x1344", "800x1280", "832x960", "832x1024", "832x1088", "832x1152", "832x1216", "832x1248", "864x1152",
    "896x960", "896x1024", "896x1088", "896x1120", "896x1152", "960x832", "960x896", "960x1024", "960x1088",
    "1024x832", "1024x896", "1024x960", "1024x1024", "1088x768", "1088x832", "1088x896", "1088x960", "1120x896",
    "1152x704", "1152x832", "1152x864", "1152x896", "1216x704", "1216x768", "1216x832", "1248x832", "1280x704",
    "1280x768", "1280x800", "1312x736", "1344x640", "1344x704", "1344x768", "1408x576", "1408x640", "1408x704",
    "1472x576", "1472x640", "1472x704", "1536x512", "1536x576", "1536x640"})
RENDERING_SPEEDS = ("FLASH", "TURBO", "BALANCED", "DEFAULT", "QUALITY")
MAGIC_PROMPT = ("AUTO", "ON", "OFF")
STYLE_TYPES = ("AUTO", "GENERAL", "REALISTIC", "DESIGN", "CUSTOM", "FICTION", "STYLIZED")
MAX_SEED = 2147483647
MAX_IMAGE = 10 * 1024 * 1024
SAFETY_MESSAGE = "Prompt provided failed safety check due to the inclusion of prohibited content."


@dataclass(frozen=True)
class Operation:
    """One image operation: its fault/route name and which inputs it requires."""

    name: str
    image: bool = False
    mask: bool = False
    prompt: bool = True
    sizable: bool = False  # takes resolution / aspect_ratio
    json_ok: bool = False


OPERATIONS = {
    "generate": Operation("generate", sizable=True, json_ok=True),
    "remix": Operation("remix", image=True, sizable=True),
    "reframe": Operation("reframe", image=True, prompt=False),
    "replace-background": Operation("replace_background", image=True),
    "inpaint": Operation("inpaint", image=True, mask=True),
    "edit": Operation("edit", image=True, mask=True),
}


class IdeogramError(Exception):
    def __init__(self, status: int, message: str, reject_reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reject_reason = reject_reason


@dataclass
class Spec:
    """A validated request: what to generate."""

    op: Operation
    prompt: str
    magic: str
    num_images: int
    seed: int
    resolution: str
    style_type: str
    identity: str
    directives: dict[str, str] = field(default_factory=dict)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()


class IdeogramSimulator(Simulator):
    name = "ideogram"

    def __init__(self, config: SimConfig | None = None) -> None:
        super().__init__(config)
        self.generations: dict[str, SimTask] = {}
        self.inflight = 0
        self._pending_until: list[float] = []  # end times of async generations still pending
        self.images_billed = 0
        self.webhooks_sent = 0
        self.signing_key = Ed25519PrivateKey.generate()
        self.key_id = "ideogram-sim-" + secrets.token_hex(4)
        self._url_secret = secrets.token_bytes(32)
        self._webhook_tasks: set[asyncio.Task[None]] = set()

    def _x(self, key: str, default: Any) -> Any:
        return self.config.extra.get(key, default)

    # -- wire format ---------------------------------------------------------------
    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> Response:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def error(self, err: IdeogramError, v2: bool = False) -> Response:
        body: dict[str, Any] = {"error": err.message}
        if v2 and err.reject_reason:
            body["reject_reason"] = err.reject_reason
            if err.reject_reason == "inflight_limit":
                body["max_inflight_requests"] = int(self._x("max_inflight", 10))
        return JSONResponse(body, status_code=err.status)

    def jwks(self) -> dict[str, Any]:
        raw = self.signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        x = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": self.key_id, "use": "sig",
                          "alg": "EdDSA"}]}

    # -- routes --------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/ideogram-v3/{operation}", self.v3, methods=["POST"]),
            Route("/v1/ideogram-v4/generate", self.v4_generate, methods=["POST"]),
            Route("/v1/ideogram-v4/async/generate", self.v4_async_generate, methods=["POST"]),
            Route("/v2/image/{operation}/{model}", self.v2, methods=["POST"]),
            Route("/v1/generations/{id}", self.poll, methods=["GET"]),
            Route("/v2/generations/{id}", self.poll, methods=["GET"]),
            Route("/v1/.well-known/jwks.json", self.get_jwks, methods=["GET"]),
            Route("/api/images/ephemeral/{name}", self.ephemeral, methods=["GET"]),
        ]

    def _auth(self, request: Request, status: int = 401) -> Response | None:
        if not self.config.key_ok(request.headers.get("api-key")):
            return self.error_response(status, "Invalid or missing Api-Key header")
        return None

    async def _form(self, request: Request, json_ok: bool) -> Form:
        body = await request.body()
        ctype = request.headers.get("content-type", "")
        if json_ok and ctype.lower().startswith("application/json"):
            try:
                data = json.loads(body)
            except ValueError as exc:
                raise IdeogramError(400, "Request body is not valid JSON") from exc
            if not isinstance(data, dict):
                raise IdeogramError(400, "Request body must be a JSON object")
            return Form.from_json(data)
        try:
            return parse_form(ctype, body)
        except FormError as exc:
            raise IdeogramError(400, f"{exc}" + ("" if json_ok else " (this route takes no JSON)")) from exc

    async def v3(self, request: Request) -> Response:
        op = OPERATIONS.get(request.path_params["operation"])
        if op is None:
            return self.error_response(404, "Not Found")
        if (denied := self._auth(request, 403 if op.name == "remix" else 401)) is not None:
            return denied
        return await self._sync(request, op, version="v3")

    async def v4_generate(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        return await self._sync(request, OPERATIONS["generate"], version="v4")

    async def v2(self, request: Request) -> Response:
        op = OPERATIONS.get(request.path_params["operation"])
        if op is None or op.name == "edit" or request.path_params["model"] not in self._x(
                "v2_models", ["ideogram-3", "ideogram-4-5"]):
            return self.error_response(404, "Not Found")
        if (denied := self._auth(request)) is not None:
            return denied
        return await self._sync(request, op, version="v2")

    async def _sync(self, request: Request, op: Operation, version: str) -> Response:
        v2 = version == "v2"
        if (injected := await self.fault(op.name)) is not None:
            return injected
        try:
            form = await self._form(request, op.json_ok)
            spec = self._validate(op, form, v4=version == "v4")
            if v2 and (form.text("async") == "true" or form.text("webhook_url")):
                return await self._submit(request, spec, form.text("webhook_url"), route=op.name, v2=True)
            self._admit(spec)
        except IdeogramError as err:
            return self.error(err, v2)
        self.inflight += 1
        try:
            await asyncio.sleep(float(spec.directives.get("run") or self.config.run_seconds))
        finally:
            self.inflight -= 1
        gen_id = _generation_id()
        self.record_creation(f"{op.name}:{spec.identity}")
        self.images_billed += spec.num_images
        data = self._images(gen_id, spec, self.origin(request))
        if (injected := await self.fault(op.name, after_effect=True)) is not None:
            return injected
        body: dict[str, Any] = {"created": _iso(time.time()), "data": data}
        if version != "v3":
            body["response_type"] = "url"
        if v2:
            body |= {"generation_id": gen_id, "seed": spec.seed}
        return JSONResponse(body)

    # -- validation ----------------------------------------------------------------
    def _validate(self, op: Operation, form: Form, v4: bool = False) -> Spec:
        prompt = ""
        names = self._x("v4_prompt_fields", ["text_prompt", "prompt"]) if v4 else ["prompt"]
        for name in names:
            prompt = form.text(name) or prompt
        if op.prompt and not prompt.strip():
            raise IdeogramError(400, f"{names[0]}: field required")
        seed = _int(form, "seed", 0, MAX_SEED)
        num_images = _int(form, "num_images", 1, 8) or 1
        magic = form.text("magic_prompt_option" if v4 else "magic_prompt") or "AUTO"
        if magic not in MAGIC_PROMPT:
            raise IdeogramError(400, f"magic_prompt: must be one of {', '.join(MAGIC_PROMPT)}")
        speed = form.text("rendering_speed")
        speeds = self._x("rendering_speeds", RENDERING_SPEEDS)
        if speed is not None and speed not in speeds:
            raise IdeogramError(400, f"rendering_speed: must be one of {', '.join(speeds)}")
        style_type = form.text("style_type")
        if style_type is not None and style_type not in STYLE_TYPES:
            raise IdeogramError(400, f"style_type: must be one of {', '.join(STYLE_TYPES)}")
        codes = [c.strip() for p in form.all("style_codes") for c in p.data.decode("utf-8", "replace").split(",")]
        if codes:
            if style_type is not None or form.part("style_reference_images") is not None:
                raise IdeogramError(400, "style_codes: cannot be used with style_type or style_reference_images")
            if not all(len(c) == 8 and all(ch in "0123456789abcdefABCDEF" for ch in c) for c in codes):
                raise IdeogramError(400, "style_codes: each code must be 8 hexadecimal characters")
        _int(form, "image_weight", 1, 100)
        size = _image(form, "image") if op.image else None
        if op.mask and _image(form, "mask") != size:
            raise IdeogramError(400, "mask: must have the same dimensions as image")
        resolution = self._resolution(op, form, size)
        total = 0
        for name in ("style_reference_images", "character_reference_images", "character_reference_images_mask"):
            for part in form.all(name):
                _check_image_part(name, part.data)
                total += len(part.data) if name == "style_reference_images" else 0
        if total > MAX_IMAGE:
            raise IdeogramError(400, "style_reference_images: at most 10MB in total")
        identity = hashlib.sha256(b"".join(p.name.encode() + p.data for p in form.parts)).hexdigest()
        return Spec(op, prompt, magic, num_images,
                    seed=secrets.randbelow(MAX_SEED + 1) if seed is None else seed, resolution=resolution,
                    style_type="GENERAL" if style_type in (None, "AUTO") else style_type, identity=identity,
                    directives=directives(prompt))

    def _resolution(self, op: Operation, form: Form, size: tuple[int, int] | None) -> str:
        """Reframe's required target, else ``resolution`` xor ``aspect_ratio``, else the input image's size."""
        resolution, ratio = form.text("resolution"), form.text("aspect_ratio")
        if op.name == "reframe" and resolution is None:
            raise IdeogramError(400, "resolution: field required")
        if not op.sizable and op.name != "reframe":
            assert size is not None
            return f"{size[0]}x{size[1]}"
        if resolution is not None and ratio is not None:
            raise IdeogramError(400, "resolution and aspect_ratio cannot both be set")
        if resolution is not None:
            if resolution not in RESOLUTIONS:
                raise IdeogramError(400, f"resolution: {resolution!r} is not a supported resolution")
            return resolution
        if ratio is not None and ratio not in ASPECT_RATIOS:
            raise IdeogramError(400, f"aspect_ratio: must be one of {', '.join(ASPECT_RATIOS)}")
        return ASPECT_RATIOS[ratio or "1x1"]

    def _admit(self, spec: Spec) -> None:
        """Refusals before generating: input moderation (422), quota (402), in-flight limit (429)."""
        banned = [w for w in self._x("banned_words", []) if w.lower() in spec.prompt.lower()]
        if "safety" in spec.directives or banned:
            raise IdeogramError(422, SAFETY_MESSAGE)
        quota = self._x("image_quota", None)
        if quota is not None and self.images_billed + spec.num_images > int(quota):
            raise IdeogramError(402, "Insufficient credits to complete this request", "insufficient_funds")
        if self.inflight + self._pending() >= int(self._x("max_inflight", 10)):
            raise IdeogramError(429, "Too many requests in flight; retry when one has finished", "inflight_limit")

    def _pending(self) -> int:
        now = time.time()
        self._pending_until = [t for t in self._pending_until if t > now]  # at most max_inflight long
        return len(self._pending_until)

    # -- images --------------------------------------------------------------------
    def _images(self, gen_id: str, spec: Spec, origin: str) -> list[dict[str, Any]]:
        """Store the images now (their URLs are short-lived) and describe them."""
        unsafe = spec.num_images if "unsafe" in spec.directives else 0
        if spec.directives.get("unsafe", "").isdigit():
            unsafe = min(spec.num_images, int(spec.directives["unsafe"]))
        prompt = spec.prompt
        if spec.op.prompt and spec.magic != "OFF":
            prompt = f"{spec.prompt.strip()}. A richly detailed composition with balanced, natural lighting."
        w, h = (int(v) for v in spec.resolution.split("x"))
        out = []
        for i in range(spec.num_images):
            url = None
            if i >= unsafe:
                url = self._publish(origin, media.png(f"ideogram:{gen_id}:{i}", max(1, w // 16), max(1, h // 16)))
            out.append({"url": url, "prompt": prompt, "resolution": spec.resolution, "is_image_safe": i >= unsafe,
                        "seed": spec.seed, "style_type": spec.style_type})
        return out

    def _publish(self, origin: str, data: bytes) -> str:
        name = secrets.token_urlsafe(16) + ".png"
        expires = time.time() + self.config.output_ttl_seconds
        self.files.files[f"/api/images/ephemeral/{name}"] = StoredFile(data, "image/png", expires)
        exp = int(expires) + 1
        return f"{origin}/api/images/ephemeral/{name}?exp={exp}&sig={self._sig(name, exp)}"

    def _sig(self, name: str, exp: int) -> str:
        return hmac.new(self._url_secret, f"{name}:{exp}".encode(), hashlib.sha256).hexdigest()

    async def ephemeral(self, request: Request) -> Response:
        if (injected := await self.fault("download")) is not None:
            return injected
        name = request.path_params["name"]
        exp = request.query_params.get("exp", "")
        sig = request.query_params.get("sig", "")
        f = self.files.get(f"/api/images/ephemeral/{name}")
        if f is None or not exp.isdigit() or not hmac.compare_digest(sig, self._sig(name, int(exp))):
            return self.expired_file_response()
        return Response(f.data, media_type=f.content_type)

    # -- asynchronous generations --------------------------------------------------
    async def v4_async_generate(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("submit")) is not None:
            return injected
        try:
            form = await self._form(request, json_ok=True)
            spec = self._validate(OPERATIONS["generate"], form, v4=True)
            return await self._submit(request, spec, request.query_params.get("webhook_url"), route="submit")
        except IdeogramError as err:
            return self.error(err)

    async def _submit(self, request: Request, spec: Spec, webhook: str | None, route: str,
                      v2: bool = False) -> Response:
        if webhook is not None:
            self._check_webhook_url(webhook)
        self._admit(spec)
        task = SimTask.create(_generation_id(), self.config, spec.prompt,
                              data={"spec": spec, "origin": self.origin(request)})
        self.generations[task.id] = task
        self._pending_until.append(task.finished_at)
        self.record_creation(f"{spec.op.name}:{spec.identity}")
        self.images_billed += spec.num_images
        if webhook:
            t = asyncio.get_running_loop().create_task(self._deliver_when_done(task, webhook))
            self._webhook_tasks.add(t)
            t.add_done_callback(self._webhook_tasks.discard)
        if (injected := await self.fault(route, after_effect=True)) is not None:
            return injected
        return JSONResponse({"generation_id": task.id, "seed": spec.seed} if v2 else {"generation_id": task.id})

    def _check_webhook_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > 2083:
            raise IdeogramError(400, "webhook_url: must be an absolute URL")
        if not self._x("strict_webhook_urls", False):
            return
        private = parts.hostname == "localhost"
        try:
            address = ipaddress.ip_address(parts.hostname)
            private = private or not address.is_global
        except ValueError:
            pass
        if parts.scheme != "https" or private:
            raise IdeogramError(400, "webhook_url: must be HTTPS on a public host")

    def generation(self, task: SimTask) -> dict[str, Any]:
        phase = task.phase()
        body: dict[str, Any] = {"generation_id": task.id, "created": _iso(task.created_at)}
        if phase in ("queued", "running"):
            return body | {"status": "pending"}
        if task.outcome == "fail":
            return body | {"status": "failed"}
        if "data" not in task.data:  # stored when first seen done, so the URL lifetime starts then
            task.data["data"] = self._images(task.id, task.data["spec"], task.data["origin"])
        return body | {"status": "completed", "response_type": "url", "data": task.data["data"]}

    async def poll(self, request: Request) -> Response:
        if (denied := self._auth(request)) is not None:
            return denied
        if (injected := await self.fault("poll")) is not None:
            return injected
        task = self.generations.get(request.path_params["id"])
        if task is None:
            return self.error_response(404, "Generation not found")
        return JSONResponse(self.generation(task))

    async def get_jwks(self, request: Request) -> Response:
        if (injected := await self.fault("jwks")) is not None:
            return injected
        return JSONResponse(self.jwks())

    def sign(self, generation_id: str, user_id: str, timestamp: str, body: bytes) -> str:
        msg = "\n".join([generation_id, user_id, timestamp, hashlib.sha256(body).hexdigest()]).encode()
        return self.signing_key.sign(msg).hex()

    async def _deliver_when_done(self, task: SimTask, url: str) -> None:
        while task.phase() != "done":
            await asyncio.sleep(max(0.01, min(0.25, task.finished_at - time.time())))
        raw = json.dumps(self.generation(task)).encode()
        async with self.callback_client(30.0) as client:
            for _ in range(2 if self._x("webhook_duplicate", False) else 1):
                await self._deliver(client, url, task.id, raw)

    async def _deliver(self, client: httpx.AsyncClient, url: str, generation_id: str, raw: bytes) -> None:
        user_id = str(self._x("user_id", "sim-user"))
        retries = int(self._x("webhook_retries", 3))
        for attempt in range(retries + 1):
            ts = str(int(time.time()))
            headers = {"content-type": "application/json", "x-ideogram-webhook-generation-id": generation_id,
                       "x-ideogram-webhook-user-id": user_id, "x-ideogram-webhook-timestamp": ts,
                       "x-ideogram-webhook-key-id": self.key_id,
                       "x-ideogram-webhook-signature": self.sign(generation_id, user_id, ts, raw)}
            try:
                resp = await client.post(url, content=raw, headers=headers)
                self.webhooks_sent += 1
                if 200 <= resp.status_code < 300:
                    return
            except httpx.HTTPError:
                pass
            if attempt < retries:
                await asyncio.sleep(float(self._x("webhook_retry_delay", 1.0)) * (attempt + 1))


def _generation_id() -> str:
    return base64.urlsafe_b64encode(secrets.token_bytes(18)).decode() + new_id(length=2)


def _int(form: Form, name: str, lo: int, hi: int) -> int | None:
    text = form.text(name)
    if text is None:
        return None
    if not text.strip().lstrip("-").isdigit() or not lo <= int(text) <= hi:
        raise IdeogramError(400, f"{name}: must be an integer from {lo} to {hi}")
    return int(text)


def _check_image_part(name: str, data: bytes) -> tuple[int, int]:
    if len(data) > MAX_IMAGE:
        raise IdeogramError(400, f"{name}: images must be at most 10MB")
    size = image_size(data)
    if size is None:
        raise IdeogramError(400, f"{name}: must be a JPEG, PNG or WebP image")
    return size


def _image(form: Form, name: str) -> tuple[int, int]:
    part = form.part(name)
    if part is None or not part.data:
        raise IdeogramError(400, f"{name}: field required")
    if part.filename is None:
        raise IdeogramError(400, f"{name}: must be a file upload")
    return _check_image_part(name, part.data)
