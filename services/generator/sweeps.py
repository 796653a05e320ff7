"""A sweep job's body: every cell rendered as its own generation, then the contact sheet, the
sweep metadata JSON and the manifest, which goes last so its presence means all is in place.
"""

from __future__ import annotations

import asyncio
import io
import json
from datetime import UTC, datetime
from typing import Any

from PIL import Image

from services.generator.artifacts import put_artifact
from services.generator.context import GeneratorContext
from services.generator.generation import as_run, render_task
from services.generator.pipelines import LoadedModel
from services.generator.render import a1111_parameters, encode_png
from services.jobrunner import RUNNING
from shared.keys import contact_sheet_key, manifest_key, output_key, sweep_metadata_key
from shared.outcomes import SweepOutcome, SweepSucceeded
from shared.specs import ArtifactRef, GenerationTask, SweepTask


def _label(param: str, value: object, limit: int = 48) -> str:
    """Sheet labels stay short (a prompt axis would make a column thousands of px wide);
    the full values are in sweep.json."""
    text = f"{param}={value}"
    return text if len(text) <= limit else text[:limit - 1] + "…"


async def run_sweep(ctx: dict[str, Any], task: SweepTask, *, queued_s: float) -> dict[str, Any]:
    from services.generator.sheet import contact_sheet

    store = GeneratorContext.of(ctx).store
    events = GeneratorContext.of(ctx).events
    timings: dict[str, float] = {"queue_wait_s": round(queued_s, 4), "pipeline_s": 0.0}
    cells = task.cells
    images: list[Image.Image | None] = []
    refs: list[ArtifactRef] = []
    cell_meta: list[dict[str, Any]] = []
    safety: list[dict[str, Any]] = []
    loaded: LoadedModel | None = None
    for position, cell in enumerate(cells):
        # Progress spans the whole sweep: cell k of n at step s of t is (k + s/t) / n.
        async def scaled(step: int, total: int, *, _k: int = position) -> None:
            await events.emit(task.job_id, "progress", allowed_from=RUNNING, data={
                "step": step, "total_steps": total, "cell": _k, "cells": len(cells),
                "progress": round((_k + step / total) / len(cells), 4)})

        cell_task = GenerationTask(job_id=task.job_id, tenant_id=task.tenant_id, spec=cell.spec,
                                   inputs=task.inputs, loras=task.loras, safety=task.safety)
        rendered = await render_task(ctx, cell_task, progress=scaled)
        result, loaded = rendered.result, rendered.loaded
        timings["pipeline_s"] = round(timings["pipeline_s"] + result.seconds, 4)
        image = rendered.images[0]
        images.append(image)
        if rendered.safety:
            safety.append({**rendered.safety[0], "index": cell.index})
        cell_spec = as_run(cell.spec, scheduler=result.scheduler)
        entry = {"index": cell.index, "row": cell.row, "col": cell.col, "labels": cell.labels,
                 "seed": result.seeds[0], "spec": cell_spec.model_dump(mode="json")}
        if image is not None:
            png = encode_png(image, parameters=a1111_parameters(
                cell_spec, seed=result.seeds[0], scheduler=result.scheduler, model=loaded,
                loras=result.loras), loomis={"job_id": task.job_id, "cell": entry})
            ref = await put_artifact(store, output_key(task.tenant_id, task.job_id, cell.index), png,
                             "image/png")
            refs.append(ref.model_copy(update={"index": cell.index, "width": image.width,
                                               "height": image.height, "seed": result.seeds[0]}))
            entry["key"] = ref.key
        else:
            entry["withheld"] = True
        cell_meta.append(entry)
    assert loaded is not None
    cols = task.sweep.axes[0]
    rows = task.sweep.axes[1] if len(task.sweep.axes) > 1 else None
    n_cols = len(cols.values)
    grid = [images[r * n_cols:(r + 1) * n_cols] for r in range(len(images) // n_cols)]
    sheet = await asyncio.to_thread(
        contact_sheet, grid,
        row_labels=[_label(rows.param, v) for v in rows.values] if rows else [""],
        col_labels=[_label(cols.param, v) for v in cols.values],
        title=task.sweep.title or task.sweep.base.prompt[:120],
        row_axis=rows.param if rows else "", col_axis=cols.param)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    sheet_ref = await put_artifact(store, contact_sheet_key(task.tenant_id, task.job_id),
                           buffer.getvalue(), "image/png")
    sheet_ref = sheet_ref.model_copy(update={"kind": "contact_sheet", "width": sheet.width,
                                             "height": sheet.height})
    metadata = {"job_id": task.job_id, "title": task.sweep.title,
                "axes": [a.model_dump(mode="json") for a in task.sweep.axes],
                "columns": n_cols, "rows": len(rows.values) if rows else 1,
                "model": loaded.describe(), "cells": cell_meta, "safety": safety}
    meta_ref = await put_artifact(store, sweep_metadata_key(task.tenant_id, task.job_id),
                          json.dumps(metadata, indent=2).encode(), "application/json")
    meta_ref = meta_ref.model_copy(update={"kind": "metadata"})
    manifest = {"job_id": task.job_id, "tenant_id": task.tenant_id,
                "sweep": task.sweep.model_dump(mode="json"), "model": loaded.describe(),
                # which LoRA files (and subjects) every cell was made with
                "loras": [lora.model_dump(exclude={"key"}) for lora in task.loras],
                "versions": GeneratorContext.of(ctx).versions, "device": loaded.device, "timings": timings,
                "artifacts": [r.model_dump() for r in [*refs, sheet_ref, meta_ref]],
                "created_at": datetime.now(UTC).isoformat()}
    manifest_ref = await put_artifact(store, manifest_key(task.tenant_id, task.job_id),
                              json.dumps(manifest, indent=2).encode(), "application/json")
    return SweepSucceeded(artifacts=[*refs, sheet_ref, meta_ref, manifest_ref],
                        result=SweepOutcome.model_validate({
                            "timings": timings, "cells": len(cells), "columns": n_cols,
                            "rows": len(rows.values) if rows else 1,
                            "model": {"name": loaded.preset.name, "sha256": loaded.sha256},
                            **({"safety": safety} if safety else {})})).event_data()
