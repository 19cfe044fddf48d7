"""``/v1/webhook-endpoints``: a tenant's webhook destinations, their secrets, and their deliveries."""

from __future__ import annotations

from datetime import UTC
from typing import Annotated

from fastapi import APIRouter, Query, Response

from orchestrator.api.deps import RuntimeDep, TenantDep
from orchestrator.api.problems import Problem
from orchestrator.api.views import delivery_view, endpoint_view
from orchestrator.domain.webhooks import MAX_ENDPOINTS_PER_TENANT, Delivery, Endpoint, restart
from orchestrator.infra.destinations import url_problem
from orchestrator.services.runtime import Runtime
from orchestrator.wire.jobs import utcnow
from orchestrator.wire.strict import IsoDatetime
from orchestrator.wire.webhooks import (
    DeliveryPage,
    DeliveryStatus,
    DeliveryView,
    EndpointCreate,
    EndpointCreated,
    EndpointPage,
    EndpointSecret,
    EndpointUpdate,
    EndpointView,
    Recovery,
    RotateSecret,
)

router = APIRouter(prefix="/v1/webhook-endpoints", tags=["webhooks"])

MAX_RECOVER = 1000


async def check_url(rt: Runtime, url: str, field: str = "url") -> None:
    """422 naming ``field`` when the URL is not an allowed webhook destination."""
    reason = await url_problem(url, allow_private=rt.settings.webhook_allow_private)
    if reason is not None:
        raise Problem(422, "Invalid request", f"{field}: {reason}", errors=[{"field": field, "message": reason}])


async def _owned(rt: Runtime, tenant: str, endpoint_id: str) -> Endpoint:
    endpoint = await rt.endpoints.get(tenant, endpoint_id)
    if endpoint is None:
        raise Problem(404, "Not found", f"no webhook endpoint {endpoint_id!r}")
    return endpoint


async def _view(rt: Runtime, endpoint: Endpoint) -> EndpointView:
    failing = await rt.endpoints.failing_since([endpoint.id])
    return endpoint_view(endpoint, failing[endpoint.id])


def _secret_view(endpoint: Endpoint) -> EndpointSecret:
    now = utcnow()
    return EndpointSecret(secret=endpoint.secret,
                          previous_secrets_expire_at=[p.expires_at for p in endpoint.previous_secrets
                                                      if p.expires_at > now])


@router.post("", status_code=201, response_model=EndpointCreated)
async def create_endpoint(body: EndpointCreate, rt: RuntimeDep, tenant: TenantDep, response: Response
                          ) -> EndpointCreated:
    """Register an endpoint; the response carries its signing secret (also at ``GET .../secret``)."""
    await check_url(rt, str(body.url))
    endpoint = await rt.endpoints.create(tenant, body)
    if endpoint is None:
        raise Problem(409, "Too many webhook endpoints",
                      f"a tenant may have at most {MAX_ENDPOINTS_PER_TENANT} webhook endpoints")
    response.headers["Location"] = f"/v1/webhook-endpoints/{endpoint.id}"
    view = endpoint_view(endpoint, None)
    return EndpointCreated(**view.model_dump(), secret=endpoint.secret)


@router.get("", response_model=EndpointPage)
async def list_endpoints(rt: RuntimeDep, tenant: TenantDep,
                         cursor: Annotated[str | None, Query(max_length=64)] = None,
                         limit: Annotated[int, Query(ge=1, le=200)] = 50) -> EndpointPage:
    """The tenant's endpoints, newest first."""
    endpoints = [e for e in reversed(await rt.endpoints.for_tenant(tenant)) if cursor is None or e.id < cursor]
    page = endpoints[:limit]
    failing = await rt.endpoints.failing_since([e.id for e in page])
    return EndpointPage(data=[endpoint_view(e, failing[e.id]) for e in page],
                        next_cursor=page[-1].id if len(endpoints) > limit else None)


@router.get("/{endpoint_id}", response_model=EndpointView)
async def get_endpoint(endpoint_id: str, rt: RuntimeDep, tenant: TenantDep) -> EndpointView:
    return await _view(rt, await _owned(rt, tenant, endpoint_id))


@router.patch("/{endpoint_id}", response_model=EndpointView)
async def update_endpoint(endpoint_id: str, body: EndpointUpdate, rt: RuntimeDep, tenant: TenantDep
                          ) -> EndpointView:
    """Change ``url``, ``events``, ``enabled`` or ``description``. Re-enabling clears the recorded
    reason and the failure streak."""
    given = body.model_fields_set
    for name in ("url", "enabled"):
        if name in given and getattr(body, name) is None:
            raise Problem(422, "Invalid request", f"{name}: may not be null",
                          errors=[{"field": name, "message": "may not be null"}])
    if body.url is not None:
        await check_url(rt, str(body.url))
    await _owned(rt, tenant, endpoint_id)
    fresh_start = False

    def change(e: Endpoint) -> bool:
        nonlocal fresh_start
        if body.url is not None and str(body.url) != e.url:
            e.url = str(body.url)
            fresh_start = True
        if "events" in given:
            e.events = list(dict.fromkeys(body.events or []))
        if "description" in given:
            e.description = body.description
        if body.enabled is not None and body.enabled != e.enabled:
            e.enabled = body.enabled
            if body.enabled:
                e.disabled_reason, e.disabled_at = None, None
                fresh_start = True
            else:
                e.disabled_reason, e.disabled_at = "disabled through the API", utcnow()
        return True

    endpoint = await rt.endpoints.update(tenant, endpoint_id, change)
    if endpoint is None:
        raise Problem(404, "Not found", f"no webhook endpoint {endpoint_id!r}")
    if fresh_start:
        await rt.endpoints.reset_health(endpoint.id)
    return await _view(rt, endpoint)


