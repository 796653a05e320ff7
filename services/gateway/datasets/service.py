"""Datasets: checked in full before anything is stored, stored in full or not at all."""

from __future__ import annotations

import asyncio
import io
import logging
import posixpath
from typing import Any

from PIL import Image, ImageOps
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.datasets.export import ExportItem, export_zip, metadata_key
from services.gateway.datasets.ingest import (
    DEFAULT_SUBSET,
    IngestLimits,
    IngestResult,
    SubsetInfo,
    Upload,
    ingest,
)
from services.gateway.datasets.kohya import DatasetConfig, parse_dataset_config
from services.gateway.datasets.report import ItemSummary, build_report
from services.gateway.datasets.schemas import DatasetOut, ItemOut, ItemPage, ItemPatch
from services.gateway.db.models import Dataset, DatasetItem, Tenant, new_id, utcnow
from services.gateway.files.stores import GatewayStore
from shared.errors import NotFound, ValidationFailed
from shared.keys import dataset_item_key, dataset_prefix, dataset_thumb_key
from shared.kohya import ConfigError

logger = logging.getLogger(__name__)

THUMB_SIDE = 256
MAX_DATASET_CONFIG_CHARS = 100_000  # the bound on a training request's dataset_config
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp",
                 "bmp": "image/bmp"}


def _thumbnail(data: bytes) -> bytes:
    with Image.open(io.BytesIO(data)) as opened:
        image: Image.Image = ImageOps.exif_transpose(opened) or opened
        image.thumbnail((THUMB_SIDE, THUMB_SIDE))
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def subsets_of(dataset: Dataset) -> dict[str, SubsetInfo]:
    return {s["name"]: SubsetInfo(**s) for s in dataset.subsets.get("subsets", [])}


def image_dir_folder(image_dir: str | None) -> str:
    """The subset folder a kohya ``image_dir`` names: its last component, from a relative,
    absolute or Windows path alike (``C:\\train\\img\\10_sks dog`` is ``10_sks dog``)."""
    return posixpath.basename((image_dir or "").replace("\\", "/").rstrip("/"))


def plain_folder(subset: str, path: str) -> str | None:
    """The folder of an image outside kohya's ``<repeats>_<name>`` folders, for a TOML's
    ``image_dir`` to name: kohya's TOML mode takes any folder (``C:\\hoge``), and such images
    are stored in the default subset with their path."""
    if subset != DEFAULT_SUBSET:
        return None
    return posixpath.basename(posixpath.dirname(path)) or None


def stored_dataset_config(dataset: Dataset) -> str | None:
    """The ``dataset_config.toml`` the dataset's upload brought, checked when it was stored."""
    text = dataset.subsets.get("dataset_config")
    return text if isinstance(text, str) else None


def check_dataset_config(text: str, *, field: str, subsets: list[SubsetInfo],
                         plain_folders: set[str] | None = None) -> DatasetConfig:
    """Hold an uploaded TOML to what a request's ``dataset_config`` is held to, and its
    ``image_dir`` values to this upload's folders: a training that names the dataset will use it."""
    def refuse(message: str) -> ValidationFailed:
        return ValidationFailed([{"field": field, "message": f"the dataset config: {message}"}])

    if len(text) > MAX_DATASET_CONFIG_CHARS:
        raise refuse(f"longer than {MAX_DATASET_CONFIG_CHARS} characters")
    try:
        config = parse_dataset_config(text)
    except ConfigError as exc:
        raise refuse(str(exc)) from exc
    folders = {s.folder for s in subsets} | {s.name for s in subsets} | (plain_folders or set())
    named: set[str] = set()
    for d_index, kohya_dataset in enumerate(config.datasets):
        for s_index, subset in enumerate(kohya_dataset.subsets):
            folder = image_dir_folder(subset.image_dir)
            if folder not in folders:
                raise refuse(f"datasets.{d_index}.subsets.{s_index}.image_dir: "
                             f"{subset.image_dir!r} names no folder of this upload "
                             f"({', '.join(sorted(folders - {DEFAULT_SUBSET}))})")
            if folder in named:
                raise refuse(f"datasets.{d_index}.subsets.{s_index}.image_dir: the folder "
                             f"{folder!r} has a subset already; give each folder one")
            named.add(folder)
    return config


def config_summary(config: DatasetConfig) -> list[dict[str, Any]]:
    """What each ``[[datasets]]`` will train with, as the report shows it."""
    return [{
        "resolution": list(d.resolution) if d.resolution else None, "batch_size": d.batch_size,
        "enable_bucket": d.enable_bucket, "min_bucket_reso": d.min_bucket_reso,
        "max_bucket_reso": d.max_bucket_reso, "bucket_reso_steps": d.bucket_reso_steps,
        "subsets": [{"image_dir": s.image_dir, "num_repeats": s.num_repeats, "is_reg": s.is_reg,
                     "class_tokens": s.class_tokens, "mode": s.mode.value} for s in d.subsets],
    } for d in config.datasets]


