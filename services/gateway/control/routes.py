"""HTTP for ControlNet preprocessing previews."""

from __future__ import annotations

import uuid

from arq.jobs import Job as ArqJob
from fastapi import APIRouter, Response

from services.gateway.control.service import check_openpose_photo
from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.problems import PROBLEM_RESPONSES
from services.gateway.uploads.service import load_image_ref
from shared.errors import ServiceUnavailable, ValidationFailed
from shared.models import ControlType
from shared.poses import parse_openpose_json
from shared.queue import GENERATOR_QUEUE, PREPROCESS_TASK
from shared.specs import PreprocessSpec, PreprocessTask

router = APIRouter(prefix="/v1/control", tags=["control"], responses=PROBLEM_RESPONSES)


@router.post(
    "/preprocess", summary="Preview a control image",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "The control image. Header "
                     "`Loomis-Upload-Ref` names it as an upload, to reuse with `preprocess: "
                     "false`."}, 504: {"description": "No worker answered in time"}},
)
async def preprocess(spec: PreprocessSpec, session: SessionDep, tenant: TenantDep,
                     state: StateDep) -> Response:
    """Run a ControlNet preprocessor (canny, scribble, depth, or openpose from keypoints) on a
    generator worker and return the image it makes: exactly what a generation with the same
    control would condition on."""
    input_key = None
    width, height = spec.width, spec.height
    if spec.image is not None:
        if spec.type == ControlType.OPENPOSE:
            check_openpose_photo(state.settings.generator.openpose_detector, "image")
        stored = await load_image_ref(session=session, store=state.store, tenant_id=tenant.id,
                                      ref=spec.image, field="image")
        input_key = stored.key
        width = width or stored.image.width
        height = height or stored.image.height
    elif spec.keypoints is not None:  # the spec validated it; this reads its canvas size
        _people, canvas_w, canvas_h = parse_openpose_json(spec.keypoints,
                                                          default_size=(512, 512))
        width, height = width or canvas_w, height or canvas_h
    # Previews can wait for a busy worker: don't hold a pooled DB connection meanwhile.
    await session.close()
    assert width is not None and height is not None
    task = PreprocessTask(tenant_id=tenant.id, spec=spec, input_key=input_key, width=width,
                          height=height)
    try:
        job = await state.redis.enqueue_job(PREPROCESS_TASK, task.model_dump(mode="json"),
                                            _job_id=f"preprocess-{uuid.uuid4()}",
                                            _queue_name=GENERATOR_QUEUE)
    except Exception as exc:
        raise ServiceUnavailable("the job queue is unavailable; try again",
                                 code="queue_unavailable") from exc
    assert isinstance(job, ArqJob)
    try:
        result = await job.result(timeout=state.settings.generator.preprocess_timeout_s,
                                  poll_delay=0.05)
    except TimeoutError as exc:
        error = ServiceUnavailable("no generator worker answered in time; try again",
                                   code="preprocess_timeout")
        error.status = 504
        raise error from exc
    if "error" in result:
        failed = ValidationFailed([{"field": result.get("field", "image"),
                                    "message": result["error"]}])
        failed.code = "preprocess_failed"
        raise failed
    data = await state.store.get(result["key"])
    return Response(content=data, media_type="image/png",
                    headers={"Loomis-Upload-Ref": result["ref"]})



