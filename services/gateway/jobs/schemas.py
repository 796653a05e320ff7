"""What the jobs API returns."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from shared.specs import JobKind, JobStatus


class JobError(BaseModel):
    code: str = Field(examples=["model_unavailable"])
    message: str


class ArtifactOut(BaseModel):
    kind: str = Field(examples=["image"])
    index: int | None = None
    url: str = Field(description="Presigned download URL, valid for a limited time.")
    content_type: str
    size: int
    sha256: str
    width: int | None = None
    height: int | None = None
    seed: int | None = None


class JobOut(BaseModel):
    id: str
    kind: JobKind
    status: JobStatus
    progress: float = Field(description="0..1")
    cancel_requested: bool
    spec: dict[str, Any] = Field(description="The resolved spec: every server-chosen field filled.")
    error: JobError | None = None
    artifacts: list[ArtifactOut] = Field(default_factory=list)
    result: dict[str, Any] = Field(default_factory=dict, description="Timings and worker facts.")
    attempts: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    links: dict[str, str]


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= to get the next page.")
