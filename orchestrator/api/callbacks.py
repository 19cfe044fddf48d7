"""``POST /v1/callbacks/{provider}``: provider callbacks in. Authenticated, and only hints.

A callback is verified by the provider's own signature (``callback_auth =
"signature"``) or by the per-job unguessable token we put in the callback URL
(``"token"``). A verified callback never sets the job's state: it pulls the
job's next status fetch forward to now (first in line on its key's poll
board), and the state applied is the one fetched. Duplicated, reordered,
late callbacks, and callbacks for unknown or finished jobs are acknowledged and change nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from orchestrator.api.deps import RuntimeDep
from orchestrator.api.problems import problem_response
from orchestrator.domain.job import Job
from orchestrator.domain.schedule import woken_rank
from orchestrator.infra import metrics
from orchestrator.store.jobs import Conflict
from orchestrator.wire.jobs import TERMINAL, JobStatus
from providers.contract import CallContext
from providers.errors import CallbackRejected

router = APIRouter(tags=["callbacks"])
log = logging.getLogger("atelier.callbacks")


# A signed callback is refused outside its 5-minute tolerance; inside it, one id is taken once.
REPLAY_WINDOW_SECONDS = 600


def _callback_id(request: Request, token: str, body: bytes) -> str:
    """Standard Webhooks' ``webhook-id`` where the provider sends one, else the token and the body."""
    webhook_id = request.headers.get("webhook-id")
    material = f"id:{webhook_id}".encode() if webhook_id else token.encode() + b"\n" + body
    return hashlib.sha256(material).hexdigest()[:32]


def _nothing_to_fetch(job: Job) -> str | None:
    """Why a callback for ``job`` wakes no status fetch, if it does not."""
    if job.status in TERMINAL:
        return "ignored: job already finished"
    if job.status not in (JobStatus.submitted, JobStatus.running) or job.phase == "collecting":
        return "ignored: nothing to fetch yet"
    return None


def _ack(outcome: str) -> JSONResponse:
    return JSONResponse({"status": outcome})


@router.post("/v1/callbacks/{provider}", response_model=None)
async def provider_callback(provider: str, request: Request, rt: RuntimeDep) -> JSONResponse:
    adapter = rt.registry.get(provider)
    if adapter is None or not adapter.supports_callbacks:
        return problem_response(404, "Not found", f"no callbacks for provider {provider!r}")
    body = await request.body()
    job_id = request.query_params.get("job", "")
    token = request.query_params.get("token", "")
    keys = adapter.settings.api_keys
    ctx = CallContext(http=rt.http_for(provider), api_key=keys[0] if keys else "", callback_url=str(request.url))
    try:
        hint = await adapter.verify_callback(ctx, request.headers, body)
    except (RecursionError, ValueError, UnicodeError) as exc:  # a body or header no parser can read
        metrics.callback_failed(provider, "unreadable")
        log.warning("callback unreadable: %s", exc.__class__.__name__,
                    extra={"provider": provider, "event": "callback.rejected"})
        return problem_response(400, "Callback not readable", "the callback's body or headers cannot be read")
    except CallbackRejected as exc:
        metrics.callback_failed(provider, "signature")
        log.warning("callback rejected: %s", exc.message, extra={"provider": provider, "event": "callback.rejected"})
        return problem_response(401, "Callback not verified", exc.message)

    if not job_id and hint.task_id:
        job_id = await rt.store.job_for_task(provider, hint.task_id) or ""
    job = await rt.store.get(job_id) if job_id.startswith("job_") else None
    token_ok = job is not None and bool(token) and hmac.compare_digest(token, job.callback_token)
    if adapter.callback_auth == "token" and not token_ok:
        metrics.callback_failed(provider, "token")
        log.warning("callback with a missing or wrong token", extra={"provider": provider,
                                                                     "event": "callback.rejected"})
        return problem_response(401, "Callback not verified", "missing or wrong callback token")
    if hint.reply is not None:
        return JSONResponse(hint.reply)  # a handshake (e.g. MiniMax's challenge), answered at once
    if not await rt.store.first_callback(provider, _callback_id(request, token, body), REPLAY_WINDOW_SECONDS):
        return _ack("ignored: already received")  # a replayed (or re-sent) callback changes nothing
    if job is None or job.provider != provider:
        return _ack("ignored: unknown job")
    if hint.task_id and job.provider_task_id and hint.task_id != job.provider_task_id:
        return _ack("ignored: task does not belong to this job")
    for _ in range(3):
        # Checked again after a lost compare-and-set: a poll may have seen the outputs meanwhile, and a
        # write now would only cost the collection a retry.
        if (unfetchable := _nothing_to_fetch(job)) is not None:
            return _ack(unfetchable)
        try:
            job = await rt.jobs.change(job, poll_seq=job.poll_seq + 1)
            break
        except Conflict:
            fresh = await rt.store.get(job.id)
            if fresh is None:
                return _ack("ignored: job already finished")
            job = fresh
    now = time.time()
    await rt.polls.put(job.provider, job.key_id, job.id, job.poll_seq, now, woken_rank(now))
    log.info("callback accepted; fetching status now", extra={"job_id": job.id, "provider": provider,
                                                              "event": "callback.accepted",
                                                              "tenant": job.tenant})
    return _ack("accepted")
