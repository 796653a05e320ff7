"""What the webhooks API takes and returns: endpoints, their secrets, deliveries and attempts.

A secret is in a response only where it was just made (creation, rotation) or asked for by
name (the job secret); listings and reads never carry one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from shared.specs import MAX_WEBHOOK_URL_CHARS, WEBHOOK_EVENT_TYPES, JobKind
from shared.text import MULTILINE, RequestModel

DEFAULT_FILTERS = ["*.succeeded", "*.failed", "*.canceled"]
# A subject's stage changes: taken only by `subject.…` filters (a `*` kind means every job kind).
SUBJECT_EVENT_TYPES = ("preparing", "captioning", "training", "ready", "failed", "canceled",
                       "photos_deleted")
FILTER_RULE = ("`kind.type`: a job kind (" + ", ".join(kind.value for kind in JobKind)
               + ") or `*`, a dot, and an event type (" + ", ".join(WEBHOOK_EVENT_TYPES)
               + ") or `*`; or `subject.` and a subject event (" + ", ".join(SUBJECT_EVENT_TYPES)
               + ") or `*`")


def _check_filter(value: str) -> str:
    kind, dot, event_type = value.partition(".")
    kinds = {k.value for k in JobKind}
    if kind == "subject" and (event_type == "*" or event_type in SUBJECT_EVENT_TYPES):
        return value
    if not dot or (kind != "*" and kind not in kinds) or (
            event_type != "*" and event_type not in WEBHOOK_EVENT_TYPES):
        raise PydanticCustomError("webhook_filter", "'{value}' is not {rule}",
                                  {"value": value, "rule": FILTER_RULE})
    return value


EventFilter = Annotated[str, Field(max_length=40, examples=["generation.succeeded", "*.failed"]),
                        AfterValidator(_check_filter)]
EndpointUrl = Annotated[str, Field(min_length=1, max_length=MAX_WEBHOOK_URL_CHARS,
                                   examples=["https://example.com/loomis-hook"])]
Description = Annotated[str, MULTILINE, Field(max_length=500)]


def _unique(filters: list[str]) -> list[str]:
    return list(dict.fromkeys(filters))


Filters = Annotated[list[EventFilter], Field(min_length=1, max_length=64),
                    AfterValidator(_unique)]


class WebhookEndpointIn(RequestModel):
    """A standing webhook for your jobs' events; its signing secret is in the response, once."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"url": "https://example.com/loomis-hook", "events": ["*.succeeded", "*.failed"],
         "description": "production callbacks"},
        {"url": "https://example.com/training", "events": ["training.*"]},
    ]})

    url: EndpointUrl = Field(description="Where events are posted: https (http only where the "
                             "server allows it), not on a private network.")
    events: Filters = Field(default_factory=lambda: list(DEFAULT_FILTERS), description="Which "
                            f"events to post, each {FILTER_RULE}; e.g. `generation.succeeded`, "
                            "`*.failed`, `scene.*`. Default: every kind's terminal events.")
    description: Description = Field(default="", description="Your note on what it is for.")
    enabled: bool = Field(default=True, description="Disabled endpoints are sent nothing.")


class WebhookEndpointPatch(RequestModel):
    """Fields left out are unchanged; enabling it again clears why it was disabled."""

    model_config = ConfigDict(extra="forbid")

    url: EndpointUrl | None = Field(default=None, description="A new URL, checked as at creation.")
    events: Filters | None = Field(default=None, description=f"New filters, each {FILTER_RULE}.")
    description: Description | None = Field(default=None, description="A new description.")
    enabled: bool | None = Field(default=None, description="Enable or disable it.")

    @model_validator(mode="after")
    def _no_nulls(self) -> WebhookEndpointPatch:
        # named at the field, as a ValidationError raised here is, not at the whole body
        nulls = [name for name in ("url", "events", "description", "enabled")
                 if name in self.model_fields_set and getattr(self, name) is None]
        if nulls:
            raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                type=PydanticCustomError("value_error", "may be left out, not null"),
                loc=(name,), input=None) for name in nulls])
        return self


