"""LoRA training jobs: the dataset is resolved to images, captions, repeats and buckets here,
so the trainer worker gets a plain list and kohya's rules are checked before a job exists."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.datasets.kohya import (
    KohyaDataset,
    KohyaSubset,
    SubsetMode,
    make_buckets,
    parse_dataset_config,
)
from services.gateway.datasets.service import (
    caption_file,
    dataset_items,
    get_dataset,
    image_dir_folder,
    item_tags,
    plain_folder,
    stored_dataset_config,
    subsets_of,
)
from services.gateway.db.models import Dataset, DatasetItem, Job, Tenant, new_id
from services.gateway.deps import GatewayState
from services.gateway.jobs.submission import create_and_enqueue, find_replay, request_hash
from services.gateway.trainings.buckets import assign_bucket, epoch_plan
from services.gateway.trainings.schemas import TrainingRequest
from services.gateway.trainings.triggers import trained_triggers
from services.gateway.webhooks.service import check_job_webhook
from shared.errors import NotFound, ValidationFailed
from shared.keys import lora_key, training_prefix
from shared.kohya import ConfigError
from shared.models import ModelFamily
from shared.queue import TRAIN_TASK, TRAINER_QUEUE
from shared.specs import JobKind
from shared.training import (
    SubsetOptions,
    TrainingExample,
    TrainingSpec,
    TrainingTask,
    latest_state,
)

# the request's own validation, the TOML check included, for a TOML the dataset brought
_REQUEST: TypeAdapter[TrainingSpec] = TypeAdapter(TrainingRequest)


def _invalid(field: str, message: str) -> ValidationFailed:
    return ValidationFailed([{"field": field, "message": message}])


def _caption(item: DatasetItem, class_tokens: str | None, subset: KohyaSubset | None = None,
             *, read: bool = True) -> str:
    """kohya's order: a caption file wins, then (DreamBooth) the class tokens, then tags.

    A fine-tuning subset (``metadata_file``) trains on the metadata's caption *and* tags, as
    kohya's fine-tuning dataset joins them: ``caption, tag1, tag2``. ``read`` is false when the
    caption is in a file of another extension than the subset's ``caption_extension``: kohya
    never opens it.
    """
    if subset is not None and subset.mode is SubsetMode.FINE_TUNING:
        return ", ".join(part for part in (item.caption or "", ", ".join(item_tags(item))) if part)
    if item.caption and read:
        return item.caption
    if class_tokens:
        return class_tokens
    return ", ".join(item_tags(item))


async def _examples(
    *, session: AsyncSession, tenant: Tenant, spec: TrainingSpec,
) -> tuple[list[TrainingExample], list[str], list[tuple[str, str]]]:
    """The images a training sees, with kohya's captions; the class tokens that could be
    triggers; and (folder, note) on captions kohya would not read."""
    data = spec.data
    resolution = data.size
    overrides: dict[str, tuple[int, KohyaDataset, KohyaSubset]] = {}
    if spec.dataset_config is not None:
        try:
            config = parse_dataset_config(spec.dataset_config, defaults={
                "resolution": list(resolution), "batch_size": data.batch_size})
        except ConfigError as exc:
            # a TOML syntax error has no key to name: the field is the document itself
            field = ".".join(part for part in ("dataset_config", exc.field) if part)
            raise _invalid(field, exc.message) from exc
        named: dict[str, str] = {}
        for index, kohya_dataset in enumerate(config.datasets):
            for s_index, subset in enumerate(kohya_dataset.subsets):
                folder, path = image_dir_folder(subset.image_dir), f"datasets.{index}.subsets.{s_index}"
                if folder in named:  # one set of options per folder, never one silently dropped
                    raise _invalid(f"dataset_config.{path}.image_dir",
                                   f"names the folder {folder!r} again (also {named[folder]}); "
                                   "give each folder one subset (num_repeats weighs it)")
                named[folder] = path
                overrides[folder] = (index, kohya_dataset, subset)
    # each [[datasets]] trains at its own resolution and buckets, as kohya's do
    dataset_buckets = [kohya_dataset.buckets() for kohya_dataset in config.datasets] if overrides else []
    sources: list[tuple[Dataset, bool]] = []
    sources.append((await get_dataset(session=session, tenant=tenant,
                                      dataset_id=spec.dataset_id), False))
    if spec.reg_dataset_id:
        try:
            reg = await get_dataset(session=session, tenant=tenant, dataset_id=spec.reg_dataset_id)
        except NotFound as exc:  # named as its own field, not as dataset_id
            raise _invalid("reg_dataset_id", exc.detail) from exc
        sources.append((reg, True))
    buckets = (make_buckets(resolution=resolution, min_reso=data.min_bucket_reso,
                            max_reso=data.max_bucket_reso, steps=data.bucket_reso_steps)
               if data.enable_bucket else [resolution])
    examples: list[TrainingExample] = []
    triggers: list[str] = []
    unread: Counter[tuple[str, str, str]] = Counter()  # (folder, file extension, subset's)
    for dataset, forced_reg in sources:
        subsets = subsets_of(dataset)
        for item in await dataset_items(session=session, dataset=dataset):
            info = subsets[item.subset]
            folder = info.folder
            entry = overrides.get(info.folder) or overrides.get(info.name)
            if entry is None and overrides and (plain := plain_folder(item.subset, item.path)):
                entry = overrides.get(plain)  # a TOML's image_dir may name any folder
                folder = plain if entry is not None else folder
            if overrides and entry is None:
                continue  # a TOML selects the subsets it names
            override = entry[2] if entry is not None else None
            repeats = override.num_repeats if override is not None else info.repeats
            is_reg = forced_reg or (override.is_reg if override is not None else info.is_reg)
            tokens = (override.class_tokens if override is not None else info.class_tokens)
            if tokens and not is_reg and tokens not in triggers:
                triggers.append(tokens)
            if entry is None:
                examples.append(TrainingExample(
                    key=item.key, caption=_caption(item, tokens), repeats=repeats, is_reg=is_reg,
                    subset=folder, bucket=assign_bucket(item.width, item.height, buckets,
                                                             steps=data.bucket_reso_steps)))
            else:
                index, kohya_dataset, subset = entry
                # a TOML's own caption_extension, else the dataset's: the run's
                # --caption_extension, in kohya's terms
                found = caption_file(item, dataset)
                wanted = subset.caption_extension or dataset.caption_extension
                read = found == wanted or subset.mode is SubsetMode.FINE_TUNING
                if item.caption and not read:
                    unread[(folder, found, wanted)] += 1
                examples.append(TrainingExample(
                    key=item.key, caption=_caption(item, tokens, subset, read=read), repeats=repeats,
                    is_reg=is_reg, subset=folder, dataset=index, batch_size=kohya_dataset.batch_size,
                    resolution=kohya_dataset.resolution, options=_subset_options(subset),
                    bucket=assign_bucket(item.width, item.height, dataset_buckets[index],
                                         steps=kohya_dataset.bucket_reso_steps)))
    examples = _balance_regularisation(examples, batch_size=data.batch_size)
    if not any(not e.is_reg for e in examples):
        raise _invalid("dataset_id", "no training images (a dataset_config selects subsets by "
                       "their folder name, e.g. `image_dir = \"10_sks dog\"`)")
    notes = [(folder, f"{count} caption(s) of {folder!r} are {found} files but its dataset_config "
                      f"subset reads {wanted} (caption_extension): kohya does not open them, so "
                      "those images train on the class tokens, or on their tags without any")
             for (folder, found, wanted), count in unread.items()]
    return examples, triggers, notes


def _subset_options(subset: KohyaSubset) -> SubsetOptions:
    return SubsetOptions(
        shuffle_caption=subset.shuffle_caption, keep_tokens=subset.keep_tokens,
        caption_separator=subset.caption_separator, caption_prefix=subset.caption_prefix,
        caption_suffix=subset.caption_suffix, caption_dropout_rate=subset.caption_dropout_rate,
        flip_aug=subset.flip_aug, color_aug=subset.color_aug, random_crop=subset.random_crop)


def _balance_regularisation(examples: list[TrainingExample], *,
                            batch_size: int) -> list[TrainingExample]:
    """Use regularisation images as kohya does: as many as the repeated training images, the
    surplus unused, a shortfall made up with extra repeats (:func:`epoch_plan`)."""
    groups: dict[tuple[str, bool], list[TrainingExample]] = {}
    for example in examples:
        groups.setdefault((example.subset, example.is_reg), []).append(example)
    keys = list(groups)
    plan = epoch_plan([(len(groups[k]), groups[k][0].repeats, k[1]) for k in keys],
                      batch_size=batch_size)
    balanced: list[TrainingExample] = []
    for index, key in enumerate(keys):
        for position, example in enumerate(groups[key]):
            repeats = plan.reg_repeats[index][position] if key[1] else example.repeats
            if repeats > 0:
                balanced.append(example.model_copy(update={"repeats": repeats}))
    return balanced


async def _resume_key(*, session: AsyncSession, state: GatewayState, tenant: Tenant,
                      job_id: str) -> str:
    job = await session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant.id,
                                                  Job.kind == JobKind.TRAINING.value))
    if job is None:
        raise _invalid("resume_from", f"no training job {job_id!r}")
    latest = await latest_state(state.store, training_prefix(tenant.id, job_id))
    if latest is None:
        raise _invalid("resume_from", f"training job {job_id} saved no resumable state")
    return latest


async def resolve_dataset_config(*, session: AsyncSession, tenant: Tenant,
                                 spec: TrainingSpec) -> TrainingSpec:
    """A training that names a dataset without its own ``dataset_config`` uses the TOML the
    dataset's upload brought, held to this request's options as if it had been sent with it;
    the job's spec then shows the config it trained with."""
    if spec.dataset_config is not None:
        return spec
    try:
        dataset = await get_dataset(session=session, tenant=tenant, dataset_id=spec.dataset_id)
    except NotFound:
        return spec  # the dataset's own error comes from resolving its images
    text = stored_dataset_config(dataset)
    if text is None:
        return spec
    try:
        parse_dataset_config(text, defaults={"resolution": list(spec.data.size),
                                             "batch_size": spec.data.batch_size})
    except ConfigError as exc:
        where = (f"with this request's data.{exc.field.removeprefix('defaults.')}"
                 if exc.field.startswith("defaults.") else exc.field)
        raise _invalid("dataset_id", f"the dataset's dataset_config.toml: {where}: "
                       f"{exc.message}") from exc
    try:
        return _REQUEST.validate_python({**spec.model_dump(mode="json"), "dataset_config": text})
    except ValidationError as exc:
        problems = "; ".join(
            ".".join(str(p) for p in error["loc"] if p != "dataset_config") + ": " + error["msg"]
            for error in exc.errors())
        raise _invalid("dataset_id", f"the dataset's dataset_config.toml: {problems}") from exc


