"""The LoRA training job spec: kohya sd-scripts' options, validated at the gateway.

Names follow kohya's command-line options so a kohya user recognises them; the rules kohya
enforces at start-up (cache_latents with augmentation, epochs over steps) are checked here,
before a job exists, and the optimizer's package by the gateway, which knows what the trainer
workers have (``services/gateway/trainings/service.py``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from shared.keys import training_state_prefix, training_state_step
from shared.kohya import (
    MAX_BUCKET_RESO_STEPS,
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    RESOLUTION_MULTIPLE,
    ConfigError,
    bucketing_problems,
    kohya_sampler,
    parse_sample_prompts,
)
from shared.specs import LORA_NAME_RULE, MAX_SEED, JobWebhook, LoraName
from shared.storage import ObjectStore
from shared.text import MULTILINE, RequestModel

LrScheduler = Literal["constant", "constant_with_warmup", "linear", "cosine",
                      "cosine_with_restarts", "polynomial"]
Optimizer = Literal["AdamW", "AdamW8bit", "Lion8bit", "Lion", "SGDNesterov", "Prodigy",
                    "Adafactor"]


class _Options(RequestModel):
    model_config = ConfigDict(extra="forbid")


def _errors_at(title: str, errors: list[tuple[tuple[str | int, ...], str, Any]]) -> ValidationError:
    """Cross-field errors located at the field each is about, ``(loc, message, value)``.

    A validator's ``ValueError`` is reported on the whole model (``body`` for the request);
    pydantic nests a ``ValidationError`` raised in a validator under the validator's own
    location instead, so every rule points at its field and all of them are reported at once.
    """
    return ValidationError.from_exception_data(title, [
        InitErrorDetails(type=PydanticCustomError("value_error", "{reason}", {"reason": message}),
                         loc=loc, input=value)
        for loc, message, value in errors])


Side = Annotated[int, Field(ge=MIN_RESOLUTION, le=MAX_RESOLUTION, multiple_of=RESOLUTION_MULTIPLE)]
_SIDE: TypeAdapter[int] = TypeAdapter(Side)
_PAIR: TypeAdapter[tuple[int, int]] = TypeAdapter(tuple[Side, Side])


def _one_reading(value: Any, _handler: ValidatorFunctionWrapHandler) -> int | tuple[int, int]:
    """A number is one side, a list is [width, height]: report errors against that reading
    only (``data.resolution.1``), not against both members of the union."""
    return (_PAIR if isinstance(value, list | tuple) else _SIDE).validate_python(value)


Resolution = Annotated[Side | tuple[Side, Side], WrapValidator(_one_reading)]


class NetworkOptions(_Options):
    rank: int = Field(default=16, ge=1, le=256, description="network_dim")
    alpha: float | None = Field(default=None, gt=0, description="network_alpha; default: rank")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="network_dropout: dropout in the LoRA "
                           "layers during training.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        min_length=1, description="UNet attention projections by default.")
    train_text_encoder: bool = Field(default=False, description="Also train LoRA layers on the text encoder.")
    text_encoder_lr: float | None = Field(default=None, gt=0, description="The text encoder's learning "
                                          "rate; default: optim.learning_rate.")


class OptimOptions(_Options):
    learning_rate: float = Field(default=1e-4, gt=0, le=1, description="Base learning rate.")
    unet_lr: float | None = Field(default=None, gt=0, le=1, description="The UNet's learning rate; "
                                  "default: learning_rate.")
    lr_scheduler: LrScheduler = Field(default="constant", description="How the learning rate changes over "
                                      "the run.")
    lr_warmup_steps: int = Field(default=0, ge=0, description="Steps of linear warm-up at the start.")
    lr_scheduler_num_cycles: int = Field(default=1, ge=1, description="cosine_with_restarts: number of "
                                         "restarts.")
    lr_scheduler_power: float = Field(default=1.0, gt=0, description="polynomial: the power of the decay.")
    optimizer: Optimizer = Field(default="AdamW", description="AdamW, SGDNesterov and Adafactor always; "
                                 "the others where the trainer has their packages (a 422 otherwise).")
    optimizer_args: dict[str, float | int | str | bool] = Field(
        default_factory=dict,
        description="Extra keyword arguments for the optimizer, e.g. {\"weight_decay\": 0.01}.",
    )
    max_train_steps: int | None = Field(default=None, ge=1, le=200_000, description="Length of the run in "
                                        "steps (this or max_train_epochs is needed).")
    max_train_epochs: int | None = Field(default=None, ge=1, le=10_000,
                                         description="Wins over max_train_steps, as in kohya.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=128, description="Batches whose gradients "
                                             "add up before each optimizer step.")
    max_grad_norm: float = Field(default=1.0, ge=0, description="Gradient clipping norm; 0 turns it off.")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(default="no", description="Compute precision: "
                                                           "no (float32), fp16 (CUDA only) or bf16.")
    gradient_checkpointing: bool = Field(default=False, description="Recompute activations in the backward "
                                         "pass: less memory, slower steps.")
    seed: int = Field(default=42, ge=0, le=MAX_SEED, description="Seed of the whole run: same seed, same "
                      "data order and noise.")

    @model_validator(mode="after")
    def _has_a_length(self) -> OptimOptions:
        if self.max_train_steps is None and self.max_train_epochs is None:
            raise _errors_at("OptimOptions", [(("max_train_steps",), "give optim.max_train_steps "
                                               "or optim.max_train_epochs", None)])
        return self


class DiffusionOptions(_Options):
    noise_offset: float = Field(default=0.0, ge=0, le=1, description="Offset noise strength; helps very "
                                "dark or bright images. 0 turns it off.")
    adaptive_noise_scale: float | None = Field(default=None, ge=0, le=1, description="Adds each latent's "
                                               "mean magnitude times this to noise_offset.")
    multires_noise_iterations: int = Field(default=0, ge=0, le=10, description="Multi-resolution (pyramid) "
                                           "noise levels; 0 turns it off.")
    multires_noise_discount: float = Field(default=0.3, gt=0, le=1, description="Weight of each coarser "
                                           "multi-resolution noise level.")
    min_snr_gamma: float | None = Field(default=None, gt=0, le=20, description="Min-SNR loss weighting "
                                        "gamma (5 is usual); unset turns it off.")
    clip_skip: int = Field(default=1, ge=1, le=12, description="Use the text encoder's n-th layer from the "
                           "end (2 for many anime models).")
    max_token_length: Literal[75, 150, 225] = Field(default=75, description="Caption tokens the text "
                                                    "encoder reads; 150 and 225 are read in 75-token "
                                                    "chunks, as kohya does.")
    v_parameterization: bool = Field(default=False, description="v-prediction loss, for v-prediction base "
                                     "models.")
    cache_latents: bool = Field(default=False, description="Encode each image with the VAE once instead of "
                                "every step (not with flip/colour augmentation).")
    cache_latents_to_disk: bool = Field(default=False, description="With cache_latents: also keep them on "
                                        "the worker's disk, reused by later runs on the same images and "
                                        "VAE.")


class DataOptions(_Options):
    """Dataset-level kohya options used when the data is a Loomis dataset (not a TOML).

    The bounds and how they relate are :func:`shared.kohya.bucketing_problems`', the same a
    ``dataset_config`` TOML is held to.
    """

    resolution: Resolution = Field(
        default=512, description=f"One side or [width, height], {MIN_RESOLUTION}-{MAX_RESOLUTION} "
        f"px, a multiple of {RESOLUTION_MULTIPLE} (of bucket_reso_steps with buckets) and, with "
        "buckets, within [min_bucket_reso, max_bucket_reso].")
    batch_size: int = Field(default=1, ge=1, le=64, description="Images per optimizer step "
                            "(train_batch_size).")
    enable_bucket: bool = Field(default=True, description="Aspect-ratio bucketing: images are resized into "
                                "buckets of similar shape instead of cropped square.")
    min_bucket_reso: int = Field(default=256, ge=MIN_RESOLUTION, le=MAX_RESOLUTION,
                                 description="Smallest bucket side in px, a multiple of "
                                 "bucket_reso_steps.")
    max_bucket_reso: int = Field(default=1024, ge=MIN_RESOLUTION, le=MAX_RESOLUTION,
                                 description="Largest bucket side in px, a multiple of "
                                 "bucket_reso_steps.")
    bucket_reso_steps: int = Field(default=64, ge=RESOLUTION_MULTIPLE, le=MAX_BUCKET_RESO_STEPS,
                                   multiple_of=RESOLUTION_MULTIPLE, description="Step in px between bucket "
                                   "sides, a multiple of 8.")
    shuffle_caption: bool = Field(default=False, description="Shuffle a caption's comma-separated tags at "
                                  "each step.")
    keep_tokens: int = Field(default=0, ge=0, description="Leading caption tags kept in place when "
                             "shuffling (e.g. the trigger word).")
    caption_dropout_rate: float = Field(default=0.0, ge=0, le=1, description="Share of steps that see an "
                                        "empty caption.")
    flip_aug: bool = Field(default=False, description="Random horizontal flips (not with cache_latents).")
    color_aug: bool = Field(default=False, description="Random hue changes (not with cache_latents).")
    random_crop: bool = Field(default=False, description="Crop what sticks out of an image's bucket at a "
                              "random offset each step instead of centred (not with cache_latents).")

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``."""
        return self.resolution if isinstance(self.resolution, tuple) else (
            self.resolution, self.resolution)

    @model_validator(mode="after")
    def _consistent(self) -> DataOptions:
        errors: list[tuple[tuple[str | int, ...], str, Any]] = [
            ((key,), message, getattr(self, key)) for key, message in bucketing_problems(
                resolution=self.size, enable_bucket=self.enable_bucket,
                min_bucket_reso=self.min_bucket_reso, max_bucket_reso=self.max_bucket_reso,
                bucket_reso_steps=self.bucket_reso_steps)]
        if errors:
            raise _errors_at("DataOptions", errors)
        return self


