"""What the models API returns."""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field


class ModelOrigin(StrEnum):
    BUILTIN = "builtin"
    MODELS_FILE = "models_file"
    MODELS_DIR = "models_dir"


class WeightsFormat(StrEnum):
    BUILTIN = "builtin"
    HUB = "hub"
    DIFFUSERS_FOLDER = "diffusers_folder"
    SINGLE_FILE = "single_file"


class InpaintingOut(BaseModel):
    supported: bool = Field(description="Whether `mode: inpaint` (and outpaint) can use it.")
    dedicated: bool = Field(description="True when the preset names a dedicated inpainting "
                            "model; false when inpainting runs through the base model (the "
                            "standard fallback).")


class ModelOut(BaseModel):
    name: str = Field(examples=["sd15"], description="The preset's name: a generation's "
                      "`model`.")
    family: str = Field(examples=["sd15"], description="sd15, sdxl or flux: which LoRAs fit "
                        "and which options apply.")
    description: str = Field(description="What the preset is, for people.")
    origin: ModelOrigin = Field(description="Where the preset comes from: `builtin` (shipped "
                                "with Loomis), `models_file` (LOOMIS_MODELS__MODELS_FILE) or "
                                "`models_dir` (found in LOOMIS_MODELS__MODELS_DIR).")
    source: str = Field(examples=["stabilityai/stable-diffusion-xl-base-1.0"],
                        description="The weights as the operator configured them: "
                        "`builtin:<name>`, a hub id, or a path; for a model found in the "
                        "models folder, its path relative to that folder.")
    format: WeightsFormat = Field(description="`builtin` (built locally from configs), `hub` "
                                  "(a hub id resolved in the model cache), `diffusers_folder` "
                                  "or `single_file` (one .safetensors checkpoint).")
    weights_present: bool = Field(description="Whether its weights are there as the gateway "
                                  "sees them: the file or folder exists, or the hub id is in "
                                  "the model cache (built-in models are built on first use). "
                                  "False means a job for it fails unless generators can "
                                  "download it.")
    default_width: int = Field(description="Width when a request gives none, in px.")
    default_height: int = Field(description="Height when a request gives none, in px.")
    min_width: int = Field(description="Smallest width accepted, in px.")
    min_height: int = Field(description="Smallest height accepted, in px.")
    max_width: int = Field(description="Largest width accepted, in px.")
    max_height: int = Field(description="Largest height accepted, in px.")
    size_multiple: int = Field(description="Width and height must be multiples of this.")
    default_steps: int = Field(description="Steps when a request gives none.")
    max_steps: int = Field(description="Most steps accepted.")
    default_guidance: float = Field(description="Guidance scale when a request gives none.")
    schedulers: list[str] = Field(description="Scheduler names a request may give.")
    controlnets: list[str] = Field(description="Control types (`controls[].type`) it has a "
                                   "ControlNet for.")
    inpainting: InpaintingOut = Field(description="Inpainting support.")
    lora_dim: int | None = Field(description="Input width of the attention layers LoRAs "
                                 "attach to; LoRAs of another width are refused. Null: not "
                                 "checked.")


class ModelPage(BaseModel):
    items: list[ModelOut] = Field(description="Every preset, by name.")
    default_model: str = Field(description="The preset a generation without `model` uses.")
