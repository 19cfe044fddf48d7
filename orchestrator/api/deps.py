"""Request dependencies: the runtime, and the tenant behind the bearer API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from orchestrator.api.problems import Problem
from orchestrator.domain.job import Job
from orchestrator.services.runtime import Runtime
from orchestrator.store.tenants import tenant_for_key


def runtime(request: Request) -> Runtime:
    rt: Runtime = request.app.state.runtime
    return rt


RuntimeDep = Annotated[Runtime, Depends(runtime)]


async def tenant(rt: RuntimeDep, authorization: Annotated[str | None, Header()] = None) -> str:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Problem(401, "Unauthorized", "send 'Authorization: Bearer <api key>'",
                      headers={"WWW-Authenticate": "Bearer"})
    found = await tenant_for_key(rt.redis, key.strip())
    if found is None:
        raise Problem(401, "Unauthorized", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    return found


TenantDep = Annotated[str, Depends(tenant)]


async def owned_job(rt: Runtime, tenant: str, job_id: str) -> Job:
    """The tenant's job, or 404 (also for other tenants' jobs: existence is not disclosed)."""
    job = await rt.store.get(job_id) if job_id.startswith("job_") and len(job_id) < 64 else None
    if job is None or job.tenant != tenant:
        raise Problem(404, "Not found", f"no job {job_id!r}")
    return job
