"""Webhooks: tenants' endpoints and secrets, and the deliveries job events turn into.

A delivery is a row first (``webhook_deliveries``, pending, due now) and an HTTP request later:
the dispatcher picks due rows, signs and sends them, and records each attempt. Job events
become rows in the transaction that applies them (:func:`enqueue_deliveries`), so an event
is notified exactly when it is recorded, and a crash loses neither.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any, NewType

from sqlalchemy import Select, and_, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.db.models import (
    Job,
    Tenant,
    TenantWebhookSecret,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    new_id,
    utcnow,
)
from services.gateway.pagination import encode_cursor, newest_first
from services.gateway.webhooks.schemas import (
    WebhookAttemptOut,
    WebhookDeliveryOut,
    WebhookEndpointIn,
    WebhookEndpointOut,
    WebhookEndpointPatch,
    WebhookSecret,
)
from services.gateway.webhooks.signing import new_secret
from services.gateway.webhooks.ssrf import UrlRefused, check_url
from shared.errors import Conflict, NotFound, ValidationFailed
from shared.events import JobEvent
from shared.settings import Settings
from shared.specs import WEBHOOK_EVENT_TYPES, WebhookTarget

PENDING, DELIVERING, SUCCEEDED, FAILED = "pending", "delivering", "succeeded", "failed"
PING = "ping"
# Set in ``session.info`` when deliveries were queued: after its commit the caller wakes this
# gateway's dispatcher, so a delivery goes out at once instead of at its next look.
DELIVERIES_QUEUED = "loomis.webhook_deliveries_queued"

# A job's webhook as its row keeps it, once its URL passed :func:`check_url`: the only thing
# ``create_and_enqueue`` takes, so no submission can store an unchecked URL.
CheckedWebhook = NewType("CheckedWebhook", dict[str, Any])


# --- URLs ------------------------------------------------------------------------------------


async def check_target_url(url: str, *, settings: Settings, field: str) -> None:
    """A 422 at ``field`` for a URL the gateway must not call (see ``ssrf.check_url``)."""
    try:
        await check_url(url, allow_http=settings.webhooks.allow_http,
                        allow_private=settings.webhooks.allow_private_networks)
    except UrlRefused as exc:
        raise ValidationFailed([{"field": field, "message": str(exc),
                                 "type": "url_refused"}]) from exc


async def check_job_webhook(*, settings: Settings,
                            webhook: WebhookTarget | None) -> CheckedWebhook | None:
    """A job's ``webhook`` checked before anything of the job is stored (the 422 is cheap
    and names ``webhook.url``), as its row will keep it."""
    if webhook is None:
        return None
    await check_target_url(webhook.url, settings=settings, field="webhook.url")
    return CheckedWebhook(webhook.model_dump(mode="json"))


# --- pages -----------------------------------------------------------------------------------


def _newest_first(query: Select[Any], model: type[WebhookEndpoint] | type[WebhookDelivery], *,
                  limit: int, cursor: str | None) -> Select[Any]:
    return newest_first(query, model.created_at, model.id, limit=limit, cursor=cursor)


# --- endpoints -------------------------------------------------------------------------------


def endpoint_out(endpoint: WebhookEndpoint) -> WebhookEndpointOut:
    base = f"/v1/webhooks/{endpoint.id}"
    return WebhookEndpointOut(
        id=endpoint.id, url=endpoint.url, events=list(endpoint.events),
        description=endpoint.description, enabled=endpoint.enabled,
        disabled_reason=endpoint.disabled_reason, failing_since=endpoint.failing_since,
        created_at=endpoint.created_at, updated_at=endpoint.updated_at,
        links={"self": base, "deliveries": f"{base}/deliveries", "test": f"{base}/test",
               "rotate_secret": f"{base}/rotate-secret"})


async def create_endpoint(*, session: AsyncSession, settings: Settings, tenant: Tenant,
                          body: WebhookEndpointIn) -> WebhookEndpoint:
    await check_target_url(body.url, settings=settings, field="url")
    now = utcnow()
    endpoint = WebhookEndpoint(
        id=new_id(), tenant_id=tenant.id, url=body.url, events=body.events,
        description=body.description, enabled=body.enabled, disabled_reason=None,
        secret=new_secret(), previous_secret=None, previous_secret_until=None,
        failing_since=None, created_at=now, updated_at=now)
    session.add(endpoint)
    await session.commit()
    return endpoint


async def get_endpoint(*, session: AsyncSession, tenant: Tenant,
                       endpoint_id: str) -> WebhookEndpoint:
    """Another tenant's endpoint is reported as missing: its existence is private."""
    endpoint = await session.scalar(select(WebhookEndpoint).where(
        WebhookEndpoint.id == endpoint_id, WebhookEndpoint.tenant_id == tenant.id))
    if endpoint is None:
        raise NotFound(f"webhook endpoint {endpoint_id} not found", code="webhook_not_found")
    return endpoint


