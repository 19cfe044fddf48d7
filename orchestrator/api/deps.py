"""Request dependencies: the runtime, and the tenant behind the bearer API key."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from orchestrator.api.problems import Problem
from orchestrator.domain.job import Job
from orchestrator.services.runtime import Runtime
from orchestrator.store.tenants import hash_key, tenant_for_key

# The digest of the API key the current request was authenticated with (its per-key budgets):
# set where a key is checked, read where a job is accepted.
caller_key: ContextVar[str | None] = ContextVar("caller_key", default=None)


async def runtime(request: Request) -> Runtime:
    """The app's runtime. Dependencies here are ``async def``: FastAPI runs a plain ``def`` one in a
    worker thread, a hand-off per dependency per request (a fifth of the API's CPU per accepted job
    went to it: py-spy on bench/throughput.py)."""
    rt: Runtime = request.app.state.runtime
    return rt


RuntimeDep = Annotated[Runtime, Depends(runtime)]


# Declares the Bearer scheme in OpenAPI (the Authorize button in /docs) for every route that takes TenantDep;
# the header is read below, so a missing or malformed one gets Atelier's problem+json 401.
bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                    description="An Atelier API key (`atelier keys create`), sent as `Authorization: Bearer <key>`.")


async def tenant(rt: RuntimeDep, request: Request,
                 _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Problem(401, "Unauthorized", "send 'Authorization: Bearer <api key>'",
                      headers={"WWW-Authenticate": "Bearer"})
    found = await tenant_for_key(rt.redis, key.strip())
    if found is None:
        raise Problem(401, "Unauthorized", "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
    caller_key.set(hash_key(key.strip()))
    return found


TenantDep = Annotated[str, Depends(tenant)]


async def owned_job(rt: Runtime, tenant: str, job_id: str) -> Job:
    """The tenant's job, or 404 (also for other tenants' jobs: existence is not disclosed)."""
    job = await rt.store.get(job_id) if job_id.startswith("job_") and len(job_id) < 64 else None
    if job is None or job.tenant != tenant:
        raise Problem(404, "Not found", f"no job {job_id!r}")
    return job
