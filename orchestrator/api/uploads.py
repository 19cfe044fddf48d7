"""``POST /v1/uploads``: a local file kept as a job's media input.

A provider fetches a job's input from a URL; a file on the client's disk has none. The upload is
stored like an output (``infra/storage.py``), typed from its bytes, capped in size
(``ATELIER_MAX_UPLOAD_BYTES``) and reaped with the OpenAI facade's uploaded inputs (``input:``
members of the retention schedule) once no job can still be waiting to be submitted with it. Its
URL is minted like an output's (an API-signed file link, or presigned S3) and lives as long as the
file.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Annotated

from fastapi import APIRouter, File, UploadFile

from orchestrator.api.deps import RuntimeDep, TenantDep
from orchestrator.api.problems import Problem
from orchestrator.domain.ids import new_id
from orchestrator.infra.destinations import url_problem
from orchestrator.infra.media import identify
from orchestrator.infra.storage import OutputTooLarge, spool
from orchestrator.services.runtime import Runtime
from orchestrator.wire.uploads import UploadView

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])

# What a job may take as a media input: images, videos and audio (as their bytes show them).
MEDIA_PREFIXES = ("image/", "video/", "audio/")
MAX_TTL_SECONDS = 7 * 24 * 3600
CHUNK_BYTES = 1024 * 1024
# The multipart envelope around the file (boundaries, headers, a long file name) on top of the cap.
ENVELOPE_BYTES = 64 * 1024


def body_limit(max_upload_bytes: int) -> int:
    """The request body size ``BodySizeLimit`` allows on this route (the file cap plus its envelope)."""
    return max_upload_bytes + ENVELOPE_BYTES


def upload_ttl(rt: Runtime) -> int:
    """How long an upload is kept: as long as a job naming it may wait for its submission (as the
    OpenAI facade keeps its uploaded inputs)."""
    return int(min(MAX_TTL_SECONDS, rt.settings.job_timeout_seconds + 3600))


def _file_problem(status: int, title: str, message: str) -> Problem:
    return Problem(status, title, f"file: {message}", errors=[{"field": "file", "message": message}])


def _client_name(name: str | None) -> str | None:
    """The file's base name as the client gave it, bounded (never a path)."""
    if not name:
        return None
    base = PurePosixPath(name.replace("\\", "/")).name.strip()
    return base[:200] or None


@router.post("", status_code=201, response_model=UploadView,
             responses={413: {"description": "The file is larger than ATELIER_MAX_UPLOAD_BYTES"},
                        415: {"description": "The file's bytes are not an image, video or audio"}})
async def create_upload(rt: RuntimeDep, tenant: TenantDep,
                        file: Annotated[UploadFile, File(description="The file (multipart/form-data)")]
                        ) -> UploadView:
    """Store a file for use as a job's media input: name the returned ``url`` as ``input.image_url``
    (or another media input). Its type is read from its bytes, not from the declared type."""
    cap = rt.settings.max_upload_bytes

    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await file.read(CHUNK_BYTES):
            yield chunk

    try:
        spooled = await spool(chunks(), cap)
    except OutputTooLarge as exc:
        raise _file_problem(413, "File too large", f"a file of at most {cap} bytes") from exc
    finally:
        await file.close()
    try:
        if spooled.size == 0:
            raise _file_problem(422, "Invalid request", "the file is empty")
        info = await asyncio.to_thread(identify, spooled.file)
        if not info.content_type.startswith(MEDIA_PREFIXES):
            shown = "an unknown type" if info.content_type == "application/octet-stream" else info.content_type
            raise _file_problem(415, "Unsupported media type",
                                f"an image, video or audio file is expected; its bytes show {shown}")
        upload_id = new_id("upl")
        key = f"{tenant}/uploads/{upload_id}.{info.extension}"
        await rt.storage.put(key, spooled, info.content_type)
    finally:
        spooled.file.close()
    ttl = upload_ttl(rt)
    now = time.time()
    await rt.store.schedule_expiry(f"input:{key}", now + ttl)
    url = await rt.storage.url(key, ttl)
    refused = await url_problem(url, allow_private=rt.settings.allow_private_fetches)
    note = None
    if refused is not None:
        note = (f"providers may not be able to fetch this URL ({refused}): set ATELIER_PUBLIC_URL (or S3 "
                f"storage's public endpoint) to an address they reach")
    return UploadView(id=upload_id, url=url, content_type=info.content_type, bytes=spooled.size,
                      sha256=spooled.sha256, filename=_client_name(file.filename), width=info.width,
                      height=info.height, duration_seconds=info.duration_seconds,
                      created_at=datetime.fromtimestamp(now, UTC), expires_at=datetime.fromtimestamp(now + ttl, UTC),
                      note=note)
