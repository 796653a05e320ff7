"""What the datasets API returns."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from shared.text import MULTILINE, RequestModel


class DatasetOut(BaseModel):
    id: str
    name: str
    caption_extension: str
    min_side: int = Field(description="Training resolution: smaller images are flagged `small`.")
    report: dict[str, Any] = Field(description="Subsets, counts, sizes, aspect ratios, "
                                   "captions present/missing, tag frequency, flags.")
    upload: dict[str, Any] = Field(description="Duplicates dropped, entries ignored, renames.")
    created_at: datetime
    links: dict[str, str]


class DatasetPage(BaseModel):
    items: list[DatasetOut]


class ItemOut(BaseModel):
    id: str
    subset: str
    path: str
    filename: str
    width: int
    height: int
    format: str
    sha256: str
    caption: str | None
    tags: list[str]
    flags: list[str]
    error: str | None = Field(default=None, description="The last tagging error for this image.")
    thumbnail_url: str
    url: str


class ItemPage(BaseModel):
    items: list[ItemOut]
    next_cursor: str | None


class ItemPatch(RequestModel):
    """Fix a caption or the tags by hand; fields left out are unchanged."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"caption": "a photo of sks dog on a beach"}, {"tags": ["dog", "beach", "solo"]}]})

    caption: Annotated[str | None, MULTILINE] = Field(default=None, max_length=2000)
    tags: list[str] | None = Field(default=None, max_length=500)
