"""Replicate predictions API (https://replicate.com/docs/reference/http).

* ``model`` is ``owner/name`` (official model: ``POST /v1/models/{owner}/{name}/predictions``)
  or ``owner/name:<64-hex version>`` / a bare version id (``POST /v1/predictions``).
* Statuses ``starting`` (queued), ``processing`` (running), ``succeeded``,
  ``failed``, ``canceled`` and ``aborted`` (deadline before start). Anything else
  is non-terminal and logged.
* ``output`` is any JSON; every HTTPS or ``data:`` URL in it is an output file.
  Files are removed an hour after an API prediction finishes (``data_removed``).
* Progress comes from tqdm lines in ``logs`` (as the official client parses them).
* A finished prediction's ``metrics.predict_time`` (billed hardware seconds) is its ``usage``.
"""

from __future__ import annotations

import binascii
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from providers.contract import (
    CallbackHint,
    CallContext,
    GenerationRequest,
    MediaKind,
    Provider,
    ProviderOutput,
    ProviderSettings,
    SubmitResult,
    TaskRef,
    TaskStatus,
)
from providers.errors import (
    CallbackRejected,
    InvalidInput,
    MalformedResponse,
    OutcomeUnknown,
    ProviderError,
    Rejected,
)
from providers.http import expect_object, parse_json, raise_for_common_status, send
from providers.usage import amount, usage

log = logging.getLogger(__name__)

_MODEL = re.compile(r"^[a-z0-9][a-z0-9_.-]*/[a-z0-9][a-z0-9_.-]*$", re.IGNORECASE)
_VERSIONED = re.compile(r"^(?:[a-z0-9][a-z0-9_.-]*/[a-z0-9][a-z0-9_.-]*:)?[0-9a-f]{64}$", re.IGNORECASE)
# Pages of GET /v1/predictions a reconcile reads at most (100 predictions each).
MAX_RECONCILE_PAGES = 50
_TQDM = re.compile(r"^\s*(\d+)%\s*\|.+?\|\s*(\d+)/(\d+)", re.MULTILINE)

_STATES = {
    "starting": "queued",
    "processing": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "canceled": "canceled",
    "aborted": "canceled",
}
_FINISHED = frozenset(raw for raw, state in _STATES.items() if state in ("succeeded", "failed", "canceled"))

# Common input names -> the names most Replicate models use.
_FIELD_NAMES = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "image_url": "image",
    "duration_seconds": "duration",
    "aspect_ratio": "aspect_ratio",
    "resolution": "resolution",
    "seed": "seed",
    "num_outputs": "num_outputs",
}


def replicate_input(job_input: Any) -> dict[str, Any]:
    """Map the common input fields, then lay the native ``options`` over them."""
    data = job_input.fields()
    mapped: dict[str, Any] = {}
    for common, value in data.items():
        if common == "duration_seconds" and float(value).is_integer():
            value = int(value)
        mapped[_FIELD_NAMES[common]] = value
    mapped.update(job_input.options)
    return mapped


def output_urls(output: Any) -> list[str]:
    """Every file URL in a prediction's ``output`` (a string, a list, or nested objects)."""
    if isinstance(output, str):
        return [output] if output.startswith(("https://", "http://", "data:")) else []
    if isinstance(output, list):
        return [u for item in output for u in output_urls(item)]
    if isinstance(output, dict):
        return [u for item in output.values() for u in output_urls(item)]
    return []


def tqdm_progress(logs: Any) -> int | None:
    if not isinstance(logs, str):
        return None
    matches = _TQDM.findall(logs)
    return min(100, int(matches[-1][0])) if matches else None