class SampleOptions(_Options):
    prompts: Annotated[str, MULTILINE] = Field(
        default="", max_length=20_000, description="kohya prompt-file syntax: one prompt per "
        "line, `--n` negative, `--w`/`--h` size, `--d` seed, `--l` CFG scale, `--s` steps, "
        "`#` comments.")
    every_n_steps: int | None = Field(default=None, ge=1, description="Render the sample prompts every "
                                      "this many steps.")
    every_n_epochs: int | None = Field(default=None, ge=1, description="Render the sample prompts every "
                                       "this many epochs.")
    sampler: str = Field(default="ddim", description="kohya's `--sample_sampler`: the sampler of "
                         "lines without `--ss` (ddim, pndm, lms, euler, euler_a, heun, dpm_2, "
                         "dpm_2_a, dpmsolver, dpmsolver++, dpmsingle, k_lms, k_euler, k_euler_a, "
                         "k_dpm_2, k_dpm_2_a; case-insensitive).")

    @field_validator("sampler")
    @classmethod
    def _kohya_sampler(cls, sampler: str) -> str:
        try:
            return kohya_sampler(sampler)
        except ConfigError as exc:
            raise ValueError(exc.message) from exc

    @field_validator("prompts")
    @classmethod
    def _kohya_syntax(cls, prompts: str) -> str:
        """Refused here rather than by the worker once the job has started."""
        try:
            parsed = parse_sample_prompts(prompts)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        for prompt in parsed:
            if max(prompt.width, prompt.height) > MAX_RESOLUTION:
                raise ValueError(f"line {prompt.line}: {prompt.width}x{prompt.height} is above "
                                 f"{MAX_RESOLUTION} px")
        return prompts


