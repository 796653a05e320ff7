"""The tagger worker: captions (BLIP-class) and tags (WD14-class) a dataset's images.

Like the generator it speaks only Redis and S3: the gateway queues the items (keys and the
captions/tags they have), the worker reads the images from storage and returns per-image
results on its terminal event, which the gateway writes onto the dataset's items. One image
failing is reported for that image; the others keep their results.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arq.worker import Worker, func
from PIL import Image, ImageOps

from services.jobrunner import RUNNING, common_startup, make_worker, run_job, run_worker
from services.models.device import pick_device
from services.models.sources import ModelSources
from services.tagger.text import clean_caption, clean_tags, format_tags, merge_metadata, with_trigger
from services.workerctx import CONTEXT_KEY, WorkerContext
from shared.errors import JobCanceled, NotFound
from shared.keys import caption_key, tagging_metadata_key, tagging_results_key
from shared.outcomes import TaggingSucceeded
from shared.queue import TAG_TASK, TAGGER_QUEUE
from shared.settings import Settings, get_settings
from shared.specs import ArtifactRef, JobKind, TaggingItem, TaggingTask
from shared.storage import ObjectStore
from shared.tagging import has_trigger

logger = logging.getLogger(__name__)


class TaggerModels:
    """The captioner and the tagger, each loaded on first use and kept for the process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sources = ModelSources(cache_dir=settings.model_cache,
                                    allow_downloads=settings.models.allow_downloads)
        self._captioner: Any = None
        self._tagger: Any = None

    def _resolve(self, source: str) -> Path:
        return self.sources.path(source)

    def device(self) -> str:
        return pick_device(self.settings.tagger.device, mps=False)

    def captioner(self) -> Any:
        if self._captioner is None:
            from services.tagger.models import Captioner

            self._captioner = Captioner(self._resolve(self.settings.tagger.captioner),
                                        device=self.device())
        return self._captioner

    def tagger(self) -> Any:
        if self._tagger is None:
            from services.tagger.models import Tagger

            self._tagger = Tagger(self._resolve(self.settings.tagger.tagger))
        return self._tagger


@dataclass
class TaggerContext(WorkerContext):
    models: TaggerModels = field(kw_only=True)


async def startup(ctx: dict[str, Any]) -> None:
    base = common_startup(ctx)
    ctx[CONTEXT_KEY] = TaggerContext.extend(base, models=TaggerModels(base.settings))


