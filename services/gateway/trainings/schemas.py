"""The trainings routes' request body, and what they answer besides a job: its per-step
metrics and a dry-run plan."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from services.gateway.datasets.kohya import KohyaDataset, KohyaSubset, parse_dataset_config
from shared.kohya import ConfigError
from shared.specs import JobStatus
from shared.training import TrainingSpec

# TOML keys the parser reads but training does not apply yet, with the value that changes
# nothing: any other value is a 422 naming the key, never accepted and ignored.
_UNBUILT_SUBSET_KEYS: dict[str, object] = {
    "face_crop_aug_range": None, "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0, "token_warmup_min": 1, "token_warmup_step": 0.0,
    "alpha_mask": False, "enable_wildcard": False, "secondary_separator": None,
    "keep_tokens_separator": "",
}
_UNBUILT_DATASET_KEYS: dict[str, object] = {
    "bucket_no_upscale": False, "network_multiplier": 1.0, "validation_split": 0.0,
    "validation_seed": None,
}
_AUGMENTATIONS = ("flip_aug", "color_aug", "random_crop")


def dataset_config_problems(config_datasets: tuple[KohyaDataset, ...], *,
                            cache_latents: bool) -> list[tuple[str, str]]:
    """``(toml key path, message)`` for what a TOML asks that this trainer would not do.

    Values inherited from the request (``defaults``) are the request's own fields, checked there.
    """
    problems: dict[str, str] = {}

    def refuse(sources: Any, key: str, message: str) -> None:
        path = sources.get(key, key)
        if not path.startswith("defaults"):
            problems.setdefault(path, message)

    for dataset in config_datasets:
        for key, neutral in _UNBUILT_DATASET_KEYS.items():
            if getattr(dataset, key) != neutral:
                refuse(dataset.sources, key, "not supported by this trainer yet")
        subset: KohyaSubset
        for subset in dataset.subsets:
            for key, neutral in _UNBUILT_SUBSET_KEYS.items():
                if getattr(subset, key) != neutral:
                    refuse(subset.sources, key, "not supported by this trainer yet")
            if subset.custom_attributes:
                refuse(subset.sources, "custom_attributes", "not supported by this trainer yet")
            for key in _AUGMENTATIONS:
                if cache_latents and getattr(subset, key):
                    refuse(subset.sources, key, "cannot be combined with diffusion.cache_latents "
                           "(the cached latents would never change), as in kohya")
    return list(problems.items())


def _errors_at(errors: list[tuple[tuple[str, ...], str]]) -> ValidationError:
    """TOML errors located at the value each is about, ``(loc, message)``: pydantic nests a
    ``ValidationError`` raised in a validator under the validator's own location (``body``
    for the request), so each names its ``dataset_config.<toml path>`` and all are reported
    at once."""
    return ValidationError.from_exception_data("TrainingSpec", [
        InitErrorDetails(type=PydanticCustomError("value_error", "{reason}", {"reason": message}),
                         loc=loc, input=None)
        for loc, message in errors])


def _dataset_config_applies(spec: TrainingSpec) -> TrainingSpec:
    """A TOML is held to the same rules as the request's own ``data`` options.

    Like a model validator, it runs only once every field of the spec is valid.
    """
    if spec.dataset_config is None:
        return spec
    try:
        config = parse_dataset_config(spec.dataset_config, defaults={
            "resolution": list(spec.data.size), "batch_size": spec.data.batch_size})
    except ConfigError as exc:
        field = ".".join(part for part in ("dataset_config", exc.field) if part)
        raise _errors_at([(tuple(field.split(".")), exc.message)]) from exc
    problems = dataset_config_problems(config.datasets, cache_latents=spec.diffusion.cache_latents)
    if problems:
        raise _errors_at([(("dataset_config", *path.split(".")), message)
                          for path, message in problems])
    return spec


# The body of POST /v1/trainings and /plan: a TrainingSpec (the same schema) whose TOML the
# gateway checks, as only the gateway parses TOML; the trainer, which deserialises the spec
# inside its task, trains on the examples resolved from it and has nothing to re-check.
TrainingRequest = Annotated[TrainingSpec, AfterValidator(_dataset_config_applies)]


class StepMetrics(BaseModel):
    step: int = Field(description="Optimizer step, counted from 1.")
    epoch: int | None = Field(default=None, description="Epoch the step belongs to, from 1.")
    loss: float | None = Field(default=None, description="This step's loss alone (null for "
                               "steps reported before per-step loss was recorded).")
    avr_loss: float | None = Field(default=None, description="Running average loss over the "
                                   "last epoch's worth of steps, as kohya's `avr_loss`.")
    lr: float | None = Field(default=None, description="Learning rate the step used.")
    step_time_s: float | None = Field(default=None, description="Seconds from the previous "
                                      "step's end to this one's (samples and checkpoints "
                                      "made in between included).")


class TrainingMetrics(BaseModel):
    job_id: str = Field(description="The training job.")
    status: JobStatus = Field(description="The job's status when the metrics were read.")
    total_steps: int | None = Field(default=None, description="Steps the run will make in "
                                    "all; null until the first step is reported.")
    steps: list[StepMetrics] = Field(description="One entry per step done so far, in step "
                                     "order; a step redone after a resume appears once, as "
                                     "last run.")


class PlanSubset(BaseModel):
    folder: str = Field(description="The subset's folder in the dataset (kohya's `image_dir`).")
    is_reg: bool = Field(description="Whether it holds regularisation images.")
    images: int = Field(description="Images of this subset that training uses.")
    num_repeats: int = Field(description="How often each image is used per epoch (for "
                             "regularisation images: the most any one gets after kohya "
                             "balances them against the training images).")
    items: int = Field(description="Images times their repeats: its items per epoch.")
    class_tokens: str | None = Field(default=None, description="The DreamBooth identifier "
                                     "and class (the trigger), when the subset has one.")


class PlanBucket(BaseModel):
    dataset: int = Field(description="The `[[datasets]]` of the dataset_config it belongs to "
                         "(0-based; 0 without one): datasets are batched apart.")
    width: int = Field(description="Bucket width in pixels.")
    height: int = Field(description="Bucket height in pixels.")
    images: int = Field(description="Distinct images that land in this bucket.")
    items: int = Field(description="Items per epoch in this bucket (images times repeats).")
    batch_size: int = Field(description="Images per batch in this bucket (its dataset's).")
    batches: int = Field(description="Batches per epoch it makes: ceil(items / batch_size).")


class PlanWarning(BaseModel):
    code: str = Field(description="Stable code: `tiny_images`, `unbalanced_buckets`, "
                      "`trigger_missing` or `captions_unread` (caption files of another "
                      "extension than a dataset_config subset's `caption_extension`).")
    message: str = Field(description="What was found, with counts, for a person.")
    subset: str | None = Field(default=None, description="The subset folder concerned, when "
                               "it is about one.")


class TrainingPlan(BaseModel):
    subsets: list[PlanSubset] = Field(description="Subsets that training uses, in order.")
    buckets: list[PlanBucket] = Field(description="Aspect-ratio buckets with what lands in "
                                      "them, by size (one bucket when bucketing is off).")
    batch_size: int = Field(description="Images per batch (the request's; a dataset_config "
                            "dataset may set its own, shown on its buckets).")
    gradient_accumulation_steps: int = Field(description="Batches per optimizer step.")
    batches_per_epoch: int = Field(description="Batches in one epoch, summed over buckets.")
    steps_per_epoch: int = Field(description="Optimizer steps in one epoch.")
    epochs: int = Field(description="Epochs the run makes (the last one may be partial).")
    total_steps: int = Field(description="Optimizer steps the run makes: the job's "
                             "`result.steps` when it finishes.")
    trigger_words: list[str] = Field(description="The trigger words the LoRA will report.")
    warnings: list[PlanWarning] = Field(description="What kohya's `--debug_dataset` would "
                                        "make a user look at twice; none stops the run.")