class SaveOptions(_Options):
    every_n_steps: int | None = Field(default=None, ge=1, description="Save a checkpoint (and state) every "
                                      "this many steps.")
    every_n_epochs: int | None = Field(default=None, ge=1, description="Save a checkpoint (and state) "
                                       "every this many epochs.")
    precision: Literal["float", "fp16", "bf16"] = Field(default="fp16", description="Weight precision of "
                                                        "the saved LoRA files.")
    save_state: bool = Field(default=True, description="Keep resumable state with checkpoints.")


class TrainingSpec(_Options):
    """Train a LoRA on a dataset; the result is registered as one of the tenant's LoRAs."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "base_model": "tiny-sd15", "name": "sks-dog", "dataset_id": "<dataset id>",
        "network": {"rank": 8, "alpha": 4},
        "optim": {"learning_rate": 1e-4, "max_train_steps": 1500, "lr_scheduler": "cosine"},
        "samples": {"prompts": "a photo of sks dog --n blurry --w 512 --h 512 --d 1 --l 7 --s 20",
                    "every_n_steps": 250},
        "save": {"every_n_steps": 500},
    }]})

    base_model: str = Field(default="tiny-sd15", max_length=100, description="The preset to train on "
                            "(SD1.5 family).")
    name: LoraName = Field(description="Name of the resulting LoRA, by the LoRA name rule: "
                           f"{LORA_NAME_RULE}.")
    dataset_id: str = Field(min_length=1, max_length=64, description="The dataset to train on.")
    reg_dataset_id: str | None = Field(default=None, description="A dataset of regularisation images, "
                                       "balanced against the training images as kohya does.")
    # Parsed and held to this spec's rules by the gateway, whose parser it is
    # (services/gateway/trainings/schemas.py, TrainingRequest); the trainer gets the examples
    # the gateway resolved from it and never reads it.
    dataset_config: Annotated[str | None, MULTILINE] = Field(
        default=None, max_length=100_000, description="A kohya dataset config TOML; "
        "`image_dir` names subsets of `dataset_id` (`<dataset id>/<subset folder>`).")
    data: DataOptions = Field(default_factory=DataOptions, description="Dataset options used when no "
                              "dataset_config is given.")
    network: NetworkOptions = Field(default_factory=NetworkOptions, description="The LoRA network: rank, "
                                    "alpha, targets.")
    # No usable default (steps or epochs are needed): validated, so that a body without it is
    # told `optim.max_train_steps` along with its other errors.
    optim: OptimOptions = Field(default={}, validate_default=True, description="Optimizer, learning rates "
                                "and length of the run.")
    diffusion: DiffusionOptions = Field(default_factory=DiffusionOptions, description="Noise and loss "
                                        "options.")
    samples: SampleOptions = Field(default_factory=SampleOptions, description="Sample images rendered "
                                   "during training.")
    save: SaveOptions = Field(default_factory=SaveOptions, description="Checkpoints and resumable state.")
    resume_from: str | None = Field(default=None, description="A training job id whose saved "
                                    "state this run continues.")
    webhook: JobWebhook = None

    @field_validator("diffusion")
    @classmethod
    def _cacheable(cls, diffusion: DiffusionOptions, info: ValidationInfo) -> DiffusionOptions:
        data = info.data.get("data")  # absent when `data` itself is invalid: nothing to compare
        if diffusion.cache_latents and isinstance(data, DataOptions) and (
                data.flip_aug or data.color_aug or data.random_crop):
            raise _errors_at("DiffusionOptions", [(("cache_latents",), "cannot be combined with "
                                                   "data.flip_aug, data.color_aug or "
                                                   "data.random_crop (the cached latents would "
                                                   "never change), as in kohya", True)])
        return diffusion


class SubsetOptions(BaseModel):
    """A kohya subset's caption handling and augmentation, per image (a TOML sets them per
    subset; without one they are the request's ``data`` options)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    flip_aug: bool = False
    color_aug: bool = False
    random_crop: bool = False


