"""SQL tables. Every row that belongs to a customer carries ``tenant_id``."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is aware UTC on the way in and on the way out, on every database.

    SQLite has no time zone type and hands back naive datetimes, which the API would print
    without an offset (not RFC 3339); PostgreSQL hands back the session's zone. Both are
    normalised here, once, rather than in every response model.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        # Naive values (an old cursor, a hand-built datetime) are taken as UTC.
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime()}


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Output safety filter: None (off), "blur" or "withhold" above ``safety_threshold``.
    safety_action: Mapped[str | None] = mapped_column(String(20), default=None)
    safety_threshold: Mapped[float] = mapped_column(Float, default=0.8)


class ApiKey(Base):
    """Only a SHA-256 of the key is kept: keys are 256-bit random, so a slow hash adds nothing."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)

    tenant: Mapped[Tenant] = relationship(lazy="joined")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant_id", "idempotency_key", name="uq_jobs_tenant_idempotency"),
        Index("ix_jobs_tenant_created", "tenant_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), index=True)
    spec: Mapped[dict[str, Any]]
    idempotency_key: Mapped[str | None] = mapped_column(String(200), default=None)
    request_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # The job's own webhook, {url, events} (a WebhookTarget): kept here, not in ``spec``, so
    # no worker ever sees it.
    webhook: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)

    artifacts: Mapped[list[Artifact]] = relationship(
        order_by="Artifact.id", lazy="selectin", cascade="all, delete-orphan"
    )


class JobEventRow(Base):
    """Every event applied, once: the unique (job, seq) is what makes re-delivery harmless."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20))
    at: Mapped[datetime]
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "key", name="uq_artifacts_job_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(String(36))
    key: Mapped[str] = mapped_column(String(500))
    kind: Mapped[str] = mapped_column(String(20))
    index: Mapped[int | None] = mapped_column(Integer, default=None)
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    width: Mapped[int | None] = mapped_column(Integer, default=None)
    height: Mapped[int | None] = mapped_column(Integer, default=None)
    seed: Mapped[int | None] = mapped_column(BigInteger, default=None)


class Lora(Base):
    """An uploaded (or, later, trained) LoRA adapter. The file lives in object storage."""

    __tablename__ = "loras"
    __table_args__ = (Index("ix_loras_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    family: Mapped[str] = mapped_column(String(20))
    base_model: Mapped[str] = mapped_column(String(100))
    key: Mapped[str] = mapped_column(String(500))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(20))
    rank: Mapped[int] = mapped_column(Integer)
    info: Mapped[dict[str, Any]] = mapped_column(default=dict)
    source: Mapped[str] = mapped_column(String(20), default="upload")
    # The subject it was trained from (a person's photos): deleted with the subject.
    subject_id: Mapped[str | None] = mapped_column(String(36), default=None, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    """A set of training images (kohya subsets), stored under ``datasets/{tenant}/{id}/``."""

    __tablename__ = "datasets"
    __table_args__ = (Index("ix_datasets_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    caption_extension: Mapped[str] = mapped_column(String(20), default=".caption")
    min_side: Mapped[int] = mapped_column(Integer, default=512)
    # {"subsets": [{name, repeats, identifier, class_token, is_reg}], "dataset_config": the
    # kohya TOML the upload brought, or null} in kohya terms.
    subsets: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # What the upload reported beyond the items: duplicates, ignored entries, renames.
    upload_report: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class DatasetItem(Base):
    __tablename__ = "dataset_items"
    __table_args__ = (UniqueConstraint("dataset_id", "path", name="uq_dataset_items_path"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"),
                                            index=True)
    tenant_id: Mapped[str] = mapped_column(String(36))
    subset: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(String(500))
    filename: Mapped[str] = mapped_column(String(300))
    key: Mapped[str] = mapped_column(String(700))
    thumb_key: Mapped[str] = mapped_column(String(700))
    sha256: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(10))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    caption: Mapped[str | None] = mapped_column(Text, default=None)
    tags: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"tags": [...]} (JSON list)
    flags: Mapped[dict[str, Any]] = mapped_column(default=dict)  # {"flags": [...], "error": …}
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Place(Base):
    """A point of interest of the scenes catalog; its backgrounds are :class:`PlaceImage` rows."""

    __tablename__ = "places"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_places_tenant_name"),
                      Index("ix_places_tenant_created", "tenant_id", "created_at", "id"))

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class PlaceImage(Base):
    """A background photo of a place, stored as a checked PNG under ``places/{tenant}/{place}/``."""

    __tablename__ = "place_images"
    __table_args__ = (UniqueConstraint("place_id", "name", name="uq_place_images_place_name"),
                      Index("ix_place_images_place_created", "place_id", "created_at", "id"))

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(String(36))
    place_id: Mapped[str] = mapped_column(ForeignKey("places.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")
    key: Mapped[str] = mapped_column(String(500))
    thumb_key: Mapped[str] = mapped_column(String(500))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    content_type: Mapped[str] = mapped_column(String(100))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Action(Base):
    """What a scene's subject does (waving, sitting, …), posed per shot by :class:`ActionShot`."""

    __tablename__ = "actions"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_actions_tenant_name"),
                      Index("ix_actions_tenant_created", "tenant_id", "created_at", "id"))

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")
    # A cache the scene job fills: the sentence embedding of name + description and a hash of
    # the text (and model) it was made from; cleared whenever the name or description changes.
    embedding: Mapped[list[float] | None] = mapped_column(JSON, default=None)
    embedding_hash: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    shots: Mapped[list[ActionShot]] = relationship(
        order_by="ActionShot.shot", lazy="selectin", cascade="all, delete-orphan")


