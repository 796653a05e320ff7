"""What the LoRA API returns."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class LoraOut(BaseModel):
    id: str
    name: str
    family: str = Field(examples=["sd15"])
    base_model: str = Field(examples=["sd15"], description="The preset it was checked against.")
    format: str = Field(examples=["kohya"], description="Key naming of the uploaded file.")
    rank: int
    size: int
    sha256: str
    source: str = Field(examples=["upload"], description="upload or training")
    info: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime


class LoraPage(BaseModel):
    items: list[LoraOut]
