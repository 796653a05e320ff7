"""Scene specs: a described person put into a place's photo, posed by an action's shot, with
their face from their LoRA — the request, the prompt template and what the generator is given.

The gateway resolves names to catalog rows and checks the generation parameters against the
model; the generator picks the action when the request describes it in words (the embedding
model lives there), fits the shot's pose and masks onto the background and runs both stages.
"""

from __future__ import annotations

import string
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from shared.models import ControlType
from shared.specs.common import MAX_SEED, JobWebhook, SafetyPolicy
from shared.text import RequestModel


class Shot(StrEnum):
    CLOSE = "close"
    MEDIUM = "medium"
    FAR = "far"


# The old application's codes (close, medium distance, far), still accepted.
SHOT_ALIASES = {"CLS": Shot.CLOSE, "MES": Shot.MEDIUM, "FUS": Shot.FAR}


def shot_of(value: object) -> object:
    """``CLS``/``MES``/``FUS`` (any case) as the shot they name; anything else is left to the enum."""
    if isinstance(value, str) and value.upper() in SHOT_ALIASES:
        return SHOT_ALIASES[value.upper()]
    return value


ShotName = Annotated[Shot, BeforeValidator(shot_of), Field(
    description="close, medium or far (the old codes CLS, MES, FUS are accepted).")]


class Age(StrEnum):
    YOUNG = "young"
    ADULT = "adult"
    OLD = "old"


class Gender(StrEnum):
    MAN = "man"
    WOMAN = "woman"


