"""The LoRA trainer worker: kohya-style training as a resumable job.

It speaks only Redis and S3. Checkpoints and resumable state go to
``training/{tenant}/{job}/`` as they are made, and a re-delivered job (its worker died)
continues from the newest state there instead of from step zero. The finished LoRA is
stored under ``loras/{tenant}/{id}/`` and the gateway registers it from the terminal event.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import tarfile
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arq.worker import Worker, func
from PIL import Image, ImageOps

from services.jobrunner import RUNNING, common_startup, make_worker, run_job, run_worker
from services.models.device import pick_device
from services.models.sources import ModelSources
from services.trainer.curve import loss_curve_png, metrics_json, read_metrics
from services.trainer.kohya_format import lora_record
from services.workerctx import CONTEXT_KEY, WorkerContext
from shared.errors import (
    InvalidJobSpec,
    JobCanceled,
    JobFailure,
    NotFound,
    OptimizerUnavailable,
)
from shared.keys import (
    training_checkpoint_key,
    training_curve_key,
    training_metrics_key,
    training_sample_key,
    training_state_key,
    training_tmp_prefix,
)
from shared.kohya import ConfigError, parse_sample_prompts
from shared.models import ModelRegistry
from shared.outcomes import TrainingSucceeded
from shared.queue import TRAIN_TASK, TRAINER_QUEUE
from shared.settings import Settings, get_settings
from shared.specs import JobKind
from shared.training import TrainingTask, latest_state

logger = logging.getLogger(__name__)




@dataclass
class TrainerContext(WorkerContext):
    registry: ModelRegistry = field(kw_only=True)
    sources: ModelSources = field(kw_only=True)


def upright(data: bytes) -> Image.Image:
    """A stored photo as its owner sees it. The gateway keeps a photo's original bytes and
    sizes its bucket after EXIF orientation (a phone's portrait photo is landscape pixels
    and an Orientation tag); unturned, it trained on its side, cropped to fit the portrait
    bucket. The tagger reads photos the same way."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return ImageOps.exif_transpose(image) or image


async def startup(ctx: dict[str, Any]) -> None:
    base = common_startup(ctx)
    settings = base.settings
    ctx[CONTEXT_KEY] = TrainerContext.extend(
        base, registry=ModelRegistry.load(settings.models.models_file, settings.models.models_dir),
        sources=ModelSources(cache_dir=settings.model_cache,
                             allow_downloads=settings.models.allow_downloads))