@router.delete("/{endpoint_id}", status_code=204)
async def delete_endpoint(endpoint_id: str, rt: RuntimeDep, tenant: TenantDep) -> Response:
    """Remove the endpoint with its delivery records; pending deliveries are not sent."""
    if not await rt.endpoints.delete(tenant, endpoint_id):
        raise Problem(404, "Not found", f"no webhook endpoint {endpoint_id!r}")
    return Response(status_code=204)


@router.get("/{endpoint_id}/secret", response_model=EndpointSecret)
async def get_secret(endpoint_id: str, rt: RuntimeDep, tenant: TenantDep) -> EndpointSecret:
    """The ``whsec_...`` secret that signs this endpoint's deliveries."""
    return _secret_view(await _owned(rt, tenant, endpoint_id))


@router.post("/{endpoint_id}/secret/rotate", response_model=EndpointSecret)
async def rotate_secret(endpoint_id: str, rt: RuntimeDep, tenant: TenantDep,
                        body: RotateSecret | None = None) -> EndpointSecret:
    """A new secret; the previous one keeps signing too for ``grace_period_seconds`` (default 24 h),
    so each delivery carries both signatures until then."""
    grace = (body or RotateSecret()).grace_period_seconds
    endpoint = await rt.endpoints.rotate(tenant, endpoint_id, grace)
    if endpoint is None:
        raise Problem(404, "Not found", f"no webhook endpoint {endpoint_id!r}")
    return _secret_view(endpoint)


# -- deliveries ------------------------------------------------------------------------------------

@router.get("/{endpoint_id}/deliveries", response_model=DeliveryPage)
async def list_deliveries(endpoint_id: str, rt: RuntimeDep, tenant: TenantDep,
                          status: DeliveryStatus | None = None,
                          cursor: Annotated[str | None, Query(max_length=80)] = None,
                          limit: Annotated[int, Query(ge=1, le=200)] = 50) -> DeliveryPage:
    """Newest first, with every attempt; filter by ``status`` (``pending``, ``delivered``, ``dead``)."""
    endpoint = await _owned(rt, tenant, endpoint_id)
    found, next_cursor = await rt.endpoints.deliveries(endpoint.id, status, cursor, limit)
    return DeliveryPage(data=[delivery_view(d, with_payload=False) for d in found], next_cursor=next_cursor)


async def _owned_delivery(rt: Runtime, endpoint: Endpoint, delivery_id: str) -> Delivery:
    delivery = await rt.endpoints.delivery(endpoint, delivery_id)
    if delivery is None:
        raise Problem(404, "Not found", f"no delivery {delivery_id!r} for this endpoint")
    return delivery


@router.get("/{endpoint_id}/deliveries/{delivery_id}", response_model=DeliveryView)
async def get_delivery(endpoint_id: str, delivery_id: str, rt: RuntimeDep, tenant: TenantDep) -> DeliveryView:
    """One delivery with its payload and every attempt (time, status code, latency, response excerpt)."""
    endpoint = await _owned(rt, tenant, endpoint_id)
    return delivery_view(await _owned_delivery(rt, endpoint, delivery_id))


def _require_enabled(endpoint: Endpoint) -> None:
    if not endpoint.enabled:
        raise Problem(409, "Endpoint disabled", f"webhook endpoint {endpoint.id} is disabled "
                      f"({endpoint.disabled_reason}); enable it first", disabled_reason=endpoint.disabled_reason)


async def _resend(rt: Runtime, delivery: Delivery) -> None:
    restart(delivery)
    if await rt.store.save_delivery(delivery):
        await rt.queue.deliver(delivery.id, len(delivery.attempts))


@router.post("/{endpoint_id}/deliveries/{delivery_id}/replay", status_code=202, response_model=DeliveryView)
async def replay_delivery(endpoint_id: str, delivery_id: str, rt: RuntimeDep, tenant: TenantDep) -> DeliveryView:
    """Send a delivered or dead delivery again: a new attempt series with the same ``webhook-id``."""
    endpoint = await _owned(rt, tenant, endpoint_id)
    delivery = await _owned_delivery(rt, endpoint, delivery_id)
    _require_enabled(endpoint)
    if delivery.status == "pending":
        raise Problem(409, "Delivery in progress", f"delivery {delivery_id} is still being attempted")
    await _resend(rt, delivery)
    return delivery_view(delivery)


@router.post("/{endpoint_id}/recover", status_code=202, response_model=Recovery)
async def recover(endpoint_id: str, rt: RuntimeDep, tenant: TenantDep, since: IsoDatetime) -> Recovery:
    """Resend every dead delivery created since ``since`` (ISO 8601), up to 1,000 per call (``more``
    says to call again)."""
    endpoint = await _owned(rt, tenant, endpoint_id)
    _require_enabled(endpoint)
    if since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    dead = await rt.endpoints.dead_since(endpoint.id, since, MAX_RECOVER + 1)
    resent = []
    for delivery in dead[:MAX_RECOVER]:
        if delivery.status == "dead":
            await _resend(rt, delivery)
            resent.append(delivery.id)
    return Recovery(since=since, recovered=len(resent), delivery_ids=resent, more=len(dead) > MAX_RECOVER)