def item_tags(item: DatasetItem) -> list[str]:
    return list(item.tags.get("tags", []))


def item_flags(item: DatasetItem) -> list[str]:
    return list(item.flags.get("flags", []))


def caption_file(item: DatasetItem, dataset: Dataset) -> str:
    """The extension of the caption file kohya would find this caption in: the uploaded one,
    else the dataset's own ``caption_extension``, which its export writes captions as (a
    tagging job's or an edited caption)."""
    ext = item.flags.get("caption_file")
    return ext if isinstance(ext, str) else dataset.caption_extension


def without_caption_file(flags: dict[str, Any]) -> dict[str, Any]:
    """An item's flags once its caption no longer comes from the uploaded file."""
    return {key: value for key, value in flags.items() if key != "caption_file"}


async def create_dataset(
    *, session: AsyncSession, store: GatewayStore, tenant: Tenant, name: str,
    files: list[tuple[str, Upload]], zips: list[tuple[str, Upload]], caption_extension: str,
    min_side: int, dataset_id: str | None = None, checked: IngestResult | None = None,
) -> tuple[Dataset, list[DatasetItem]]:
    """Ingest (pure, may refuse), store every object, then commit the rows (with whatever
    else the caller added to the session); undo on failure.

    Images are read back from the upload one at a time as they are stored. ``checked``: the
    caller's own ingest of these very files, not repeated.
    """
    extensions = tuple(dict.fromkeys((caption_extension, ".caption", ".txt")))
    result: IngestResult = checked if checked is not None else await asyncio.to_thread(
        ingest, files=files, zips=zips, caption_extensions=extensions,
        limits=IngestLimits(min_side=min_side))
    if result.config_toml is not None:
        check_dataset_config(result.config_toml, field=result.config_field or "zip",
                             subsets=result.subsets, plain_folders={
                                 folder for item in result.items
                                 if (folder := plain_folder(item.subset, item.path))})
    dataset_id = dataset_id or new_id()
    prefix = dataset_prefix(tenant.id, dataset_id)
    dataset = Dataset(
        id=dataset_id, tenant_id=tenant.id, name=name, caption_extension=caption_extension,
        min_side=min_side,
        subsets={"subsets": [vars(s).copy() for s in result.subsets],
                 "dataset_config": result.config_toml},
        upload_report={
            "duplicates": [{"kept": k, "dropped": d} for k, d in result.duplicates],
            "ignored": [{"source": i.source, "path": i.path, "reason": i.reason}
                        for i in result.ignored[:200]],
            "renamed": [{"from": a, "to": b} for a, b in result.renamed],
            "config_toml": result.config_toml is not None,
            "metadata_json": result.metadata is not None,
        },
        created_at=utcnow(), updated_at=utcnow(),
    )
    rows: list[DatasetItem] = []
    try:
        for ingested in result.items:
            item_id = new_id()
            key = dataset_item_key(tenant.id, dataset_id, ingested.path)
            thumb_key = dataset_thumb_key(tenant.id, dataset_id, item_id)
            data = await asyncio.to_thread(ingested.load)
            await store.put(key, data, content_type=CONTENT_TYPES.get(ingested.format, "image/png"))
            await store.put(thumb_key, await asyncio.to_thread(_thumbnail, data),
                            content_type="image/jpeg")
            del data
            rows.append(DatasetItem(
                id=item_id, dataset_id=dataset_id, tenant_id=tenant.id, subset=ingested.subset,
                path=ingested.path, filename=ingested.filename, key=key, thumb_key=thumb_key,
                sha256=ingested.sha256, format=ingested.format, width=ingested.width,
                height=ingested.height, caption=ingested.caption, tags={"tags": []},
                flags={"flags": list(ingested.flags),
                       **({"caption_file": ingested.caption_file} if ingested.caption_file else {})},
                created_at=utcnow(), updated_at=utcnow(),
            ))
        _apply_uploaded_metadata(rows, result, subsets={s.name: s for s in result.subsets})
        session.add(dataset)
        session.add_all(rows)
        await session.commit()
    except BaseException:
        await session.rollback()
        await store.delete_prefix(prefix)  # nothing half-stored
        raise
    return dataset, rows


def _apply_uploaded_metadata(rows: list[DatasetItem], result: IngestResult,
                             subsets: dict[str, SubsetInfo]) -> None:
    """A kohya user's ``metadata.json`` (caption/tags per image key) travels with the upload."""
    if not result.metadata:
        return
    for row in rows:
        subset = subsets[row.subset]
        keys = (metadata_key(subset, row.filename), posixpath.splitext(row.filename)[0])
        entry = next((result.metadata[k] for k in keys if isinstance(result.metadata.get(k), dict)),
                     None)
        if entry is None:
            continue
        if row.caption is None and isinstance(entry.get("caption"), str):
            row.caption = entry["caption"]
        if isinstance(entry.get("tags"), str):
            row.tags = {"tags": [t.strip() for t in entry["tags"].split(",") if t.strip()]}


