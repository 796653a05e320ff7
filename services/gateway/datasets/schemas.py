"""What the datasets API returns."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from shared.text import MULTILINE, RequestModel


class DatasetOut(BaseModel):
    id: str = Field(description="The dataset's id.")
    name: str = Field(description="Its name, as given at upload.")
    caption_extension: str = Field(description="Extension of the caption files read and written, e.g. "
                                   "`.caption`.")
    min_side: int = Field(description="Training resolution: smaller images are flagged `small`.")
    report: dict[str, Any] = Field(description="Subsets, counts, sizes, aspect ratios, "
                                   "captions present/missing, tag frequency, flags; "
                                   "`dataset_config`: what the uploaded TOML's datasets and "
                                   "subsets train with (null without one).")
    dataset_config: str | None = Field(default=None, description="The kohya `dataset_config.toml` "
                                       "the upload brought, as uploaded; a training that names this "
                                       "dataset without its own `dataset_config` uses it.")
    upload: dict[str, Any] = Field(description="Duplicates dropped, entries ignored, renames.")
    created_at: datetime = Field(description="When it was created (RFC 3339, UTC).")
    links: dict[str, str] = Field(description="Related URLs: `self`, `items`, `export`, `tag`.")


class DatasetPage(BaseModel):
    items: list[DatasetOut] = Field(description="The tenant's datasets.")


class ItemOut(BaseModel):
    id: str = Field(description="The item's id.")
    subset: str = Field(description="The kohya subset folder it belongs to, e.g. `10_sks dog`.")
    path: str = Field(description="Path inside the dataset, e.g. `img/10_sks dog/a.png`.")
    filename: str = Field(description="The image's file name.")
    width: int = Field(description="Width in pixels.")
    height: int = Field(description="Height in pixels.")
    format: str = Field(description="Image format, e.g. PNG or JPEG.")
    sha256: str = Field(description="SHA-256 of the image bytes, hex.")
    caption: str | None = Field(description="Its caption, from a caption file, a tagging job or an edit; "
                                "null when missing.")
    tags: list[str] = Field(description="Its tags, from a tagging job or an edit.")
    flags: list[str] = Field(description="Problems found, e.g. `small` (below the dataset's min_side).")
    error: str | None = Field(default=None, description="The last tagging error for this image.")
    thumbnail_url: str = Field(description="Presigned URL of a small preview.")
    url: str = Field(description="Presigned URL of the image.")


class ItemPage(BaseModel):
    items: list[ItemOut] = Field(description="Items in path order.")
    next_cursor: str | None = Field(description="Pass as ?cursor= to get the next page; null on the last.")


class ItemPatch(RequestModel):
    """Fix a caption or the tags by hand; fields left out are unchanged."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"caption": "a photo of sks dog on a beach"}, {"tags": ["dog", "beach", "solo"]}]})

    caption: Annotated[str | None, MULTILINE] = Field(default=None, max_length=2000,
                                                      description="The new caption; an empty string clears "
                                                      "it.")
    tags: list[str] | None = Field(default=None, max_length=500, description="The new tag list, replacing "
                                   "the old one.")