async def page_endpoints(*, session: AsyncSession, tenant: Tenant, limit: int,
                         cursor: str | None) -> tuple[list[WebhookEndpoint], str | None]:
    rows = list(await session.scalars(_newest_first(
        select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant.id), WebhookEndpoint,
        limit=limit, cursor=cursor)))
    more, rows = len(rows) > limit, rows[:limit]
    return rows, (encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None)


async def patch_endpoint(*, session: AsyncSession, settings: Settings,
                         endpoint: WebhookEndpoint,
                         patch: WebhookEndpointPatch) -> WebhookEndpoint:
    """Enabling an endpoint again forgets why and since when it was failing: it starts clean."""
    if patch.url is not None and patch.url != endpoint.url:
        await check_target_url(patch.url, settings=settings, field="url")
        endpoint.url = patch.url
    if patch.events is not None:
        endpoint.events = patch.events
    if patch.description is not None:
        endpoint.description = patch.description
    if patch.enabled is not None:
        if patch.enabled and not endpoint.enabled:
            endpoint.disabled_reason = None
            endpoint.failing_since = None
        endpoint.enabled = patch.enabled
    endpoint.updated_at = utcnow()
    await session.commit()
    return endpoint


async def delete_endpoint(*, session: AsyncSession, endpoint: WebhookEndpoint) -> None:
    """Its log stays (``endpoint_id`` becomes null), but what it had not sent yet is failed:
    with no endpoint there is no secret to sign it with, nor anyone who still wants it."""
    await session.execute(update(WebhookDelivery).where(
        WebhookDelivery.endpoint_id == endpoint.id, WebhookDelivery.status == PENDING,
    ).values(status=FAILED, next_attempt_at=None, updated_at=utcnow()))
    await session.delete(endpoint)
    await session.commit()


def _rotated(holder: WebhookEndpoint | TenantWebhookSecret, *, overlap_s: float) -> None:
    """A new secret; the old one signs beside it for ``overlap_s`` (both signatures are sent),
    so receivers can switch without dropping a delivery."""
    holder.previous_secret = holder.secret
    holder.previous_secret_until = utcnow() + timedelta(seconds=overlap_s)
    holder.secret = new_secret()


def secret_out(holder: WebhookEndpoint | TenantWebhookSecret) -> WebhookSecret:
    live = holder.previous_secret is not None and holder.previous_secret_until is not None \
        and holder.previous_secret_until > utcnow()
    return WebhookSecret(secret=holder.secret,
                         previous_secret_expires_at=holder.previous_secret_until if live else None)


async def rotate_endpoint_secret(*, session: AsyncSession, settings: Settings,
                                 endpoint: WebhookEndpoint) -> WebhookEndpoint:
    _rotated(endpoint, overlap_s=settings.webhooks.secret_overlap_s)
    endpoint.updated_at = utcnow()
    await session.commit()
    return endpoint


# --- the per-tenant secret of per-job webhooks ------------------------------------------------


def _insert_ignoring_duplicates(session: AsyncSession, model: Any) -> Any:
    dialect = session.get_bind().dialect.name
    return (postgresql.insert if dialect == "postgresql" else sqlite.insert)(model) \
        .on_conflict_do_nothing()


async def job_secret(*, session: AsyncSession, tenant_id: str) -> TenantWebhookSecret:
    """The secret that signs the tenant's per-job webhooks, made on first use; two replicas
    making it at once agree on the first one written."""
    held = await session.get(TenantWebhookSecret, tenant_id)
    if held is not None:
        return held
    await session.execute(_insert_ignoring_duplicates(session, TenantWebhookSecret).values(
        tenant_id=tenant_id, secret=new_secret(), previous_secret=None,
        previous_secret_until=None, created_at=utcnow()))
    await session.commit()
    made = await session.get(TenantWebhookSecret, tenant_id)
    assert made is not None  # written above, or by whoever won the race
    return made


async def rotate_job_secret(*, session: AsyncSession, settings: Settings,
                            tenant: Tenant) -> TenantWebhookSecret:
    """A tenant without one gets its first: there is no old secret anyone could hold."""
    held = await session.get(TenantWebhookSecret, tenant.id)
    if held is None:
        return await job_secret(session=session, tenant_id=tenant.id)
    _rotated(held, overlap_s=settings.webhooks.secret_overlap_s)
    await session.commit()
    return held


# --- deliveries ------------------------------------------------------------------------------