# Optimizers that need a package the worker image may not have, and which package.
OPTIONAL_OPTIMIZERS = {"AdamW8bit": "bitsandbytes", "Lion8bit": "bitsandbytes",
                       "Lion": "lion-pytorch", "Prodigy": "prodigyopt"}


def check_optimizer(spec: TrainingSpec, available: set[str]) -> dict[str, Any] | None:
    """A field error when the optimizer needs a package the trainer workers lack."""
    package = OPTIONAL_OPTIMIZERS.get(spec.optim.optimizer)
    if package is None or spec.optim.optimizer in available:
        return None
    return {"field": "optim.optimizer", "message": f"{spec.optim.optimizer} needs the "
            f"`{package}` package, which the trainer workers do not have; use AdamW, "
            "SGDNesterov or Adafactor, or install it (LOOMIS_TRAINER__EXTRA_OPTIMIZERS)"}


def check_trainable(*, state: GatewayState, spec: TrainingSpec) -> None:
    """What a submission and its plan both refuse before reading the dataset."""
    preset = state.registry.get(spec.base_model)
    if preset is None:
        raise _invalid("base_model", f"unknown model {spec.base_model!r}")
    if preset.family != ModelFamily.SD15:
        raise _invalid("base_model", "LoRA training supports SD1.5-family models in this "
                       f"version; {preset.name} is {preset.family.value}")
    optimizer_error = check_optimizer(spec, set(state.settings.trainer.extra_optimizers))
    if optimizer_error:
        raise ValidationFailed([optimizer_error])


