"""Scene submissions: every name resolved and every parameter checked before a job exists.

The old application skipped the face step in silence when a LoRA code matched nothing; here an
unknown place, image, action or shot, an action without the shot, or a LoRA that is not the
tenant's or does not fit the model is a 422 naming the field, and no job is made.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.db.models import Action, ActionShot, Job, Lora, Tenant
from services.gateway.deps import GatewayState
from services.gateway.generations.resolve import resolve_generation
from services.gateway.generations.service import safety_policy
from services.gateway.jobs.submission import create_and_enqueue, find_replay, request_hash
from services.gateway.loras.service import resolve_loras
from services.gateway.scenes.service import (
    find_action,
    find_place,
    find_place_image,
    list_actions_with_shot,
)
from services.gateway.subjects.service import subject_loras
from services.gateway.webhooks.service import check_job_webhook
from shared.errors import LoomisError, ValidationFailed
from shared.queue import GENERATOR_QUEUE, SCENE_TASK
from shared.specs import (
    MAX_PROMPT_CHARS,
    ControlSpec,
    GenerationMode,
    GenerationSpec,
    JobKind,
    LoraRef,
    MaskSpec,
    RectShape,
)
from shared.specs.generation import LoraUse
from shared.specs.scene import (
    DEFAULT_PROMPT_TEMPLATE,
    SceneAction,
    SceneSpec,
    SceneTask,
    ShotAssets,
    prompt_values,
    render_prompt,
)

# A resolve_generation error's field, as the scene request names it.
_FIELDS = {"strength": "strength.body", "num_images": "num_images"}


def shot_assets(shot: ActionShot) -> ShotAssets:
    return ShotAssets(
        pose_kind=shot.pose_kind, control=shot.control, keypoints=shot.keypoints,
        canvas=(shot.canvas_width, shot.canvas_height), pose_image_key=shot.pose_image_key,
        body_mask_key=shot.body_mask_key, face_mask_key=shot.face_mask_key,
        placement=shot.placement)


def scene_action(action: Action, shot: ActionShot) -> SceneAction:
    return SceneAction(id=action.id, name=action.name, description=action.description,
                       assets=shot_assets(shot), embedding=action.embedding,
                       embedding_hash=action.embedding_hash)


async def _named(errors: list[dict[str, Any]], field: str, lookup: Any) -> Any:
    """The row ``lookup`` finds, or None with the field's error recorded."""
    try:
        return await lookup
    except LoomisError as exc:
        errors.append({"field": field, "message": exc.detail})
        return None


