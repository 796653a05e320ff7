"""Queue names and task names: one arq queue per service, so each worker pool scales alone."""

from __future__ import annotations

from typing import Any

GENERATOR_QUEUE = "loomis:queue:generator"
TRAINER_QUEUE = "loomis:queue:trainer"
TAGGER_QUEUE = "loomis:queue:tagger"

GENERATE_TASK = "generate"


async def enqueue(redis: Any, *, queue: str, task: str, job_id: str, payload: dict[str, Any]) -> None:
    """Enqueue under the job's own id so a repeated enqueue of the same job is a no-op."""
    await redis.enqueue_job(task, payload, _job_id=job_id, _queue_name=queue)
PREPROCESS_TASK = "preprocess_control"
SWEEP_TASK = "sweep"
TAG_TASK = "tag_dataset"
TRAIN_TASK = "train_lora"
