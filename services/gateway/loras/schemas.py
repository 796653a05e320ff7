"""What the LoRA API returns."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class LoraOut(BaseModel):
    id: str = Field(description="The LoRA's id: use it in a generation's `loras`.")
    name: str = Field(description="Its name.")
    family: str = Field(examples=["sd15"], description="The model family it fits: sd15, sdxl or flux.")
    base_model: str = Field(examples=["sd15"], description="The preset it was checked against.")
    format: str = Field(examples=["kohya"], description="Key naming of the uploaded file.")
    rank: int = Field(description="The network rank (dim).")
    size: int = Field(description="File size in bytes.")
    sha256: str = Field(description="SHA-256 of the file, hex.")
    source: str = Field(examples=["upload"], description="upload, training or import "
                        "(`loomis loras import`)")
    info: dict[str, Any] = Field(default_factory=dict, description="What the file's header says: targets, "
                                 "layer widths, text encoder, metadata (kohya `ss_*`).")
    created_at: datetime = Field(description="When it was uploaded or trained (RFC 3339, UTC).")


class LoraPage(BaseModel):
    items: list[LoraOut] = Field(description="The tenant's LoRAs.")