def _batches(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


async def _load(store: ObjectStore, item: TaggingItem) -> Image.Image | Exception:
    try:
        data = await store.get(item.key)
        image = Image.open(io.BytesIO(data))
        image.load()
        # as the trainer reads it (services/trainer/worker.py upright): turned by its EXIF
        # orientation, or a phone's portrait photo is captioned on its side
        return ImageOps.exif_transpose(image) or image
    except NotFound as exc:
        return exc
    except Exception as exc:  # a corrupt file fails its own image only
        return exc


async def _readable(
    store: ObjectStore, batch: list[TaggingItem], results: dict[str, dict[str, Any]],
) -> list[tuple[TaggingItem, Image.Image]]:
    """The batch's images that decode; the others get their error and drop out."""
    good = []
    for item in batch:
        image = await _load(store, item)
        if isinstance(image, Image.Image):
            good.append((item, image))
        else:
            results[item.id]["error"] = f"unreadable image: {type(image).__name__}"
    return good


async def _run(ctx: dict[str, Any], task: TaggingTask, *, queued_s: float) -> dict[str, Any]:
    context = TaggerContext.of(ctx)
    events, store, models = context.events, context.store, context.models
    spec = task.spec
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {item.id: {} for item in task.items}
    captions = {item.id: item.caption for item in task.items}
    tags = {item.id: list(item.tags) for item in task.items}

    to_caption = [i for i in task.items
                  if spec.caption is not None and (spec.caption.overwrite or not i.caption)]
    to_tag = task.items if spec.tags is not None else []
    steps = (math.ceil(len(to_caption) / spec.caption.batch_size) if spec.caption else 0) + \
        (math.ceil(len(to_tag) / spec.tags.batch_size) if spec.tags else 0)
    done = 0

    async def progress(stage: str) -> None:
        nonlocal done
        done += 1
        if await events.cancel_requested(task.job_id):
            raise JobCanceled()
        await events.emit(task.job_id, "progress", allowed_from=RUNNING, data={
            "stage": stage, "step": done, "total_steps": max(steps, 1),
            "progress": round(done / max(steps, 1), 4)})

    timings: dict[str, float] = {"queue_wait_s": round(queued_s, 4)}
    if spec.caption is not None and to_caption:
        options = spec.caption
        captioner = await asyncio.to_thread(models.captioner)
        t0 = time.perf_counter()
        for batch in _batches(to_caption, options.batch_size):
            good = await _readable(store, batch, results)
            outputs = await asyncio.to_thread(
                captioner.caption_each, [image for _, image in good],
                batch_size=options.batch_size, max_length=options.max_length,
                min_length=options.min_length, num_beams=options.num_beams,
                do_sample=options.do_sample, top_p=options.top_p, seed=options.seed)
            for (item, _), output in zip(good, outputs, strict=True):
                if isinstance(output, Exception):
                    results[item.id]["error"] = f"captioning failed: {output}"
                else:
                    captions[item.id] = output
                    results[item.id]["caption"] = output
            await progress("caption")
        timings["caption_s"] = round(time.perf_counter() - t0, 4)
    if spec.tags is not None and to_tag:
        options_t = spec.tags
        tagger = await asyncio.to_thread(models.tagger)
        t0 = time.perf_counter()
        for batch in _batches(to_tag, options_t.batch_size):
            good = await _readable(store, batch, results)
            outputs = await asyncio.to_thread(
                tagger.tag_each, [image for _, image in good], batch_size=options_t.batch_size,
                general_threshold=options_t.general_threshold,
                character_threshold=options_t.character_threshold)
            for (item, _), output in zip(good, outputs, strict=True):
                if isinstance(output, Exception):
                    results[item.id]["error"] = f"tagging failed: {output}"
                    continue
                formatted = format_tags(
                    output.general, output.character, output.rating,
                    undesired=set(options_t.undesired),
                    underscores_to_spaces=options_t.underscores_to_spaces,
                    keep_rating=options_t.keep_rating, prefix=options_t.prefix,
                    character_first=options_t.character_first, escape=options_t.escape)
                new = formatted if options_t.overwrite else list(
                    dict.fromkeys([*tags[item.id], *formatted]))
                tags[item.id] = new
                results[item.id]["tags"] = new
            await progress("tag")
        timings["tag_s"] = round(time.perf_counter() - t0, 4)
    # what the models wrote (cleaning may also rewrite an uploaded caption: that one stays
    # the user's, trigger or not, as kohya trains on a caption file as it is)
    generated = {i: {"caption", "tags"} & set(r) for i, r in results.items()}
    if spec.clean is not None:
        clean = spec.clean
        for item in task.items:
            if "error" in results[item.id] and len(results[item.id]) == 1:
                continue
            caption = captions[item.id]
            if caption:
                cleaned = clean_caption(caption, replacements=clean.replacements,
                                        strip_rating=clean.strip_rating)
                if cleaned != caption or "caption" in results[item.id]:
                    captions[item.id] = cleaned
                    results[item.id]["caption"] = cleaned
            if tags[item.id]:
                cleaned_tags = clean_tags(tags[item.id], replacements=clean.replacements,
                                          strip_rating=clean.strip_rating)
                if cleaned_tags != tags[item.id] or "tags" in results[item.id]:
                    tags[item.id] = cleaned_tags
                    results[item.id]["tags"] = cleaned_tags

    if spec.prefix_trigger:  # after cleaning, so a replacement cannot take the trigger out
        for item in task.items:
            if not item.trigger:
                continue
            if "caption" in generated[item.id]:
                captions[item.id] = results[item.id]["caption"] = with_trigger(
                    captions[item.id] or "", item.trigger)
            if "tags" in generated[item.id] and not any(has_trigger(t, item.trigger)
                                                     for t in tags[item.id]):
                tags[item.id] = results[item.id]["tags"] = [" ".join(item.trigger.split()),
                                                            *tags[item.id]]

    # kohya fine-tuning metadata for the whole dataset, keyed like the export's metadata.json.
    keys = {item.id: item.path.rsplit(".", 1)[0] for item in task.items}
    metadata = merge_metadata(
        {}, captions={keys[i]: c for i, c in captions.items() if c},
        tags={keys[i]: t for i, t in tags.items() if t})
    artifacts: list[ArtifactRef] = []
    for key, payload, kind in ((tagging_metadata_key(task.output_prefix), metadata, "metadata"),
                               (tagging_results_key(task.output_prefix), results, "results")):
        data = json.dumps(payload, indent=2, ensure_ascii=False).encode()
        await store.put(key, data, content_type="application/json")
        artifacts.append(ArtifactRef(key=key, kind=kind, content_type="application/json",
                                     size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    if spec.write_caption_files:
        for item in task.items:
            text = captions[item.id] or ", ".join(tags[item.id])
            if text:
                await store.put(caption_key(item.key, task.caption_extension),
                                (text + "\n").encode(), content_type="text/plain")
    failed = sorted(i for i, r in results.items() if "error" in r)
    timings["total_s"] = round(time.perf_counter() - started, 4)
    return TaggingSucceeded.model_validate({
        "artifacts": [a.model_dump() for a in artifacts],
        "result": {"timings": timings, "images": len(task.items),
                   "captioned": sum("caption" in r for r in results.values()),
                   "tagged": sum("tags" in r for r in results.values()),
                   "failed": [{"item": i, "error": results[i]["error"]} for i in failed]},
        "dataset_items": {i: r for i, r in results.items() if r},
    }).event_data()


async def tag_dataset(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """The arq task; the outcome is the job's terminal event."""
    task = TaggingTask.model_validate(payload)
    settings = WorkerContext.of(ctx).settings
    return await run_job(
        ctx, job_id=task.job_id, cleanup_prefix=task.output_prefix,
        timeout_s=settings.tagger.job_timeout_s, max_tries=settings.tagger.max_tries,
        log_extra={"job_id": task.job_id, "tenant": task.tenant_id},
        body=lambda queued_s: _run(ctx, task, queued_s=queued_s), kind=JobKind.TAGGING.value,
    )


def build_worker(settings: Settings | None = None) -> Worker:
    settings = settings or get_settings()
    cfg = settings.tagger
    return make_worker(
        settings, functions=[func(tag_dataset, name=TAG_TASK)], queue=TAGGER_QUEUE,
        startup=startup, job_timeout_s=cfg.job_timeout_s, max_tries=cfg.max_tries,
        poll_delay_s=cfg.poll_delay_s,
    )


def main() -> None:
    run_worker(build_worker)


if __name__ == "__main__":
    main()