class ActionShot(Base):
    """One shot (close, medium, far) of an action: a pose guide and, optionally, its masks.

    The pose is OpenPose keypoints (``pose_kind`` "keypoints", drawn as an openpose control) or
    a mannequin image (``pose_kind`` "image") read by the ControlNet ``control`` names. Masks,
    when given, have the pose image's (or keypoint canvas') size; ``placement`` is
    ``{x, y, height}`` as fractions of the background.
    """

    __tablename__ = "action_shots"
    __table_args__ = (UniqueConstraint("action_id", "shot", name="uq_action_shots_action_shot"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    action_id: Mapped[str] = mapped_column(ForeignKey("actions.id", ondelete="CASCADE"),
                                           index=True)
    shot: Mapped[str] = mapped_column(String(10))
    pose_kind: Mapped[str] = mapped_column(String(10))
    control: Mapped[str] = mapped_column(String(20))
    keypoints: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    canvas_width: Mapped[int] = mapped_column(Integer)
    canvas_height: Mapped[int] = mapped_column(Integer)
    pose_image_key: Mapped[str | None] = mapped_column(String(500), default=None)
    body_mask_key: Mapped[str | None] = mapped_column(String(500), default=None)
    face_mask_key: Mapped[str | None] = mapped_column(String(500), default=None)
    placement: Mapped[dict[str, Any] | None] = mapped_column(default=None)


class WebhookEndpoint(Base):
    """A tenant's standing webhook: every job event matching one of its ``events`` filters
    (``"kind.type"``, ``*`` for any) becomes a :class:`WebhookDelivery` to ``url``."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_tenant_created", "tenant_id", "created_at",
                            "id"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    events: Mapped[list[str]] = mapped_column(JSON)
    description: Mapped[str] = mapped_column(Text, default="")
    enabled: Mapped[bool] = mapped_column(default=True)
    # Why the gateway disabled it (a 410, days of failures); null when enabled or when the
    # tenant disabled it.
    disabled_reason: Mapped[str | None] = mapped_column(Text, default=None)
    # Signing secrets ("whsec_…"); the previous one keeps signing beside the new one until
    # ``previous_secret_until`` after a rotation.
    secret: Mapped[str] = mapped_column(String(100))
    previous_secret: Mapped[str | None] = mapped_column(String(100), default=None)
    previous_secret_until: Mapped[datetime | None] = mapped_column(default=None)
    # The first failed attempt since the last success: the dispatcher disables an endpoint
    # that has failed everything for long enough.
    failing_since: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class TenantWebhookSecret(Base):
    """The secret that signs a tenant's per-job webhooks (``jobs.webhook``), made on first use."""

    __tablename__ = "tenant_webhook_secrets"

    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"),
                                           primary_key=True)
    secret: Mapped[str] = mapped_column(String(100))
    previous_secret: Mapped[str | None] = mapped_column(String(100), default=None)
    previous_secret_until: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One event to send to one URL, durable until it succeeds or its retries run out.

    ``event_id`` is the ``webhook-id`` header: stable per (job, seq, target), and kept by a
    redelivery, so a receiver can drop what it has already seen. The dispatcher picks rows by
    (status, next_attempt_at).
    """

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at", "id"),
        Index("ix_webhook_deliveries_job_created", "job_id", "created_at", "id"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"),
                                           index=True)
    # null: the job's own webhook (jobs.webhook), or an endpoint deleted since
    endpoint_id: Mapped[str | None] = mapped_column(
        ForeignKey("webhook_endpoints.id", ondelete="SET NULL"), default=None)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                               default=None)
    url: Mapped[str] = mapped_column(String(2048))
    event_type: Mapped[str] = mapped_column(String(40))
    event_id: Mapped[str] = mapped_column(String(120))
    seq: Mapped[int | None] = mapped_column(Integer, default=None)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    last_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    # A subject's stage change (``job_id`` null): the payload is the subject as it is then.
    subject_id: Mapped[str | None] = mapped_column(String(36), default=None, index=True)


class WebhookAttempt(Base):
    """One try of a delivery: what the receiver answered (its first KiB) or why it failed."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    response_head: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text, default=None)


class JobLora(Base):
    """Lineage: a LoRA a job used (and the subject it came from), recorded with the job row, so
    forgetting a LoRA or a subject finds every output made with it."""

    __tablename__ = "job_loras"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"),
                                        primary_key=True)
    lora_id: Mapped[str] = mapped_column(String(36), primary_key=True, index=True)
    tenant_id: Mapped[str] = mapped_column(String(36))
    subject_id: Mapped[str | None] = mapped_column(String(36), default=None, index=True)
    sha256: Mapped[str] = mapped_column(String(64))