async def resolve_scene(
    *, session: AsyncSession, state: GatewayState, tenant: Tenant, spec: SceneSpec,
) -> tuple[SceneTask, dict[str, Any]]:
    """The queued task (less its job id) and the job's recorded spec."""
    errors: list[dict[str, Any]] = []
    place = await _named(errors, "place", find_place(session, tenant, spec.place))
    image = None
    if place is not None:
        image = await _named(errors, "image", find_place_image(session, place, spec.image))
    actions: list[SceneAction] = []
    if spec.action is not None:
        action = await _named(errors, "action", find_action(session, tenant, spec.action))
        if action is not None:
            shot = next((s for s in action.shots if s.shot == spec.shot.value), None)
            if shot is None:
                have = ", ".join(sorted(s.shot for s in action.shots)) or "none"
                errors.append({"field": "shot", "message": f"action {action.name!r} has no "
                               f"{spec.shot.value} shot (it has: {have})"})
            else:
                actions.append(scene_action(action, shot))
    else:
        for action, shot in await list_actions_with_shot(session, tenant, spec.shot.value):
            actions.append(scene_action(action, shot))
        if not actions:
            errors.append({"field": "action_text", "message": "no action of yours has a "
                           f"{spec.shot.value} shot to pick from"})
    if errors:
        raise ValidationFailed(errors)
    assert place is not None and image is not None

    # The generation parameters, checked as a generation's are: the same 422s for an unknown
    # model, steps over its limit, a scheduler it lacks or a ControlNet it has not.
    controls = sorted({a.assets.control for a in actions}, key=str)
    proto = GenerationSpec(
        mode=GenerationMode.INPAINT, prompt="scene", model=spec.model, steps=spec.steps,
        guidance_scale=spec.guidance_scale, seed=spec.seed, scheduler=spec.scheduler,
        strength=spec.strength.body, num_images=spec.num_images, init_image="scene:background",
        mask=MaskSpec(shapes=[RectShape(type="rect", x=0, y=0, width=8, height=8)]),
        controls=[ControlSpec(type=control, image="scene:pose_control", preprocess=False)
                  for control in controls])
    try:
        resolved = resolve_generation(
            proto, registry=state.registry, default_model=state.settings.generator.default_model,
            input_size=(image.width, image.height))
    except ValidationFailed as exc:
        raise ValidationFailed([{**error, "field": _scene_field(str(error["field"]), spec)}
                                for error in exc.errors]) from exc
    preset = state.registry.get(resolved.model or "")
    assert preset is not None  # resolve_generation checked it
    steps = resolved.steps or 0

    lora: dict[str, Any] | None = None
    gender = "person"
    use, field, triggers = None, "lora.id", []
    if spec.subject.id is not None:  # a subject's LoRA and trigger words, as a LoRA's
        if spec.lora is not None:
            raise ValidationFailed([{"field": "lora", "message": "give `lora` or a subject "
                                     "`id`, not both: the subject brings its own LoRA"}])
        person = await subject_loras(session, tenant, spec.subject.id, field="subject.id")
        use, field, triggers = LoraUse(id=person.lora_id or "", weight=1.0), "subject.id", list(
            person.trigger_words)
        gender = person.class_word
    elif spec.lora is not None:
        use = LoraUse(id=spec.lora.id, weight=spec.lora.weight)
    if spec.lora is not None or spec.subject.id is not None:
        if int(steps * spec.strength.face) < 1:
            # diffusers denoises int(steps * strength) steps; zero fails in the worker
            raise ValidationFailed([{"field": "strength.face", "message": (
                f"strength {spec.strength.face} x {steps} steps leaves the face stage no "
                "denoising step; raise strength.face or steps")}])
    if use is not None:
        try:
            (ref,) = await resolve_loras(session=session, tenant=tenant, preset=preset, uses=[use])
        except ValidationFailed as exc:
            raise ValidationFailed([{**error, "field": field} for error in exc.errors]) from exc
        if not triggers:
            row = await session.get(Lora, ref.id)
            triggers = list((row.info or {}).get("trigger_words") or []) if row is not None else []
        lora = {**ref.model_dump(), "trigger_words": triggers}

    _check_prompts(spec, actions, place=place.description, image=image.description,
                   trigger=" ".join((lora or {}).get("trigger_words") or []), gender=gender)
    task = SceneTask(
        job_id="", tenant_id=tenant.id, spec=spec,
        place={"id": place.id, "name": place.name, "description": place.description},
        image={"id": image.id, "name": image.name, "description": image.description,
               "key": image.key, "width": image.width, "height": image.height},
        actions=actions, model=resolved.model or "", width=resolved.width or 0,
        height=resolved.height or 0, steps=resolved.steps or 0,
        guidance_scale=resolved.guidance_scale or 0.0, seed=resolved.seed or 0,
        scheduler=resolved.scheduler, lora=lora, safety=safety_policy(tenant), gender=gender)
    recorded = {**spec.model_dump(mode="json"), "model": task.model, "width": task.width,
                "height": task.height, "steps": task.steps, "guidance_scale": task.guidance_scale,
                "seed": task.seed, "scheduler": task.scheduler}
    return task, recorded


def _check_prompts(spec: SceneSpec, actions: list[SceneAction], *, place: str, image: str,
                   trigger: str, gender: str) -> None:
    """Every prompt the job could run (each candidate action, each stage) is a prompt a
    generation accepts: not empty, not over the limit. Found here, not as a failed job."""
    template = spec.prompt_template or DEFAULT_PROMPT_TEMPLATE
    for action in actions:
        for stage_trigger in {"", trigger}:
            prompt = render_prompt(template, prompt_values(
                spec.subject, action_name=action.name, action_description=action.description,
                place=place, image=image, trigger=stage_trigger, gender=gender))
            if not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
                field = "prompt_template" if spec.prompt_template else "subject.details"
                raise ValidationFailed([{"field": field, "message": (
                    f"with action {action.name!r} the prompt would be "
                    + ("empty" if not prompt.strip() else
                       f"{len(prompt)} characters (at most {MAX_PROMPT_CHARS})"))}])


def _scene_field(field: str, spec: SceneSpec) -> str:
    if field.startswith("controls."):
        # the chosen action's pose guide needs a ControlNet the model lacks
        return "model"
    if field in ("width", "height"):
        return "image"  # the background does not fit the model's sizes
    return _FIELDS.get(field, field)


async def submit_scene(
    *, session: AsyncSession, state: GatewayState, tenant: Tenant, spec: SceneSpec,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """The job and whether it was created now (False: an idempotent replay)."""
    digest = request_hash(spec)
    if idempotency_key and (
        existing := await find_replay(session=session, tenant=tenant, key=idempotency_key,
                                      digest=digest)
    ):
        return existing, False
    webhook = await check_job_webhook(settings=state.settings, webhook=spec.webhook)
    task, recorded = await resolve_scene(session=session, state=state, tenant=tenant, spec=spec)
    return await create_and_enqueue(
        session=session, state=state, tenant=tenant, kind=JobKind.SCENE, spec=recorded,
        digest=digest, idempotency_key=idempotency_key, task_name=SCENE_TASK,
        queue=GENERATOR_QUEUE, webhook=webhook,
        payload=lambda job_id: task.model_copy(update={"job_id": job_id}).model_dump(mode="json"),
        loras=[LoraRef.model_validate(task.lora)] if task.lora else [],
    )
