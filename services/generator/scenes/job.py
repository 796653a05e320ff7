"""A scene job's body: pick the action, fit its shot onto the background, then two inpaint
stages through the same render path as a generation (so the pipelines are shared, not loaded
again): the body inside the body mask under the pose guide's ControlNet, then, with a LoRA,
the face inside the face mask.

What the user needs to see why a result looks as it does is stored beside the images: the pose
control image, both masks and each stage-1 image. The manifest goes last; a failure anywhere
leaves nothing, because the job runner removes the job's prefix (every key here is under it).
"""

from __future__ import annotations

import asyncio
import io
import time
from datetime import UTC, datetime
from typing import Any

from PIL import Image
from pydantic import BaseModel, Field

from services.generator.artifacts import put_artifact
from services.generator.context import GeneratorContext
from services.generator.generation import as_run, load_inputs, render_task
from services.generator.render import a1111_parameters, encode_png
from services.generator.scenes.fit import FittedShot, fit_shot
from services.jobrunner import RUNNING
from shared.keys import manifest_key, output_key, scene_asset_key
from shared.outcomes import ActionScore, SceneOutcome, SceneSucceeded
from shared.specs import (
    ArtifactRef,
    ControlSpec,
    GenerationMode,
    GenerationSpec,
    GenerationTask,
    LoraRef,
    MaskSpec,
)
from shared.specs.generation import LoraUse
from shared.specs.scene import (
    DEFAULT_PROMPT_TEMPLATE,
    SceneAction,
    SceneTask,
    prompt_values,
    render_prompt,
)


class SceneManifest(BaseModel):
    """Everything a scene ran with, beside its images."""

    job_id: str
    tenant_id: str
    spec: dict[str, Any]
    place: dict[str, Any]
    image: dict[str, Any]
    action: ActionScore
    action_scores: list[ActionScore] | None = None
    prompt: str
    face_prompt: str | None = None
    stages: list[dict[str, Any]] = Field(default_factory=list)
    images: list[ArtifactRef]
    assets: list[ArtifactRef]
    model: dict[str, Any]
    timings: dict[str, float]
    created_at: datetime


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def score_actions(text: str, actions: list[SceneAction]) -> tuple[
        list[ActionScore], dict[str, dict[str, Any]]]:
    """Every action ranked by how close its name and description are to ``text`` (cosine of
    MiniLM sentence embeddings), best first, and the embeddings computed here (an action's
    cached one is used while its hash says it is of the current text)."""
    from services.models.embeddings import (
        action_text,
        embed_texts,
        embedding_source_hash,
        rank,
    )

    fresh: dict[str, dict[str, Any]] = {}
    vectors: dict[str, list[float]] = {}
    stale = []
    for action in actions:
        text_hash = embedding_source_hash(action_text(action.name, action.description))
        if action.embedding is not None and action.embedding_hash == text_hash:
            vectors[action.id] = action.embedding
        else:
            stale.append((action, text_hash))
    texts = [action_text(a.name, a.description) for a, _ in stale] + [text]
    embedded = await asyncio.to_thread(embed_texts, texts)
    for (action, text_hash), vector in zip(stale, embedded, strict=False):
        vectors[action.id] = vector
        fresh[action.id] = {"hash": text_hash, "vector": vector}
    names = {a.id: a.name for a in actions}
    ranking = rank(embedded[-1], [(a.id, vectors[a.id]) for a in actions])
    return [ActionScore(id=action_id, name=names[action_id], score=score)
            for action_id, score in ranking], fresh


async def pick_action(task: SceneTask) -> tuple[SceneAction, list[ActionScore] | None,
                                                 dict[str, dict[str, Any]]]:
    """The named action, or the candidate closest in meaning to ``action_text``, with the
    scores of all of them and the embeddings computed here for the gateway to cache."""
    if task.spec.action_text is None:
        return task.actions[0], None, {}
    scores, fresh = await score_actions(task.spec.action_text, task.actions)
    return next(a for a in task.actions if a.id == scores[0].id), scores, fresh


