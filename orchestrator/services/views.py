"""Rendering a job record as clients see it: the API's responses and the webhooks' payloads.

Output URLs are minted here, when a view is rendered (presigned S3 URLs, or signed links to the
API's file route), never stored: the state machine knows nothing of them.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from orchestrator.domain.job import Job
from orchestrator.infra.storage import Storage
from orchestrator.wire.jobs import JobView, OutputView, QueueView


@dataclass
class JobViews:
    storage: Storage
    url_ttl_seconds: int
    # Where a waiting job stands (``services/standing.py``): its view's ``queue``.
    standing: Callable[[Job], Awaitable[QueueView | None]] | None = None

    async def job(self, job: Job, url_ttl: int | None = None) -> JobView:
        ttl = url_ttl or self.url_ttl_seconds
        url_expiry = datetime.fromtimestamp(int(time.time()) + ttl, UTC)  # as the signed URL says it
        if job.expires_at is not None and job.expires_at < url_expiry:
            url_expiry = job.expires_at  # the file itself goes first
        outputs = [
            OutputView(index=o.index, url=await self.storage.url(o.key, ttl), url_expires_at=url_expiry,
                       content_type=o.content_type,
                       bytes=o.bytes, sha256=o.sha256, width=o.width, height=o.height,
                       duration_seconds=o.duration_seconds, metadata=o.metadata)
            for o in job.outputs
        ]
        return JobView(
            id=job.id, status=job.status, phase=job.phase, provider=job.provider, kind=job.kind,
            model=job.model, input=job.input, priority=job.priority, progress=job.progress, outputs=outputs,
            error=job.error, provider_task_id=job.provider_task_id, provider_request_id=job.provider_request_id,
            provider_status=job.provider_status, note=job.note, attempts=job.attempts, metadata=job.metadata,
            webhook_url=job.webhook_url, batch_id=job.batch_id, ref=job.ref, created_at=job.created_at,
            updated_at=job.updated_at, timestamps=job.timestamps, deadline_at=job.deadline_at,
            sequence=job.version, operation=job.operation, source=job.source, expires_at=job.expires_at,
            cost=job.cost, fallbacks=job.fallbacks, fallback_on=job.fallback_on,
            provider_attempts=job.provider_attempts,
            queue=await self.standing(job) if self.standing is not None else None,
        )