class ReplicateProvider(Provider):
    name = "replicate"
    default_base_url = "https://api.replicate.com"
    default_typical_seconds = {"image": 8, "video": 90, "audio": 40}
    kinds = frozenset({MediaKind.image, MediaKind.video, MediaKind.audio})
    supports_cancel = True
    supports_callbacks = True
    callback_auth = "signature"
    retention = "1 hour (API predictions: inputs, outputs and files are deleted)"

    def __init__(self, settings: ProviderSettings) -> None:
        super().__init__(settings)
        self._host = urlsplit(self.base_url).hostname or ""
        self._fetched_secret: str | None = None

    def validate(self, request: GenerationRequest) -> None:
        super().validate(request)
        if not (_MODEL.match(request.model) or _VERSIONED.match(request.model)):
            raise InvalidInput("model", "Replicate models are 'owner/name', 'owner/name:<version id>' "
                                        "or a 64-character version id")
        for key in request.input.options:
            if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
                raise InvalidInput(f"input.options.{key}", "Replicate input names are identifiers")

    def _headers(self, ctx: CallContext) -> dict[str, str]:
        return {"Authorization": f"Bearer {ctx.api_key}", "User-Agent": "atelier"}

    async def submit(self, ctx: CallContext, request: GenerationRequest) -> SubmitResult:
        body: dict[str, Any] = {"input": replicate_input(request.input)}
        if _VERSIONED.match(request.model):
            url = f"{self.base_url}/v1/predictions"
            body["version"] = request.model
        else:
            url = f"{self.base_url}/v1/models/{request.model}/predictions"
        if ctx.callback_url:
            body["webhook"] = ctx.callback_url
            body["webhook_events_filter"] = ["start", "completed"]
        response = await send(ctx.http, ctx.http.build_request("POST", url, json=body, headers=self._headers(ctx)),
                              creates=True)
        if response.status_code in (404, 422):
            detail = _problem(response)
            raise Rejected(f"Replicate refused the prediction: {detail.get('detail') or detail}",
                           code="model_not_found" if response.status_code == 404 else "provider_rejected_input",
                           detail=detail, status_code=response.status_code)
        raise_for_common_status(response, creates=True, detail=_problem(response))
        prediction = expect_object(parse_json(response), "prediction")
        task_id = prediction.get("id")
        if not isinstance(task_id, str) or not task_id:
            raise MalformedResponse("Replicate created a prediction without an id", detail=prediction)
        raw = prediction.get("status")
        # A prediction already finished when created (a fast model, a cached answer): its status is in this
        # answer, so the worker applies it at once instead of scheduling a poll that would only read it again.
        done = self.parse_prediction(prediction) if raw in _FINISHED else None
        return SubmitResult(task_id=task_id, status=str(raw), done=done)

    async def fetch(self, ctx: CallContext, task: TaskRef) -> TaskStatus:
        url = f"{self.base_url}/v1/predictions/{task.task_id}"
        response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
        raise_for_common_status(response, detail=_problem(response))
        return self.parse_prediction(expect_object(parse_json(response), "prediction"))

    def parse_prediction(self, prediction: dict[str, Any]) -> TaskStatus:
        raw = prediction.get("status")
        if not isinstance(raw, str):
            raise MalformedResponse("Replicate prediction has no status", detail=prediction)
        state = _STATES.get(raw)
        if state is None:
            log.warning("replicate: unknown prediction status %r; treating as still running", raw)
        status = TaskStatus(state=state or "unknown", raw_status=raw,  # type: ignore[arg-type]
                            progress=tqdm_progress(prediction.get("logs")))
        if state == "succeeded":
            urls = output_urls(prediction.get("output"))
            if not urls:
                removed = prediction.get("data_removed")
                status.state = "failed"
                status.error_code = "output_expired" if removed else "provider_no_output"
                status.error_message = ("Replicate removed the outputs before they were collected"
                                        if removed else "Replicate reported success without output files")
                status.error_detail = {"data_removed": removed}
            status.outputs = [ProviderOutput(url=u) for u in urls]
            status.progress = 100
        elif state == "failed":
            status.error_code = "provider_failed"
            status.error_message = str(prediction.get("error") or "Replicate reported the prediction failed")
            status.error_detail = {"error": prediction.get("error")}
        elif state == "canceled":
            status.error_code = "provider_canceled" if raw == "canceled" else "provider_aborted"
            status.error_message = f"Replicate reports the prediction {raw}"
        metrics = prediction.get("metrics")
        if state in ("succeeded", "failed", "canceled") and isinstance(metrics, dict):
            # Billed hardware time (absent for an aborted prediction, which never ran).
            status.usage = usage(compute_seconds=amount(metrics.get("predict_time")))
        return status

    async def cancel(self, ctx: CallContext, task: TaskRef) -> bool:
        url = f"{self.base_url}/v1/predictions/{task.task_id}/cancel"
        response = await send(ctx.http, ctx.http.build_request("POST", url, headers=self._headers(ctx)))
        raise_for_common_status(response, detail=_problem(response))
        return True

    async def reconcile(self, ctx: CallContext, request: GenerationRequest, since: float) -> SubmitResult | None:
        """Look for a prediction with exactly our input, created since the attempt began, on every
        page of the window (newest first: a busy account can put the match past the first 100)."""
        after = datetime.fromtimestamp(since, UTC) - timedelta(seconds=5)
        url: str | None = f"{self.base_url}/v1/predictions"
        params: dict[str, str] | None = {"created_after": after.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}
        wanted = replicate_input(request.input)
        model = request.model.split(":")[0]
        for _ in range(MAX_RECONCILE_PAGES):
            if url is None:
                return None
            response = await send(ctx.http, ctx.http.build_request("GET", url, params=params,
                                                                     headers=self._headers(ctx)))
            raise_for_common_status(response, detail=_problem(response))
            page = expect_object(parse_json(response), "prediction list")
            for prediction in page.get("results") or []:
                if not isinstance(prediction, dict):
                    continue
                same_model = _VERSIONED.match(request.model) or prediction.get("model") in (model, None)
                if prediction.get("input") == wanted and same_model and isinstance(prediction.get("id"), str):
                    return SubmitResult(task_id=prediction["id"], status=str(prediction.get("status")))
            url, params = self._next_page(page.get("next")), None
        raise OutcomeUnknown(f"more than {MAX_RECONCILE_PAGES} pages of predictions since the submission; "
                             "Atelier stopped looking")

    def _next_page(self, link: Any) -> str | None:
        """The ``next`` link, if it stays on the API host our key belongs to."""
        if not isinstance(link, str) or not link:
            return None
        if (urlsplit(link).hostname or "") != self._host:
            log.warning("replicate: a 'next' link to another host was not followed")
            return None
        return link

    async def verify_callback(self, ctx: CallContext, headers: Mapping[str, str], body: bytes) -> CallbackHint:
        """Replicate signs webhooks per Standard Webhooks with the account's ``whsec_`` secret."""
        secret = await self._webhook_secret(ctx)
        stamp = next((v for k, v in headers.items() if k.lower() == "webhook-timestamp"), "")
        if not stamp.isdigit() or len(stamp) > 12:
            raise CallbackRejected("Replicate webhook timestamp is missing or not a Unix time")
        try:
            # The reference implementation of Standard Webhooks (5 minutes' tolerance).
            prediction = Webhook(secret).verify(body, dict(headers))
        except (WebhookVerificationError, ValueError, binascii.Error) as exc:  # bad base64, bad JSON, ...
            raise CallbackRejected("Replicate webhook signature, timestamp or body did not verify") from exc
        if not isinstance(prediction, dict) or not isinstance(prediction.get("id"), str):
            raise CallbackRejected("Replicate webhook body is not a prediction")
        return CallbackHint(task_id=prediction["id"], raw_status=str(prediction.get("status")))

    async def _webhook_secret(self, ctx: CallContext) -> str:
        """From settings, else fetched once with the API key (``GET /v1/webhooks/default/secret``)."""
        configured = self.settings.extra.get("webhook_secret")
        if configured:
            return str(configured)
        if self._fetched_secret is None:
            url = f"{self.base_url}/v1/webhooks/default/secret"
            try:
                response = await send(ctx.http, ctx.http.build_request("GET", url, headers=self._headers(ctx)))
                raise_for_common_status(response)
                key = expect_object(parse_json(response), "webhook secret").get("key")
            except ProviderError as exc:
                raise CallbackRejected(f"cannot obtain Replicate's webhook secret: {exc.message}") from exc
            if not isinstance(key, str):
                raise CallbackRejected("Replicate returned no webhook secret")
            self._fetched_secret = key
        return self._fetched_secret

    def download_headers(self, ctx: CallContext, url: str) -> dict[str, str]:
        host = urlsplit(url).hostname or ""
        if host == self._host or host == "replicate.delivery" or host.endswith(".replicate.delivery"):
            return self._headers(ctx)
        return {}


def _problem(response: httpx.Response) -> dict[str, Any]:
    """Replicate errors are problem+json (``title``, ``detail``, ``status``)."""
    if response.status_code < 400:
        return {}
    try:
        body = response.json()
    except ValueError:
        return {"body": response.text[:300]}
    return body if isinstance(body, dict) else {"body": body}