class SceneSubject(RequestModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, min_length=1, max_length=64, description="A ready "
                           "subject's id (`POST /v1/subjects`): its LoRA and trigger words in the "
                           "face stage. A bare id string may stand for the whole object.")
    age: Age = Field(default=Age.ADULT, description="young, adult or old.")
    gender: Gender | None = Field(default=None, description="man or woman; with a subject `id`, "
                                  "its class word (man, woman, person…) when left out.")

    @model_validator(mode="before")
    @classmethod
    def _bare_id(cls, value: Any) -> Any:
        return {"id": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _someone(self) -> SceneSubject:
        if self.gender is None and self.id is None:
            raise ValueError("give `gender` (or a subject's `id`)")
        return self
    details: str = Field(default="", max_length=300, description="What they wear or look like; "
                         "in the prompt as \"wearing …\".")


# Every name a prompt template may use, with what it becomes.
PROMPT_FIELDS = {
    "age": "the subject's age (young, adult, old)",
    "gender": "man or woman",
    "details": "the subject's details as given",
    "wearing": "\", wearing {details}\" when details are given, else empty",
    "action": "the action's description",
    "action_name": "the action's name",
    "place": "the place's description",
    "image": "the background image's description",
    "trigger": "the face LoRA's trigger words (empty without a LoRA)",
}
DEFAULT_PROMPT_TEMPLATE = "a photo of {trigger}{age} {gender}{wearing}, {action}, {image}, {place}"


def template_fields(template: str) -> list[str]:
    """The names a template uses; a ValueError for a malformed one or an unknown name."""
    try:
        parsed = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as exc:
        raise ValueError(f"not a valid template: {exc}") from exc
    names = [name for name, _, _ in parsed]
    for name, spec, conv in parsed:
        # `{age:>99999999}` would make a prompt of any size; fields are only ever inserted
        if spec or conv:
            raise ValueError(f"{{{name}}} takes no format spec or conversion")
        if name not in PROMPT_FIELDS:
            raise ValueError(f"unknown field {{{name}}}; use any of: "
                             + ", ".join(f"{{{n}}}" for n in PROMPT_FIELDS))
    return names


def prompt_values(subject: SceneSubject, *, action_name: str, action_description: str,
                  place: str, image: str, trigger: str = "", gender: str = "person") -> dict[str, str]:
    """What each template field becomes for one scene (``trigger``: the LoRA's trigger words,
    in the face stage only; ``gender``: the word when the subject gives none)."""
    details = subject.details.strip()
    return {
        "age": subject.age.value, "gender": subject.gender.value if subject.gender else gender,
        "details": details,
        "wearing": f", wearing {details}" if details else "",
        "action": action_description or action_name, "action_name": action_name,
        "place": place, "image": image, "trigger": f"{trigger} " if trigger else "",
    }


def render_prompt(template: str, values: dict[str, str]) -> str:
    """The template with ``values`` filled in, blanks tidied (a field may be empty)."""
    text = template.format_map({name: values.get(name, "") for name in PROMPT_FIELDS})
    parts = [" ".join(part.split()) for part in text.split(",")]
    return ", ".join(part for part in parts if part)


class SceneStrength(RequestModel):
    model_config = ConfigDict(extra="forbid")

    body: float = Field(default=1.0, gt=0, le=1, description="Stage 1 (the person inside the "
                        "body mask): 1 repaints fully.")
    face: float = Field(default=0.6, gt=0, le=1, description="Stage 2 (the face with the LoRA).")


class SceneLora(RequestModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=64, description="One of your LoRAs (`GET /v1/loras`).")
    weight: float = Field(default=1.0, ge=0, le=2, description="Its strength in the face stage.")


class SceneSpec(RequestModel):
    """Put a described person into a place's photo, posed by an action, optionally with their
    face from a LoRA. Name the action, or describe it in `action_text` and the closest action
    (by sentence embedding) is used."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"place": "park", "image": "park-path", "action": "waving", "shot": "medium",
         "subject": {"age": "adult", "gender": "woman", "details": "a red coat"},
         "model": "tiny-sd15", "steps": 4, "seed": 7},
        {"place": "park", "image": "park-path", "action_text": "greeting a friend",
         "shot": "FUS", "subject": {"gender": "man"}, "lora": {"id": "<lora id>"}},
    ]})

    place: str = Field(min_length=1, max_length=100, description="A place's id or name.")
    image: str = Field(min_length=1, max_length=100, description="One of the place's images, by id "
                       "or name: the background.")
    action: str | None = Field(default=None, min_length=1, max_length=100, description="An action's "
                               "id or name.")
    action_text: str | None = Field(default=None, min_length=1, max_length=500, description="Or: "
                                    "what the person does, in words; the closest action is used.")
    shot: ShotName
    subject: SceneSubject = Field(description="Who is put in: age, gender and details.")
    lora: SceneLora | None = Field(default=None, description="Your LoRA for the face stage; "
                                   "without one the scene has only the body stage.")
    prompt_template: str | None = Field(default=None, max_length=1000, description="Overrides the "
                                        f"prompt template `{DEFAULT_PROMPT_TEMPLATE}`; fields: "
                                        + ", ".join(f"`{{{n}}}`" for n in PROMPT_FIELDS) + ".")
    negative_prompt: str | None = Field(default=None, max_length=2000, description="What the "
                                        "images should not show.")
    model: str | None = Field(default=None, max_length=100, description="Default: the server's.")
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Default: drawn.")
    steps: int | None = Field(default=None, ge=1, le=150, description="Denoising steps per "
                              "stage. Default: the model's.")
    guidance_scale: float | None = Field(default=None, ge=0, le=30, description="Default: the "
                                         "model's.")
    scheduler: str | None = Field(default=None, max_length=50, description="As in a generation. "
                                  "Default: the model's.")
    strength: SceneStrength = Field(default_factory=SceneStrength, description="Per stage: how "
                                    "much is repainted (`body`, `face`).")
    control_scale: float = Field(default=1.0, ge=0, le=2, description="How strongly the pose guide "
                                 "holds in stage 1 (0: not at all).")
    num_images: int = Field(default=1, ge=1, le=4, description="Images, each with its own face "
                            "stage; image i uses seed + i.")
    webhook: JobWebhook = None

    @field_validator("action_text")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty or only whitespace")
        return value

    @field_validator("prompt_template")
    @classmethod
    def _known_fields(cls, value: str | None) -> str | None:
        if value is not None:
            template_fields(value)
        return value

    @model_validator(mode="after")
    def _one_action(self) -> SceneSpec:
        if (self.action is None) == (self.action_text is None):
            raise ValueError("give exactly one of `action` or `action_text`")
        return self


class ShotAssets(BaseModel):
    """One action's shot as the generator reads it: keys of stored images, or keypoints."""

    pose_kind: Literal["keypoints", "image"]
    control: ControlType
    keypoints: dict[str, Any] | None = None
    canvas: tuple[int, int]
    pose_image_key: str | None = None
    body_mask_key: str | None = None
    face_mask_key: str | None = None
    placement: dict[str, float] | None = None


class SceneAction(BaseModel):
    id: str
    name: str
    description: str
    assets: ShotAssets
    # the cached sentence embedding of name + description, and the hash of the text it is of
    embedding: list[float] | None = None
    embedding_hash: str | None = None


class SceneTask(BaseModel):
    """What the gateway queues: the request, the catalog rows it named and the generation
    parameters already checked against the model (``model``, size, steps, scheduler, seed)."""

    job_id: str
    tenant_id: str
    spec: SceneSpec
    place: dict[str, str]  # id, name, description
    image: dict[str, Any]  # id, name, description, key, width, height
    # the named action, or every action that has the shot when the request describes it
    actions: list[SceneAction] = Field(min_length=1)
    model: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str | None = None
    lora: dict[str, Any] | None = None  # a LoraRef's fields plus ``trigger_words``
    safety: SafetyPolicy | None = None
    gender: str = "person"  # the prompt's {gender} when the subject gives none: its class word