class TrainingExample(BaseModel):
    """One image as the trainer gets it: where it is, its caption and how kohya counts it.

    ``dataset`` is the kohya ``[[datasets]]`` it belongs to: batches never mix datasets and
    each batches by its own ``batch_size`` at its own ``resolution`` (None: the request's).
    """

    key: str
    caption: str
    repeats: int = Field(ge=1)
    is_reg: bool = False
    subset: str
    bucket: tuple[int, int]
    dataset: int = 0
    batch_size: int | None = None
    resolution: tuple[int, int] | None = None
    options: SubsetOptions | None = None


class TrainingTask(BaseModel):
    job_id: str
    tenant_id: str
    spec: TrainingSpec
    examples: list[TrainingExample]
    trigger_words: list[str] = Field(default_factory=list)
    # what the gateway found wrong with the captions (a trigger they lack), for the job to say
    warnings: list[str] = Field(default_factory=list)
    output_prefix: str  # training/{tenant}/{job}/
    lora_id: str  # the id the finished LoRA is registered under
    lora_key: str
    resume_state_key: str | None = None


async def latest_state(store: ObjectStore, output_prefix: str) -> str | None:
    """The newest resumable state a training job saved (written whole: temp key, then copy)."""
    keys = [k for k in await store.list(training_state_prefix(output_prefix)) if k.endswith(".tar")]
    return max(keys, key=training_state_step) if keys else None