async def run_scene(ctx: dict[str, Any], task: SceneTask, *, queued_s: float) -> dict[str, Any]:
    context = GeneratorContext.of(ctx)
    store, events = context.store, context.events
    spec = task.spec
    timings: dict[str, float] = {"queue_wait_s": round(queued_s, 4)}
    t0 = time.perf_counter()

    action, scores, fresh = await pick_action(task)
    timings["pick_s"] = round(time.perf_counter() - t0, 4)
    template = spec.prompt_template or DEFAULT_PROMPT_TEMPLATE

    def prompt_with(trigger: str) -> str:
        return render_prompt(template, prompt_values(
            spec.subject, action_name=action.name, action_description=action.description,
            place=task.place.get("description", ""),
            image=str(task.image.get("description", "")), trigger=trigger, gender=task.gender))

    prompt = prompt_with("")
    lora = task.lora
    face_prompt = None
    if lora is not None:
        face_prompt = prompt_with(" ".join(lora.get("trigger_words") or []))

    # The shot's pose guide and masks, fitted onto the background at the generation size.
    t1 = time.perf_counter()
    assets = {name: key for name, key in (
        ("pose", action.assets.pose_image_key), ("body_mask", action.assets.body_mask_key),
        ("face_mask", action.assets.face_mask_key)) if key}
    raw = await load_inputs(store, assets)
    fitted: FittedShot = await asyncio.to_thread(
        fit_shot, action.assets, raw, (task.width, task.height))
    keys = {name: scene_asset_key(task.tenant_id, task.job_id, name)
            for name in ("pose_control", "body_mask", "face_mask")}
    asset_refs: list[ArtifactRef] = []
    for name, image in (("pose_control", fitted.pose), ("body_mask", fitted.body_mask),
                        ("face_mask", fitted.face_mask)):
        ref = await put_artifact(store, keys[name], _png(image), "image/png")
        asset_refs.append(ref.model_copy(update={"kind": name, "width": image.width,
                                                 "height": image.height}))
    timings["fit_s"] = round(time.perf_counter() - t1, 4)

    face_runs = spec.num_images if lora is not None else 0
    total_stages = 1 + face_runs
    done_stages = 0

    def progress_for(stage: str, image: int | None) -> Any:
        async def progress(step: int, total: int) -> None:
            data: dict[str, Any] = {"stage": stage, "step": step, "total_steps": total,
                                    "progress": round((done_stages + step / total) / total_stages, 4)}
            if image is not None:
                data["image"] = image
            await events.emit(task.job_id, "progress", allowed_from=RUNNING, data=data)
        return progress

    # Stage 1: the body, inside the body mask, following the pose guide.
    body_spec = GenerationSpec(
        mode=GenerationMode.INPAINT, prompt=prompt, negative_prompt=spec.negative_prompt or "",
        model=task.model, width=task.width, height=task.height, steps=task.steps,
        guidance_scale=task.guidance_scale, seed=task.seed, scheduler=task.scheduler,
        num_images=spec.num_images, strength=spec.strength.body, init_image="scene:background",
        mask=MaskSpec(image="scene:body_mask"), composite=True,
        controls=[ControlSpec(type=fitted.control, image="scene:pose_control",
                              preprocess=fitted.preprocess, scale=spec.control_scale)],
    )
    body_task = GenerationTask(
        job_id=task.job_id, tenant_id=task.tenant_id, spec=body_spec,
        inputs={"init_image": str(task.image["key"]), "mask": keys["body_mask"],
                "controls.0.image": keys["pose_control"]},
        safety=None if lora is not None else task.safety)
    t2 = time.perf_counter()
    body = await render_task(ctx, body_task, progress=progress_for("body", None))
    timings["body_s"] = round(time.perf_counter() - t2, 4)
    done_stages = 1
    seeds = body.result.seeds
    scheduler = body.result.scheduler
    stage_runs: list[dict[str, Any]] = [{
        "stage": "body", "spec": as_run(body_spec, scheduler=scheduler).model_dump(mode="json"),
        "seconds": round(body.result.seconds, 4)}]

    finals: list[Image.Image | None] = list(body.images)
    safety = body.safety
    loras_applied: list[dict[str, Any]] = []
    if lora is not None:
        stage_keys: list[str] = []
        for index, image in enumerate(body.result.images):
            key = scene_asset_key(task.tenant_id, task.job_id, f"stage1-{index}")
            ref = await put_artifact(store, key, _png(image), "image/png")
            asset_refs.append(ref.model_copy(update={
                "kind": "stage_image", "index": index, "width": image.width,
                "height": image.height, "seed": seeds[index]}))
            stage_keys.append(key)
        # Stage 2: each stage-1 image's face, inside the face mask, with the LoRA.
        ref_lora = LoraRef(id=lora["id"], name=lora["name"], key=lora["key"],
                           sha256=lora["sha256"], weight=lora["weight"],
                           subject_id=lora.get("subject_id"))
        finals, safety = [], []
        t3 = time.perf_counter()
        for index, key in enumerate(stage_keys):
            face_spec = body_spec.model_copy(update={
                "prompt": face_prompt, "num_images": 1, "seed": seeds[index],
                "strength": spec.strength.face, "mask": MaskSpec(image="scene:face_mask"),
                "init_image": "scene:stage1", "controls": [],
                "loras": [LoraUse(id=ref_lora.id, weight=ref_lora.weight)]})
            face = await render_task(ctx, GenerationTask(
                job_id=task.job_id, tenant_id=task.tenant_id, spec=face_spec,
                inputs={"init_image": key, "mask": keys["face_mask"]}, loras=[ref_lora],
                safety=task.safety), progress=progress_for("face", index))
            done_stages += 1
            finals.append(face.images[0])
            safety += [{**verdict, "index": index} for verdict in face.safety]
            loras_applied = face.result.loras
            stage_runs.append({"stage": "face", "image": index, "seconds": round(
                face.result.seconds, 4), "spec": as_run(face_spec, scheduler=scheduler)
                .model_dump(mode="json")})
        timings["face_s"] = round(time.perf_counter() - t3, 4)

    t4 = time.perf_counter()
    loaded = body.loaded
    chosen = next((s for s in scores or [] if s.id == action.id),
                  ActionScore(id=action.id, name=action.name, score=1.0))
    refs: list[ArtifactRef] = []
    for index, (final, seed) in enumerate(zip(finals, seeds, strict=True)):
        if final is None:
            continue  # withheld by the safety filter: never stored
        run_spec = as_run(body_spec, scheduler=scheduler).model_copy(update={"seed": seed})
        png = encode_png(final, parameters=a1111_parameters(
            run_spec, seed=seed, scheduler=scheduler, model=loaded, loras=loras_applied),
            loomis={"job_id": task.job_id, "index": index, "seed": seed, "kind": "scene",
                    "prompt": prompt, "face_prompt": face_prompt, "action": action.name})
        ref = await put_artifact(store, output_key(task.tenant_id, task.job_id, index), png,
                                 "image/png")
        refs.append(ref.model_copy(update={"index": index, "width": final.width,
                                           "height": final.height, "seed": seed}))
    timings["upload_s"] = round(time.perf_counter() - t4, 4)
    timings["total_s"] = round(time.perf_counter() - t0, 4)
    stages = ["body", "face"] if lora is not None else ["body"]
    manifest = SceneManifest(
        job_id=task.job_id, tenant_id=task.tenant_id, spec=spec.model_dump(mode="json"),
        place=task.place, image=task.image, action=chosen, action_scores=scores, prompt=prompt,
        face_prompt=face_prompt, stages=stage_runs, images=refs, assets=asset_refs,
        model=loaded.describe(), timings=timings, created_at=datetime.now(UTC))
    manifest_ref = await put_artifact(store, manifest_key(task.tenant_id, task.job_id),
                                      manifest.model_dump_json(indent=2).encode(),
                                      "application/json")
    outcome = SceneSucceeded(
        artifacts=[*refs, *asset_refs, manifest_ref], action_embeddings=fresh,
        result=SceneOutcome(
            timings=timings, seeds=seeds, prompt=prompt, face_prompt=face_prompt, action=chosen,
            action_scores=scores, stages=stages,
            model={"name": loaded.preset.name, "sha256": loaded.sha256}, scheduler=scheduler,
            loras=loras_applied or None, safety=safety or None))
    return outcome.event_data()
