"""Tagging jobs: captioning and tagging a dataset's images for training."""

from __future__ import annotations

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from shared.specs.common import MAX_SEED, JobWebhook
from shared.text import RequestModel


class CaptionOptions(RequestModel):
    """BLIP-class captioning (kohya's make_captions.py options)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=8, ge=1, le=64, description="Images captioned per model call.")
    max_length: int = Field(default=40, ge=5, le=200, description="Tokens, start token included.")
    min_length: int = Field(default=5, ge=1, le=100, description="Fewest tokens in a caption.")
    num_beams: int = Field(default=1, ge=1, le=8, description="Beam search width; 1 is greedy (or sampling "
                           "with do_sample).")
    do_sample: bool = Field(default=False, description="Nucleus sampling (with num_beams 1).")
    top_p: float = Field(default=0.9, gt=0, le=1, description="Nucleus sampling: keep the smallest set of "
                         "tokens with this much probability.")
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Same seed, same captions.")
    overwrite: bool = Field(default=False, description="Replace captions an image already "
                            "has; by default only missing ones are filled.")

    @model_validator(mode="after")
    def _consistent(self) -> CaptionOptions:
        if self.min_length > self.max_length:
            raise ValueError("min_length must not exceed max_length")
        if self.do_sample and self.num_beams > 1:
            raise ValueError("sampling uses num_beams 1")
        return self


class TagOptionsSpec(RequestModel):
    """WD14-class tagging (kohya's tag_images_by_wd14_tagger.py options)."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(default=8, ge=1, le=64, description="Images tagged per model call.")
    general_threshold: float = Field(default=0.35, ge=0, le=1, description="Keep general tags at or above "
                                     "this probability.")
    character_threshold: float = Field(default=0.35, ge=0, le=1, description="Keep character tags at or "
                                       "above this probability.")
    undesired: list[str] = Field(default_factory=list, max_length=500, description="Tags never written, "
                                 "whatever their spelling (`long_hair` also drops `long hair`).")
    underscores_to_spaces: bool = Field(default=True, description="Write `long hair`, not `long_hair`.")
    keep_rating: bool = Field(default=False, description="Put the most likely rating tag after the prefix.")
    prefix: list[str] = Field(default_factory=list, max_length=20, description="Always first, "
                              "e.g. the subject's identifier token.")
    character_first: bool = Field(default=True, description="Character tags before general ones.")
    escape: bool = Field(default=False, description="Escape ( ) so prompts read them literally.")
    overwrite: bool = Field(default=True, description="Replace an image's tags; false adds new ones to "
                            "those it has.")


class CleanOptions(RequestModel):
    """Caption/tag cleaning, kohya's clean_captions_and_tags.py step."""

    model_config = ConfigDict(extra="forbid")

    strip_rating: bool = Field(default=True, description="Drop rating tags and `rating:` tokens (general, "
                               "sensitive, questionable, explicit).")
    replacements: list[tuple[str, str]] = Field(default_factory=list, max_length=200,
                                                description="[from, to] pairs applied in order to captions "
                                                "and tags, e.g. [\"1girl\", \"a woman\"].")


class TaggingSpec(RequestModel):
    """Caption and/or tag a dataset's images, then clean; results land on the items."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"dataset_id": "1f0c3e6d-8a4b-4d2e-9f0a-1b2c3d4e5f60",
         "caption": {"batch_size": 8, "num_beams": 3, "max_length": 40},
         "tags": {"general_threshold": 0.35, "prefix": ["sks"], "undesired": ["simple background"]},
         "clean": {"replacements": [["1girl", "a woman"]]}, "write_caption_files": True},
    ]})

    dataset_id: str = Field(min_length=1, max_length=64, description="The dataset whose images are "
                            "captioned and tagged.")
    caption: CaptionOptions | None = Field(default_factory=CaptionOptions, description="BLIP-class "
                                           "captioning; null skips it.")
    tags: TagOptionsSpec | None = Field(default_factory=TagOptionsSpec, description="WD14-class tagging; "
                                        "null skips it.")
    clean: CleanOptions | None = Field(default_factory=CleanOptions, description="Caption and tag "
                                       "cleaning, after the other two; null skips it.")
    write_caption_files: bool = Field(default=False, description="Also store `<image>.caption` "
                                      "files beside the images.")
    prefix_trigger: bool = Field(default=True, description="Put a DreamBooth subset's identifier "
                                 "and class (`sks dog` of folder `10_sks dog`) first in the captions "
                                 "and tags this job writes, unless already there: in kohya a caption "
                                 "replaces the class tokens, so without it training never sees the "
                                 "trigger. Captions the job does not write are left as they are.")
    webhook: JobWebhook = None

    @model_validator(mode="after")
    def _something(self) -> TaggingSpec:
        if self.caption is None and self.tags is None and self.clean is None:
            raise ValueError("enable at least one of caption, tags or clean")
        return self


class TaggingItem(BaseModel):
    id: str
    key: str
    path: str
    caption: str | None = None
    tags: list[str] = Field(default_factory=list)
    trigger: str | None = None  # its DreamBooth subset's identifier and class


class TaggingTask(BaseModel):
    job_id: str
    tenant_id: str
    spec: TaggingSpec
    items: list[TaggingItem]
    caption_extension: str = ".caption"
    output_prefix: str