def filter_matches(pattern: str, *, kind: str, event_type: str) -> bool:
    """Whether an endpoint filter (``generation.succeeded``, ``*.failed``, ``scene.*``) takes
    an event of a ``kind`` job."""
    want_kind, _, want_type = pattern.partition(".")
    return want_kind in ("*", kind) and want_type in ("*", event_type)


def event_id(job_id: str, seq: int, endpoint_id: str | None) -> str:
    """The ``webhook-id`` of a job event to one target: the same on every retry and
    redelivery, distinct per target (the job's own webhook has none)."""
    return f"msg_{job_id}_{seq}" + (f"_{endpoint_id}" if endpoint_id else "")


async def enqueue_deliveries(session: AsyncSession, job: Job, event: JobEvent,
                             progress_interval_s: float) -> None:
    """One pending delivery, due now, per target that wants the event: each enabled endpoint
    of the job's tenant with a matching filter, and the job's own webhook.

    Runs in the transaction that applies the event, so the rows exist exactly when the event
    does. A progress event is skipped for a target that got one of this job's progress
    deliveries less than ``progress_interval_s`` ago: progress is a rate, not a record.
    """
    if event.type not in WEBHOOK_EVENT_TYPES:  # ``queued``: the submission's answer said it
        return
    endpoints = (await session.execute(
        select(WebhookEndpoint.id, WebhookEndpoint.url, WebhookEndpoint.events).where(
            WebhookEndpoint.tenant_id == job.tenant_id, WebhookEndpoint.enabled.is_(True)),
    )).all()
    targets: list[tuple[str | None, str]] = [
        (row.id, row.url) for row in endpoints
        if any(filter_matches(p, kind=job.kind, event_type=event.type) for p in row.events)]
    own = job.webhook
    if own is not None and event.type in own.get("events", ()):
        targets.append((None, own["url"]))
    if not targets:
        return
    now = utcnow()
    event_type = f"job.{event.type}"
    if event.type == "progress" and progress_interval_s > 0:
        recent = set((await session.execute(
            select(WebhookDelivery.endpoint_id).distinct().where(
                WebhookDelivery.job_id == job.id, WebhookDelivery.event_type == event_type,
                WebhookDelivery.created_at > now - timedelta(seconds=progress_interval_s)),
        )).scalars())
        targets = [target for target in targets if target[0] not in recent]
        if not targets:
            return
    session.info[DELIVERIES_QUEUED] = True  # whoever commits wakes the dispatcher
    await session.execute(insert(WebhookDelivery), [
        {"id": new_id(), "tenant_id": job.tenant_id, "endpoint_id": endpoint_id,
         "job_id": job.id, "url": url, "event_type": event_type,
         "event_id": event_id(job.id, event.seq, endpoint_id), "seq": event.seq,
         "status": PENDING, "attempts": 0, "next_attempt_at": now, "last_attempt_at": None,
         "created_at": now, "updated_at": now}
        for endpoint_id, url in targets])


async def _deliveries_out(session: AsyncSession,
                          deliveries: list[WebhookDelivery]) -> list[WebhookDeliveryOut]:
    attempts: dict[str, list[WebhookAttemptOut]] = {d.id: [] for d in deliveries}
    if deliveries:
        for attempt in await session.scalars(
                select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(list(attempts)))
                .order_by(WebhookAttempt.id)):
            attempts[attempt.delivery_id].append(WebhookAttemptOut(
                at=attempt.at, status_code=attempt.status_code, latency_ms=attempt.latency_ms,
                response_head=attempt.response_head, error=attempt.error))
    return [WebhookDeliveryOut(
        id=d.id, endpoint_id=d.endpoint_id, job_id=d.job_id, url=d.url,
        event_type=d.event_type, event_id=d.event_id, seq=d.seq,
        status=d.status,
        next_attempt_at=d.next_attempt_at, last_attempt_at=d.last_attempt_at,
        created_at=d.created_at, attempts=attempts[d.id]) for d in deliveries]


async def delivery_out(*, session: AsyncSession, delivery: WebhookDelivery) -> WebhookDeliveryOut:
    return (await _deliveries_out(session, [delivery]))[0]


async def _tenant_job(session: AsyncSession, tenant: Tenant, job_id: str) -> None:
    """404 unless the job is the tenant's (as ``GET /v1/jobs/{id}`` says)."""
    if await session.scalar(select(Job.id).where(Job.id == job_id,
                                                 Job.tenant_id == tenant.id)) is None:
        raise NotFound(f"job {job_id} not found", code="job_not_found")


def _of_endpoint(endpoint: WebhookEndpoint) -> Any:
    return and_(WebhookDelivery.tenant_id == endpoint.tenant_id,
                WebhookDelivery.endpoint_id == endpoint.id)