def _tar(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(directory, arcname=".")
    return buffer.getvalue()


def _untar(data: bytes, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as archive:
        archive.extractall(target, filter="data")  # our own archive; "data" refuses tricks anyway
    return target


def _model_dir(ctx: dict[str, Any], base_model: str) -> tuple[Path, str]:
    context = TrainerContext.of(ctx)
    sources = context.sources
    preset = context.registry.get(base_model)
    if preset is None:
        raise JobFailure(f"model {base_model!r} is not in this worker's registry",
                         code="model_unavailable")
    path = sources.path(preset.source)
    return path, sources.weights_hash(path)


async def _run(ctx: dict[str, Any], task: TrainingTask, *, queued_s: float) -> dict[str, Any]:
    from services.trainer.sampling import KOHYA_TO_LOOMIS_SCHEDULER
    from services.trainer.train import LoraTrainer, SamplePrompt, TrainConfig, TrainExample

    context = TrainerContext.of(ctx)
    events, store = context.events, context.store
    spec = task.spec
    loop = asyncio.get_running_loop()
    model_dir, model_hash = await asyncio.to_thread(_model_dir, ctx, spec.base_model)
    if task.warnings:  # said while it runs, not only once it is over
        await events.emit(task.job_id, "progress", allowed_from=RUNNING,
                          data={"warnings": task.warnings})

    examples = []
    for example in task.examples:
        try:
            data = await store.get(example.key)
        except NotFound as exc:
            raise JobFailure(f"training image {example.key} is gone", code="input_missing") from exc
        image = upright(data)
        examples.append(TrainExample(image=image.convert("RGB"), caption=example.caption,
                                     repeats=example.repeats, is_reg=example.is_reg,
                                     bucket=example.bucket, dataset_dir=example.subset,
                                     dataset=example.dataset, batch_size=example.batch_size,
                                     resolution=example.resolution,
                                     options=example.options))

    parsed = parse_sample_prompts(spec.samples.prompts)
    # kohya's sampler per line: its own `--ss`, else samples.sampler (--sample_sampler)
    samplers = [p.sampler or spec.samples.sampler for p in parsed]
    prompts = [SamplePrompt(prompt=p.prompt, negative=p.negative, width=p.width, height=p.height,
                            seed=p.seed if p.seed is not None else spec.optim.seed,
                            scale=p.scale, steps=p.steps,
                            scheduler=KOHYA_TO_LOOMIS_SCHEDULER[sampler])
               for p, sampler in zip(parsed, samplers, strict=True)]
    data_opts, net, optim, diff = spec.data, spec.network, spec.optim, spec.diffusion
    resolution = data_opts.resolution if isinstance(data_opts.resolution, int) else max(
        data_opts.resolution)
    cfg = TrainConfig(
        rank=net.rank, alpha=net.alpha if net.alpha is not None else float(net.rank),
        dropout=net.dropout, target_modules=tuple(net.target_modules),
        train_text_encoder=net.train_text_encoder, text_encoder_lr=net.text_encoder_lr,
        learning_rate=optim.learning_rate, unet_lr=optim.unet_lr,
        lr_scheduler=optim.lr_scheduler, lr_warmup_steps=optim.lr_warmup_steps,
        lr_scheduler_num_cycles=optim.lr_scheduler_num_cycles,
        lr_scheduler_power=optim.lr_scheduler_power, optimizer=optim.optimizer,
        optimizer_args=dict(optim.optimizer_args),
        max_train_steps=optim.max_train_steps or 1600, max_train_epochs=optim.max_train_epochs,
        batch_size=data_opts.batch_size,
        gradient_accumulation_steps=optim.gradient_accumulation_steps,
        max_grad_norm=optim.max_grad_norm, mixed_precision=optim.mixed_precision,
        gradient_checkpointing=optim.gradient_checkpointing, seed=optim.seed,
        resolution=resolution, noise_offset=diff.noise_offset or None,
        adaptive_noise_scale=diff.adaptive_noise_scale,
        multires_noise_iterations=diff.multires_noise_iterations or None,
        multires_noise_discount=diff.multires_noise_discount, min_snr_gamma=diff.min_snr_gamma,
        clip_skip=diff.clip_skip if diff.clip_skip > 1 else None,
        v_parameterization=diff.v_parameterization, cache_latents=diff.cache_latents,
        latents_cache_dir=(context.settings.model_cache / "latents"
                           if diff.cache_latents_to_disk else None),
        flip_aug=data_opts.flip_aug, color_aug=data_opts.color_aug, random_crop=data_opts.random_crop,
        max_token_length=diff.max_token_length,
        shuffle_caption=data_opts.shuffle_caption, keep_tokens=data_opts.keep_tokens,
        caption_dropout_rate=data_opts.caption_dropout_rate, sample_prompts=prompts,
        sample_every_n_steps=spec.samples.every_n_steps,
        sample_every_n_epochs=spec.samples.every_n_epochs,
        save_every_n_steps=spec.save.every_n_steps, save_every_n_epochs=spec.save.every_n_epochs,
        save_state=spec.save.save_state, save_state_on_stop=spec.save.save_state,
        save_precision=spec.save.precision, output_name=spec.name, base_model_hash=model_hash,
        base_model_name=spec.base_model,
    )

    def call(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    abandoned = threading.Event()
    # every step of the run (a resumed run starts from what the earlier attempt stored), for
    # the metrics document and loss curve written at each checkpoint and at the end
    points: list[dict[str, Any]] = []
    trainer: Any = None

    def on_step(step: int, total: int, epoch: int, loss: float, lr: float, its: float,
                eta: float) -> None:
        step_loss, step_time = trainer.last_step_loss, trainer.last_step_time_s
        points.append({"step": step, "epoch": epoch, "loss": step_loss, "avr_loss": loss,
                       "lr": lr, "step_time_s": round(step_time, 4)})
        call(events.emit(task.job_id, "progress", allowed_from=RUNNING, data={
            "step": step, "total_steps": total, "epoch": epoch, "loss": round(loss, 6),
            "step_loss": step_loss, "step_time_s": round(step_time, 4),
            "lr": lr, "it_per_s": round(its, 3), "eta_s": round(eta, 1),
            "progress": round(step / max(total, 1), 4)}))

    async def put_metrics() -> list[dict[str, Any]]:
        snapshot = list(points)
        stored = []
        for key, data, kind, content_type in (
                (training_metrics_key(task.output_prefix), metrics_json(snapshot), "metrics",
                 "application/json"),
                (training_curve_key(task.output_prefix),
                 await asyncio.to_thread(loss_curve_png, snapshot), "loss_curve", "image/png")):
            await store.put(key, data, content_type=content_type)
            stored.append({"key": key, "kind": kind, "content_type": content_type,
                           "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        return stored

    async def put_sample(step: int, index: int, image: Image.Image) -> None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        key = training_sample_key(task.output_prefix, step, index)
        await store.put(key, buffer.getvalue(), content_type="image/png")
        await events.emit(task.job_id, "sample", allowed_from=RUNNING,
                          data={"step": step, "index": index, "key": key,
                                "sampler": samplers[index], "scheduler": prompts[index].scheduler})

    def on_sample(step: int, index: int, image: Image.Image) -> None:
        call(put_sample(step, index, image))

    async def put_checkpoint(step: int, lora: bytes, state_dir: Path | None) -> None:
        await store.put(training_checkpoint_key(task.output_prefix, step), lora,
                        content_type="application/octet-stream")
        if state_dir is not None:
            key = training_state_key(task.output_prefix, step)
            await store.put(key, await asyncio.to_thread(_tar, state_dir),
                            content_type="application/x-tar")
        await put_metrics()

    def on_checkpoint(step: int, lora: bytes, state_dir: Path | None) -> None:
        call(put_checkpoint(step, lora, state_dir))

    def should_stop() -> bool:
        return abandoned.is_set() or bool(call(events.cancel_requested(task.job_id)))

    with tempfile.TemporaryDirectory(prefix="loomis-train-") as tmp:
        work_dir = Path(tmp)
        resume_key = task.resume_state_key
        own = await latest_state(store, task.output_prefix)
        if own:  # this job ran before and died: continue it, not the run it came from
            resume_key = own
        resume_dir = None
        if own:
            with contextlib.suppress(NotFound):
                points.extend(read_metrics(await store.get(training_metrics_key(task.output_prefix))))
        if resume_key:
            resume_dir = await asyncio.to_thread(
                _untar, await store.get(resume_key), work_dir / "resume")
            await events.emit(task.job_id, "progress", allowed_from=RUNNING,
                              data={"resumed_from": resume_key})
        device = pick_device(TrainerContext.of(ctx).settings.trainer.device, mps=False)
        trainer = LoraTrainer(model_dir=model_dir, cfg=cfg, device=device)
        if resume_dir is not None:  # steps the saved state is past are kept, later ones redone
            with contextlib.suppress(OSError, ValueError, KeyError):
                done = int(json.loads((resume_dir / "trainer.json").read_text())["step"])
                points[:] = [p for p in points if p["step"] <= done]
        try:
            result = await asyncio.to_thread(
                trainer.train, examples, work_dir=work_dir / "run", on_step=on_step,
                on_sample=on_sample, on_checkpoint=on_checkpoint, should_stop=should_stop,
                resume_state=resume_dir)
        finally:
            abandoned.set()
        if result.stopped:
            if result.state_dir is not None:  # canceled or shutting down: keep where it got to
                await put_checkpoint(result.steps, result.lora_bytes, result.state_dir)
            raise JobCanceled()
    lora_bytes = result.lora_bytes
    await store.put(task.lora_key, lora_bytes, content_type="application/octet-stream")
    sha = hashlib.sha256(lora_bytes).hexdigest()
    curve = await put_metrics()
    return TrainingSucceeded.model_validate({
        "artifacts": [{"key": task.lora_key, "kind": "lora",
                       "content_type": "application/octet-stream", "size": len(lora_bytes),
                       "sha256": sha}, *curve],
        "result": {"timings": {"queue_wait_s": round(queued_s, 4)}, "steps": result.steps,
                   "epochs": result.epochs, "final_loss": result.final_loss,
                   "lora": {"id": task.lora_id, "name": spec.name,
                            "trigger_words": task.trigger_words},
                   "warnings": task.warnings},
        "register_lora": {
            "id": task.lora_id, "name": spec.name, "family": "sd15",
            "base_model": spec.base_model, "key": task.lora_key, "sha256": sha,
            "size": len(lora_bytes), "rank": spec.network.rank,
            # Its layer widths, as an upload's are, so using it on another model is a 422.
            "info": {**lora_record(lora_bytes), "trigger_words": task.trigger_words,
                     "training_job": task.job_id, "steps": result.steps}},
    }).event_data()


async def _run_refusals_as_ours(ctx: dict[str, Any], task: TrainingTask, *,
                                queued_s: float) -> dict[str, Any]:
    """What the trainer refuses (a device, optimizer or saved state it cannot train with)
    fails the job with a code the client can act on, not as a crash."""
    from services.trainer.train import OptimizerUnavailable as MissingOptimizer
    from services.trainer.train import TrainingRefused

    try:
        return await _run(ctx, task, queued_s=queued_s)
    except MissingOptimizer as exc:
        raise OptimizerUnavailable(f"training cannot start: {exc}") from exc
    except (TrainingRefused, ConfigError) as exc:
        raise InvalidJobSpec(f"training refused: {exc}") from exc


async def train_lora(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The arq task; the outcome is the job's terminal event."""
    task = TrainingTask.model_validate(payload)
    settings = TrainerContext.of(ctx).settings
    return await run_job(
        ctx, job_id=task.job_id, cleanup_prefix=training_tmp_prefix(task.output_prefix),
        timeout_s=settings.trainer.job_timeout_s, max_tries=settings.trainer.max_tries,
        log_extra={"job_id": task.job_id, "tenant": task.tenant_id},
        body=lambda queued_s: _run_refusals_as_ours(ctx, task, queued_s=queued_s),
        kind=JobKind.TRAINING.value,
    )


def build_worker(settings: Settings | None = None) -> Worker:
    settings = settings or get_settings()
    cfg = settings.trainer
    return make_worker(
        settings, functions=[func(train_lora, name=TRAIN_TASK)], queue=TRAINER_QUEUE,
        startup=startup, job_timeout_s=cfg.job_timeout_s, max_tries=cfg.max_tries,
        poll_delay_s=cfg.poll_delay_s,
        completion_wait_s=60,
    )


def main() -> None:
    run_worker(build_worker)


if __name__ == "__main__":
    main()
