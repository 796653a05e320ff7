"""HTTP for webhooks: tenant endpoints, secrets, and the delivery logs of endpoints and jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.problems import PROBLEM_RESPONSES
from services.gateway.webhooks import service
from services.gateway.webhooks.schemas import (
    WebhookDeliveryOut,
    WebhookDeliveryPage,
    WebhookEndpointCreated,
    WebhookEndpointIn,
    WebhookEndpointOut,
    WebhookEndpointPage,
    WebhookEndpointPatch,
    WebhookSecret,
)

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"], responses=PROBLEM_RESPONSES)
job_deliveries_router = APIRouter(prefix="/v1/jobs", tags=["webhooks"],
                                  responses=PROBLEM_RESPONSES)

Limit = Annotated[int, Query(ge=1, le=100, description="Items per page.")]
Cursor = Annotated[str | None, Query(description="`next_cursor` of the previous page.")]


# --- the job secret (before /{endpoint_id}, which would take its name) -------------------------


@router.get("/job-secret", response_model=WebhookSecret,
            summary="The secret that signs your per-job webhooks")
async def get_job_secret(session: SessionDep, tenant: TenantDep) -> WebhookSecret:
    """Jobs submitted with `webhook: {url, events}` are signed with this secret (made on first
    use), the same way endpoints are with theirs."""
    return service.secret_out(await service.job_secret(session=session, tenant_id=tenant.id))


@router.post("/job-secret/rotate", response_model=WebhookSecret,
             summary="Replace the per-job webhook secret")
async def rotate_job_secret(session: SessionDep, tenant: TenantDep,
                            state: StateDep) -> WebhookSecret:
    """The old secret keeps signing beside the new one until `previous_secret_expires_at`."""
    return service.secret_out(await service.rotate_job_secret(
        session=session, settings=state.settings, tenant=tenant))


# --- endpoints -------------------------------------------------------------------------------


@router.post("", response_model=WebhookEndpointCreated, status_code=201,
             summary="Register a webhook endpoint")
async def create_endpoint(body: WebhookEndpointIn, session: SessionDep, tenant: TenantDep,
                          state: StateDep) -> WebhookEndpointCreated:
    """Your jobs' events matching `events` are posted to `url`, signed (Standard Webhooks)
    with the `secret` in this response: keep it, it is not shown again."""
    endpoint = await service.create_endpoint(session=session, settings=state.settings,
                                             tenant=tenant, body=body)
    return WebhookEndpointCreated(**service.endpoint_out(endpoint).model_dump(),
                                  secret=endpoint.secret)


@router.get("", response_model=WebhookEndpointPage, summary="List webhook endpoints")
async def list_endpoints(session: SessionDep, tenant: TenantDep, limit: Limit = 20,
                         cursor: Cursor = None) -> WebhookEndpointPage:
    rows, next_cursor = await service.page_endpoints(session=session, tenant=tenant,
                                                     limit=limit, cursor=cursor)
    return WebhookEndpointPage(items=[service.endpoint_out(row) for row in rows],
                               next_cursor=next_cursor)


@router.get("/{endpoint_id}", response_model=WebhookEndpointOut,
            summary="Get a webhook endpoint")
async def get_endpoint(endpoint_id: str, session: SessionDep,
                       tenant: TenantDep) -> WebhookEndpointOut:
    return service.endpoint_out(await service.get_endpoint(
        session=session, tenant=tenant, endpoint_id=endpoint_id))


@router.patch("/{endpoint_id}", response_model=WebhookEndpointOut,
              summary="Change, disable or enable a webhook endpoint")
async def patch_endpoint(endpoint_id: str, patch: WebhookEndpointPatch, session: SessionDep,
                         tenant: TenantDep, state: StateDep) -> WebhookEndpointOut:
    endpoint = await service.get_endpoint(session=session, tenant=tenant,
                                          endpoint_id=endpoint_id)
    return service.endpoint_out(await service.patch_endpoint(
        session=session, settings=state.settings, endpoint=endpoint, patch=patch))


@router.delete("/{endpoint_id}", status_code=204, summary="Delete a webhook endpoint")
async def delete_endpoint(endpoint_id: str, session: SessionDep, tenant: TenantDep) -> Response:
    """Its delivery log stays readable under the jobs; what it had not sent yet is failed."""
    endpoint = await service.get_endpoint(session=session, tenant=tenant,
                                          endpoint_id=endpoint_id)
    await service.delete_endpoint(session=session, endpoint=endpoint)
    return Response(status_code=204)


@router.post("/{endpoint_id}/rotate-secret", response_model=WebhookSecret,
             summary="Replace an endpoint's signing secret")
async def rotate_endpoint_secret(endpoint_id: str, session: SessionDep, tenant: TenantDep,
                                 state: StateDep) -> WebhookSecret:
    """The new secret is shown this once; the old one keeps signing beside it until
    `previous_secret_expires_at`."""
    endpoint = await service.get_endpoint(session=session, tenant=tenant,
                                          endpoint_id=endpoint_id)
    return service.secret_out(await service.rotate_endpoint_secret(
        session=session, settings=state.settings, endpoint=endpoint))


@router.post("/{endpoint_id}/test", response_model=WebhookDeliveryOut, status_code=202,
             summary="Send a ping to an endpoint")
async def ping_endpoint(endpoint_id: str, session: SessionDep, tenant: TenantDep,
                        state: StateDep) -> WebhookDeliveryOut:
    """A `ping` delivery, due now; follow it in the endpoint's deliveries."""
    endpoint = await service.get_endpoint(session=session, tenant=tenant,
                                          endpoint_id=endpoint_id)
    delivery = await service.ping(session=session, endpoint=endpoint)
    state.wake_webhooks()
    return await service.delivery_out(session=session, delivery=delivery)