async def get_dataset(*, session: AsyncSession, tenant: Tenant, dataset_id: str) -> Dataset:
    dataset = await session.scalar(
        select(Dataset).where(Dataset.id == dataset_id, Dataset.tenant_id == tenant.id))
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found", code="dataset_not_found")
    return dataset


async def dataset_items(*, session: AsyncSession, dataset: Dataset) -> list[DatasetItem]:
    return list(await session.scalars(
        select(DatasetItem).where(DatasetItem.dataset_id == dataset.id).order_by(DatasetItem.path)))


def dataset_out(dataset: Dataset, items: list[DatasetItem]) -> DatasetOut:
    subsets = subsets_of(dataset)
    summaries = [ItemSummary(subset=subsets[i.subset], width=i.width, height=i.height,
                             caption=i.caption, tags=item_tags(i), flags=tuple(item_flags(i)))
                 for i in items]
    report = build_report(summaries, duplicates=len(dataset.upload_report.get("duplicates", [])))
    config_text = stored_dataset_config(dataset)
    base = f"/v1/datasets/{dataset.id}"
    return DatasetOut(
        id=dataset.id, name=dataset.name, caption_extension=dataset.caption_extension,
        min_side=dataset.min_side,
        report={**report, "dataset_config": (config_summary(parse_dataset_config(config_text))
                                              if config_text else None)},
        dataset_config=config_text, upload=dataset.upload_report,
        created_at=dataset.created_at,
        links={"self": base, "items": f"{base}/items", "export": f"{base}/export",
               "tag": "/v1/taggings"},
    )


def item_out(item: DatasetItem, *, store: GatewayStore) -> ItemOut:
    return ItemOut(
        id=item.id, subset=item.subset, path=item.path, filename=item.filename,
        width=item.width, height=item.height, format=item.format, sha256=item.sha256,
        caption=item.caption, tags=item_tags(item), flags=item_flags(item),
        error=item.flags.get("error"), thumbnail_url=store.presign_get(item.thumb_key),
        url=store.presign_get(item.key),
    )


async def page_items(*, session: AsyncSession, store: GatewayStore, dataset: Dataset,
                     limit: int, cursor: str | None) -> ItemPage:
    """Ordered by path; the cursor is the last path seen (paths are unique per dataset)."""
    query = select(DatasetItem).where(DatasetItem.dataset_id == dataset.id)
    if cursor:
        query = query.where(DatasetItem.path > cursor)
    rows = list(await session.scalars(query.order_by(DatasetItem.path).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    return ItemPage(items=[item_out(r, store=store) for r in rows],
                    next_cursor=rows[-1].path if more and rows else None)


async def patch_item(*, session: AsyncSession, dataset: Dataset, item_id: str,
                     patch: ItemPatch) -> DatasetItem:
    item = await session.scalar(select(DatasetItem).where(
        DatasetItem.id == item_id, DatasetItem.dataset_id == dataset.id))
    if item is None:
        raise NotFound(f"item {item_id} not found in dataset {dataset.id}", code="item_not_found")
    if patch.caption is not None:
        item.caption = " ".join(patch.caption.split()) or None
        item.flags = without_caption_file(item.flags)
    if patch.tags is not None:
        cleaned = list(dict.fromkeys(t.strip() for t in patch.tags if t.strip()))
        if any("," in t for t in cleaned):
            raise ValidationFailed([{"field": "tags", "message": "a tag may not contain a comma"}])
        item.tags = {"tags": cleaned}
    item.updated_at = utcnow()
    await session.commit()
    return item


async def export_dataset(*, session: AsyncSession, store: GatewayStore, dataset: Dataset) -> bytes:
    items = await dataset_items(session=session, dataset=dataset)
    exports = [ExportItem(subset=i.subset, filename=i.filename, data=await store.get(i.key),
                          caption=i.caption, tags=item_tags(i)) for i in items]
    subsets = list(subsets_of(dataset).values())
    return await asyncio.to_thread(
        export_zip, items=exports, subsets=subsets, caption_extension=dataset.caption_extension)


async def delete_dataset(*, session: AsyncSession, store: GatewayStore, dataset: Dataset) -> None:
    prefix = dataset_prefix(dataset.tenant_id, dataset.id)
    await session.execute(delete(DatasetItem).where(DatasetItem.dataset_id == dataset.id))
    await session.delete(dataset)
    await session.commit()
    await store.delete_prefix(prefix)
