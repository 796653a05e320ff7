"""Sweeps: one or two parameter axes over a base generation, rendered as a contact sheet."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from shared.specs.common import JobWebhook, LoraRef, SafetyPolicy
from shared.specs.generation import GenerationSpec
from shared.text import MULTILINE, RequestModel

MAX_SWEEP_CELLS = 64


class SweepAxis(RequestModel):
    model_config = ConfigDict(extra="forbid")

    param: Literal["guidance_scale", "steps", "seed", "scheduler", "eta", "strength", "prompt",
                   "negative_prompt"] = Field(description="The spec field this axis varies.")
    # Strict: a JSON true is not the number 1 (nor a seed of 1) and was accepted as one.
    values: Annotated[list[StrictInt | StrictFloat | StrictStr], MULTILINE] = Field(
        min_length=1, max_length=32,
        description="The values it takes, 1-32; each is validated as that field.",
    )


class SweepSpec(RequestModel):
    """Every combination of one or two parameter axes over a base spec, plus a contact sheet."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "base": {"prompt": "a lighthouse at dusk", "model": "tiny-sd15", "steps": 4},
            "axes": [{"param": "guidance_scale", "values": [2, 5, 7.5, 10, 15]},
                     {"param": "seed", "values": [42, 123]}],
        }]},
    )

    base: GenerationSpec = Field(description="The generation every cell starts from (num_images 1).")
    axes: list[SweepAxis] = Field(min_length=1, max_length=2, description="The first axis runs "
                                  "along the sheet's columns, the second down its rows.")
    title: str = Field(default="", max_length=200, description="Printed at the top of the contact sheet.")
    webhook: JobWebhook = None

    @model_validator(mode="after")
    def _grid(self) -> SweepSpec:
        # Each error at the field a client has to change (`axes`, `base.num_images`), not `body`.
        errors: list[InitErrorDetails] = []

        def refuse(loc: tuple[str | int, ...], message: str, value: Any) -> None:
            errors.append(InitErrorDetails(type=PydanticCustomError(
                "value_error", "{reason}", {"reason": message}), loc=loc, input=value))

        if len(self.axes) == 2 and self.axes[0].param == self.axes[1].param:
            refuse(("axes", 1, "param"), "the two axes must vary different parameters",
                   self.axes[1].param)
        cells = 1
        for axis in self.axes:
            cells *= len(axis.values)
        if cells > MAX_SWEEP_CELLS:
            refuse(("axes",), f"{cells} cells; a sweep makes at most {MAX_SWEEP_CELLS}", cells)
        if self.base.webhook is not None:
            refuse(("base", "webhook"), "a sweep is one job: give its webhook as the sweep's "
                   "`webhook`", None)
        if self.base.num_images != 1:
            refuse(("base", "num_images"), "a sweep renders one image per cell: leave it at 1",
                   self.base.num_images)
        if errors:
            raise PydanticValidationError.from_exception_data(type(self).__name__, errors)
        return self


class SweepCell(BaseModel):
    index: int
    row: int
    col: int
    labels: dict[str, Any]
    spec: GenerationSpec


class SweepTask(BaseModel):
    job_id: str
    tenant_id: str
    sweep: SweepSpec
    cells: list[SweepCell]
    inputs: dict[str, str] = Field(default_factory=dict)
    loras: list[LoraRef] = Field(default_factory=list)
    safety: SafetyPolicy | None = None
