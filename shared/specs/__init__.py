"""Job specs, one module per job kind; importing from ``shared.specs`` keeps working for all.

``common`` holds what every kind shares (kinds, statuses, seeds, artifacts, LoRA references);
``generation``, ``sweep`` and ``tagging`` hold each kind's request, queued task and manifest.
Training's spec is :mod:`shared.training`.
"""

from __future__ import annotations

from shared.specs.common import (
    LORA_NAME_RULE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    TERMINAL_STATUSES,
    ArtifactRef,
    JobKind,
    JobStatus,
    LoraName,
    LoraRef,
    Prompt,
    SafetyPolicy,
    Size,
)
from shared.specs.generation import (
    EXAMPLE_POSE,
    CircleShape,
    ControlSpec,
    EllipseShape,
    GenerationMode,
    GenerationSpec,
    GenerationTask,
    ImageRef,
    LoraUse,
    MaskShape,
    MaskSpec,
    OutpaintSpec,
    PadPixels,
    PolygonShape,
    PreprocessSpec,
    PreprocessTask,
    RectShape,
)
from shared.specs.sweep import (
    MAX_SWEEP_CELLS,
    SweepAxis,
    SweepCell,
    SweepSpec,
    SweepTask,
)
from shared.specs.tagging import (
    CaptionOptions,
    CleanOptions,
    TaggingItem,
    TaggingSpec,
    TaggingTask,
    TagOptionsSpec,
)

__all__ = [
    "ArtifactRef",
    "CaptionOptions",
    "CircleShape",
    "CleanOptions",
    "ControlSpec",
    "EXAMPLE_POSE",
    "EllipseShape",
    "GenerationMode",
    "GenerationSpec",
    "GenerationTask",
    "ImageRef",
    "JobKind",
    "JobStatus",
    "LORA_NAME_RULE",
    "LoraName",
    "LoraRef",
    "LoraUse",
    "MAX_PROMPT_CHARS",
    "MAX_SEED",
    "MAX_SWEEP_CELLS",
    "MaskShape",
    "MaskSpec",
    "OutpaintSpec",
    "PadPixels",
    "PolygonShape",
    "PreprocessSpec",
    "PreprocessTask",
    "Prompt",
    "RectShape",
    "SafetyPolicy",
    "Size",
    "SweepAxis",
    "SweepCell",
    "SweepSpec",
    "SweepTask",
    "TERMINAL_STATUSES",
    "TagOptionsSpec",
    "TaggingItem",
    "TaggingSpec",
    "TaggingTask",
]