class WebhookEndpointOut(BaseModel):
    id: str = Field(description="The endpoint's id.")
    url: str = Field(description="Where its events are posted.")
    events: list[str] = Field(description="Its `kind.type` filters.")
    description: str = Field(description="Your note on what it is for.")
    enabled: bool = Field(description="Whether it is sent anything.")
    disabled_reason: str | None = Field(description="Why Loomis disabled it (a 410 Gone, days of "
                                        "failures); null when enabled or disabled by you.")
    failing_since: datetime | None = Field(description="The first failed attempt since its last "
                                           "success; null when it is not failing.")
    created_at: datetime = Field(description="When it was created (RFC 3339, UTC).")
    updated_at: datetime = Field(description="When it was last changed (RFC 3339, UTC).")
    links: dict[str, str] = Field(description="Related URLs: `self`, `deliveries`, `test`, "
                                  "`rotate_secret`.")


class WebhookEndpointCreated(WebhookEndpointOut):
    secret: str = Field(description="The signing secret (`whsec_…`), shown this once: verify "
                        "each delivery's `webhook-signature` with it (Standard Webhooks).")


class WebhookEndpointPage(BaseModel):
    items: list[WebhookEndpointOut] = Field(description="Your endpoints, newest first.")
    next_cursor: str | None = Field(description="Pass as ?cursor= to get the next page; null on "
                                    "the last.")


class WebhookSecret(BaseModel):
    secret: str = Field(description="The signing secret (`whsec_…`).")
    previous_secret_expires_at: datetime | None = Field(description="Until when the secret it "
                                                        "replaced still signs beside it (both "
                                                        "signatures are sent); null when none.")


class WebhookAttemptOut(BaseModel):
    at: datetime = Field(description="When the attempt started (RFC 3339, UTC).")
    status_code: int | None = Field(description="The receiver's HTTP status; null when no answer "
                                    "came (refused, timed out, connection error).")
    latency_ms: float = Field(description="Time to the answer (or the failure), milliseconds.")
    response_head: str = Field(description="The first KiB of the response body.")
    error: str | None = Field(description="Why the attempt failed when no status says it.")


class WebhookDeliveryOut(BaseModel):
    id: str = Field(description="The delivery's id (redeliver it by this id).")
    endpoint_id: str | None = Field(description="The endpoint it is for; null for the job's own "
                                    "webhook (or an endpoint deleted since).")
    job_id: str | None = Field(description="The job whose event it carries; null for a ping.")
    url: str = Field(description="Where it is posted.")
    event_type: str = Field(examples=["job.succeeded"], description="`job.<event>` (running, "
                            "progress, sample, succeeded, failed, canceled) or `ping`.")
    event_id: str = Field(description="The `webhook-id` header: the same for every delivery of "
                          "this event to this target, redeliveries included, so you can drop "
                          "duplicates.")
    seq: int | None = Field(description="The job event's sequence number; null for a ping.")
    status: Literal["pending", "delivering", "succeeded", "failed"] = Field(
        description="pending (waiting for its next attempt), delivering, succeeded, or failed "
        "(its retries ran out; redeliver it to try again).")
    next_attempt_at: datetime | None = Field(description="When it is next tried; null when "
                                             "finished.")
    last_attempt_at: datetime | None = Field(description="When it was last tried.")
    created_at: datetime = Field(description="When it was created (RFC 3339, UTC).")
    attempts: list[WebhookAttemptOut] = Field(description="Every attempt, oldest first.")


class WebhookDeliveryPage(BaseModel):
    items: list[WebhookDeliveryOut] = Field(description="Deliveries, newest first.")
    next_cursor: str | None = Field(description="Pass as ?cursor= to get the next page; null on "
                                    "the last.")
