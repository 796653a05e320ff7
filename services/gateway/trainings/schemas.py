"""What the trainings routes answer besides a job: its per-step metrics and a dry-run plan."""

from __future__ import annotations

from pydantic import BaseModel, Field

from shared.specs import JobStatus


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