@router.get("/{endpoint_id}/deliveries", response_model=WebhookDeliveryPage,
            summary="An endpoint's delivery log")
async def list_endpoint_deliveries(endpoint_id: str, session: SessionDep, tenant: TenantDep,
                                   limit: Limit = 20,
                                   cursor: Cursor = None) -> WebhookDeliveryPage:
    """Newest first, each with every attempt (time, status, latency, the response's first
    KiB, error)."""
    endpoint = await service.get_endpoint(session=session, tenant=tenant,
                                          endpoint_id=endpoint_id)
    items, next_cursor = await service.page_endpoint_deliveries(
        session=session, endpoint=endpoint, limit=limit, cursor=cursor)
    return WebhookDeliveryPage(items=items, next_cursor=next_cursor)


@router.post("/{endpoint_id}/deliveries/{delivery_id}/redeliver",
             response_model=WebhookDeliveryOut, status_code=202,
             summary="Send an endpoint's delivery again")
async def redeliver_endpoint_delivery(endpoint_id: str, delivery_id: str, session: SessionDep,
                                      tenant: TenantDep, state: StateDep) -> WebhookDeliveryOut:
    """A new delivery of the same event (same `event_id`), due now, to the endpoint's URL."""
    endpoint = await service.get_endpoint(session=session, tenant=tenant,
                                          endpoint_id=endpoint_id)
    delivery = await service.redeliver_endpoint_delivery(session=session, endpoint=endpoint,
                                                         delivery_id=delivery_id)
    state.wake_webhooks()
    return await service.delivery_out(session=session, delivery=delivery)


# --- a job's deliveries ----------------------------------------------------------------------


@job_deliveries_router.get("/{job_id}/deliveries", response_model=WebhookDeliveryPage,
                           summary="A job's webhook deliveries")
async def list_job_deliveries(job_id: str, session: SessionDep, tenant: TenantDep,
                              limit: Limit = 20, cursor: Cursor = None) -> WebhookDeliveryPage:
    """Every delivery of the job's events, to its own webhook and to your endpoints, newest
    first, each with every attempt."""
    items, next_cursor = await service.page_job_deliveries(
        session=session, tenant=tenant, job_id=job_id, limit=limit, cursor=cursor)
    return WebhookDeliveryPage(items=items, next_cursor=next_cursor)


@job_deliveries_router.post("/{job_id}/deliveries/{delivery_id}/redeliver",
                            response_model=WebhookDeliveryOut, status_code=202,
                            summary="Send a job's delivery again")
async def redeliver_job_delivery(job_id: str, delivery_id: str, session: SessionDep,
                                 tenant: TenantDep, state: StateDep) -> WebhookDeliveryOut:
    """A new delivery of the same event (same `event_id`), due now."""
    delivery = await service.redeliver_job_delivery(session=session, tenant=tenant,
                                                    job_id=job_id, delivery_id=delivery_id)
    state.wake_webhooks()
    return await service.delivery_out(session=session, delivery=delivery)
