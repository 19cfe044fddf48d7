"""Health, readiness, the tenant's webhook secret, and signed local-storage files."""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, JSONResponse

from orchestrator.api.deps import RuntimeDep, TenantDep
from orchestrator.api.problems import Problem, problem_response
from orchestrator.infra.media import sniff
from orchestrator.infra.storage import LocalStorage
from orchestrator.store.tenants import webhook_secret

router = APIRouter()


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"], response_model=None)
async def readyz(rt: RuntimeDep) -> JSONResponse | dict[str, str]:
    try:
        await rt.redis.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means not ready
        return problem_response(503, "Not ready", f"Redis is unreachable: {exc.__class__.__name__}")
    return {"status": "ready"}


@router.get("/v1/webhook-secret", tags=["webhooks"])
async def get_webhook_secret(rt: RuntimeDep, tenant: TenantDep) -> dict[str, str]:
    """The secret (``whsec_...``) that signs this tenant's webhooks."""
    return {"secret": await webhook_secret(rt.redis, tenant)}


@router.get("/v1/files/{key:path}", tags=["files"], response_model=None)
async def get_file(key: str, rt: RuntimeDep, expires: int = Query(...),
                   signature: str = Query(..., max_length=128)) -> FileResponse:
    """A stored output (local storage only), at a signed URL that expires."""
    storage = rt.storage
    if not isinstance(storage, LocalStorage) or not storage.verify(key, expires, signature):
        raise Problem(403, "Forbidden", "the file URL is invalid or has expired")
    try:
        path = storage.path(key)
    except ValueError as exc:
        raise Problem(403, "Forbidden", "the file URL is invalid") from exc
    if not path.is_file():
        raise Problem(404, "Not found", "no such file")
    with path.open("rb") as f:
        media = sniff(f.read(64))
    return FileResponse(path, media_type=media.content_type if media else "application/octet-stream")