def _of_job(tenant: Tenant, job_id: str) -> Any:
    return and_(WebhookDelivery.tenant_id == tenant.id, WebhookDelivery.job_id == job_id)


async def _page_deliveries(session: AsyncSession, where: Any, *, limit: int,
                           cursor: str | None) -> tuple[list[WebhookDeliveryOut], str | None]:
    rows = list(await session.scalars(_newest_first(
        select(WebhookDelivery).where(where), WebhookDelivery, limit=limit, cursor=cursor)))
    more, rows = len(rows) > limit, rows[:limit]
    return (await _deliveries_out(session, rows),
            encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None)


async def page_endpoint_deliveries(
    *, session: AsyncSession, endpoint: WebhookEndpoint, limit: int, cursor: str | None,
) -> tuple[list[WebhookDeliveryOut], str | None]:
    return await _page_deliveries(session, _of_endpoint(endpoint), limit=limit, cursor=cursor)


async def page_job_deliveries(
    *, session: AsyncSession, tenant: Tenant, job_id: str, limit: int, cursor: str | None,
) -> tuple[list[WebhookDeliveryOut], str | None]:
    """Every delivery of the job's events: to its own webhook and to the tenant's endpoints."""
    await _tenant_job(session, tenant, job_id)
    return await _page_deliveries(session, _of_job(tenant, job_id), limit=limit, cursor=cursor)


def _new_delivery(*, tenant_id: str, endpoint_id: str | None, job_id: str | None, url: str,
                  event_type: str, event_id: str, seq: int | None) -> WebhookDelivery:
    now = utcnow()
    return WebhookDelivery(
        id=new_id(), tenant_id=tenant_id, endpoint_id=endpoint_id, job_id=job_id, url=url,
        event_type=event_type, event_id=event_id, seq=seq, status=PENDING, attempts=0,
        next_attempt_at=now, last_attempt_at=None, created_at=now, updated_at=now)


async def ping(*, session: AsyncSession, endpoint: WebhookEndpoint) -> WebhookDelivery:
    """A ``ping`` to the endpoint, due now; sent like any delivery, so its log shows what the
    receiver answered."""
    delivery = _new_delivery(tenant_id=endpoint.tenant_id, endpoint_id=endpoint.id, job_id=None,
                             url=endpoint.url, event_type=PING,
                             event_id=f"msg_{uuid.uuid4().hex}", seq=None)
    session.add(delivery)
    await session.commit()
    return delivery


async def _original(session: AsyncSession, where: Any, delivery_id: str) -> WebhookDelivery:
    original = await session.scalar(select(WebhookDelivery).where(
        where, WebhookDelivery.id == delivery_id))
    if original is None:
        raise NotFound(f"delivery {delivery_id} not found", code="delivery_not_found")
    return original


async def _redeliver(session: AsyncSession, original: WebhookDelivery, *,
                     url: str) -> WebhookDelivery:
    """A new pending delivery of the same event, due now, keeping its ``event_id`` so a
    receiver that did get the first one can tell."""
    again = _new_delivery(tenant_id=original.tenant_id, endpoint_id=original.endpoint_id,
                          job_id=original.job_id, url=url, event_type=original.event_type,
                          event_id=original.event_id, seq=original.seq)
    session.add(again)
    await session.commit()
    return again


async def redeliver_endpoint_delivery(*, session: AsyncSession, endpoint: WebhookEndpoint,
                                      delivery_id: str) -> WebhookDelivery:
    """Sent to the endpoint's URL as it is now, which may have changed since."""
    original = await _original(session, _of_endpoint(endpoint), delivery_id)
    return await _redeliver(session, original, url=endpoint.url)


async def redeliver_job_delivery(*, session: AsyncSession, tenant: Tenant, job_id: str,
                                 delivery_id: str) -> WebhookDelivery:
    """To the job's own webhook, or to the endpoint's URL as it is now. A delivery whose
    endpoint was deleted is refused: a null ``endpoint_id`` would make it the job webhook's,
    signed with the job secret, at a URL the tenant took away."""
    await _tenant_job(session, tenant, job_id)
    original = await _original(session, _of_job(tenant, job_id), delivery_id)
    if original.endpoint_id is not None:
        endpoint = await session.get(WebhookEndpoint, original.endpoint_id)
        assert endpoint is not None  # deleting one nulls its deliveries' endpoint_id
        return await _redeliver(session, original, url=endpoint.url)
    if original.seq is None or original.event_id != event_id(job_id, original.seq, None):
        raise Conflict(f"the webhook endpoint of delivery {delivery_id} was deleted",
                       code="webhook_deleted")
    return await _redeliver(session, original, url=original.url)
