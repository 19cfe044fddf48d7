"""A follow-up's source: the earlier job of the same tenant that it acts on."""

from __future__ import annotations

from orchestrator.domain.job import Job
from orchestrator.store.jobs import JobStore
from orchestrator.wire.jobs import JobStatus, SourceRef


class SourceProblem(Exception):
    """The source cannot be used: ``status`` is the HTTP status the API answers with."""

    def __init__(self, status: int, field: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message


async def source_job(store: JobStore, tenant: str, ref: SourceRef) -> Job:
    """The source job, if it is the tenant's (else 404), succeeded (else 409) and has the output."""
    job = await store.get(ref.job_id)
    if job is None or job.tenant != tenant:
        raise SourceProblem(404, "source.job_id", f"no job {ref.job_id!r}")
    if job.status != JobStatus.succeeded:
        raise SourceProblem(409, "source.job_id", f"job {ref.job_id} is {job.status.value}, not succeeded: "
                                                  "only a finished render can be followed up")
    if ref.output >= len(job.outputs):
        raise SourceProblem(422, "source.output", f"job {ref.job_id} has {len(job.outputs)} outputs "
                                                  f"(0 to {len(job.outputs) - 1})")
    return job