class Subject(Base):
    """A person's photos on their way to a LoRA, and what became of everything derived from
    them. ``status`` is the lifecycle (preparing, captioning, training, ready, failed, canceled,
    deleting); each stage's job id is set when the stage starts."""

    __tablename__ = "subjects"
    __table_args__ = (Index("ix_subjects_tenant_created", "tenant_id", "created_at", "id"),
                      UniqueConstraint("tenant_id", "token", name="uq_subjects_tenant_token"))

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    class_word: Mapped[str] = mapped_column(String(40))
    token: Mapped[str] = mapped_column(String(40))
    preset: Mapped[str] = mapped_column(String(20))
    # the training request the preset and overrides made (less dataset and name)
    training: Mapped[dict[str, Any]] = mapped_column(default=dict)
    overrides: Mapped[dict[str, Any]] = mapped_column(default=dict)
    caption: Mapped[bool] = mapped_column(default=False)
    retain_photos: Mapped[bool] = mapped_column(default=False)
    consent: Mapped[str] = mapped_column(Text)
    webhook: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    status: Mapped[str] = mapped_column(String(20), index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    photos: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    # photos under the training resolution ({photo, width, height}): upscaled, they teach less
    small_photos: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    dataset_id: Mapped[str | None] = mapped_column(String(36), default=None)
    tagging_job_id: Mapped[str | None] = mapped_column(String(36), default=None, index=True)
    training_job_id: Mapped[str | None] = mapped_column(String(36), default=None, index=True)
    lora_id: Mapped[str | None] = mapped_column(String(36), default=None)
    trigger_words: Mapped[list[str]] = mapped_column(JSON, default=list)
    error_code: Mapped[str | None] = mapped_column(String(64), default=None)
    error_message: Mapped[str | None] = mapped_column(Text, default=None)
    # what retention removed and when ({at, objects, items, ...}); null while photos are kept
    purged: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    # a DELETE in progress: what it must remove, kept until it is done
    deletion: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    last_seq: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class SubjectEvent(Base):
    """A subject's stage changes, in order: its event stream's durable part."""

    __tablename__ = "subject_events"
    __table_args__ = (UniqueConstraint("subject_id", "seq", name="uq_subject_events_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject_id: Mapped[str] = mapped_column(ForeignKey("subjects.id", ondelete="CASCADE"),
                                            index=True)
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(20))
    stage: Mapped[str] = mapped_column(String(20))
    at: Mapped[datetime] = mapped_column(default=utcnow)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)


class LoraDeletion(Base):
    """A ``DELETE /v1/loras/{id}`` still under way (its row is gone, its traces may not be):
    retried until done, then removed."""

    __tablename__ = "lora_deletions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    plan: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CompatOption(Base):
    """An AUTOMATIC1111 client's settings (``POST /sdapi/v1/options``), per API key: the model
    its requests use when they name none (``sd_model_checkpoint``)."""

    __tablename__ = "compat_options"

    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    options: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
