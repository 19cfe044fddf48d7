"""When a job times out: per provider and per model, set when the job is accepted."""

from __future__ import annotations

import fnmatch
from datetime import UTC, datetime, timedelta

from orchestrator.domain.job import Job
from orchestrator.wire.jobs import JobRequest, utcnow
from providers.contract import ProviderSettings


def job_timeout(request: JobRequest, provider: ProviderSettings | None, default: float) -> float:
    """Seconds a job for ``request`` may take: the provider's per-model setting (exact name, else the
    longest matching pattern), else the provider's, else ``default`` (``ATELIER_JOB_TIMEOUT_SECONDS``)."""
    if provider is None:
        return default
    by_model = provider.job_timeout_by_model
    if request.model in by_model:
        return by_model[request.model]
    patterns = [p for p in by_model if fnmatch.fnmatchcase(request.model, p)]
    if patterns:
        return by_model[max(patterns, key=len)]
    return provider.job_timeout_seconds or default


def deadline_for(request: JobRequest, provider: ProviderSettings | None, default: float,
                 now: datetime | None = None) -> datetime:
    """When a job for ``request`` created at ``now`` times out (single jobs and batch items alike)."""
    return (now or utcnow()) + timedelta(seconds=job_timeout(request, provider, default))




def deadline_passed(job: Job) -> bool:
    return job.deadline_at is not None and job.deadline_at <= datetime.now(UTC)