async def submit_training(
    *, session: AsyncSession, state: GatewayState, tenant: Tenant, spec: TrainingSpec,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    digest = request_hash(spec)
    if idempotency_key and (existing := await find_replay(
            session=session, tenant=tenant, key=idempotency_key, digest=digest)):
        return existing, False
    webhook = await check_job_webhook(settings=state.settings, webhook=spec.webhook)
    check_trainable(state=state, spec=spec)
    spec = await resolve_dataset_config(session=session, tenant=tenant, spec=spec)
    try:
        examples, candidates, notes = await _examples(session=session, tenant=tenant, spec=spec)
    except NotFound as exc:
        raise _invalid("dataset_id", exc.detail) from exc
    # only words training will see are reported as the LoRA's triggers
    triggers, gaps = trained_triggers(examples, candidates)
    resume_key = (await _resume_key(session=session, state=state, tenant=tenant,
                                    job_id=spec.resume_from) if spec.resume_from else None)
    lora_id = new_id()
    return await create_and_enqueue(
        session=session, state=state, tenant=tenant, kind=JobKind.TRAINING,
        spec={**spec.model_dump(mode="json"), "images": len(examples), "lora_id": lora_id},
        digest=digest, idempotency_key=idempotency_key, task_name=TRAIN_TASK,
        queue=TRAINER_QUEUE, webhook=webhook,
        payload=lambda job_id: TrainingTask(
            job_id=job_id, tenant_id=tenant.id, spec=spec, examples=examples,
            trigger_words=triggers, warnings=[note for _, note in notes] + [g.message for g in gaps],
            output_prefix=training_prefix(tenant.id, job_id), lora_id=lora_id,
            lora_key=lora_key(tenant.id, lora_id),
            resume_state_key=resume_key).model_dump(mode="json"),
    )
