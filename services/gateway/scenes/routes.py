"""HTTP for the scenes catalog: places, their background images, and actions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from services.gateway.deps import SessionDep, StateDep, TenantDep
from services.gateway.images import MAX_INPUT_BYTES
from services.gateway.multipart import (
    FORM_OVERHEAD_BYTES,
    binary,
    multipart_body,
    parse_fields,
    read_multipart,
    too_large,
)
from services.gateway.problems import PROBLEM_RESPONSES
from services.gateway.scenes import service
from services.gateway.scenes.schemas import (
    ActionIn,
    ActionOut,
    ActionPage,
    ActionPatch,
    PlaceImageFields,
    PlaceImageOut,
    PlaceImagePage,
    PlaceImagePatch,
    PlaceIn,
    PlaceOut,
    PlacePage,
    PlacePatch,
)

places_router = APIRouter(prefix="/v1/places", tags=["places"], responses=PROBLEM_RESPONSES)
actions_router = APIRouter(prefix="/v1/actions", tags=["actions"], responses=PROBLEM_RESPONSES)

Limit = Annotated[int, Query(ge=1, le=100, description="Items per page.")]
Cursor = Annotated[str | None, Query(description="`next_cursor` of the previous page.")]


# --- places ----------------------------------------------------------------------------------


@places_router.post("", response_model=PlaceOut, status_code=201, summary="Create a place")
async def create_place(body: PlaceIn, session: SessionDep, tenant: TenantDep) -> PlaceOut:
    """A point of interest for scenes; add its background pictures with
    `POST /v1/places/{id}/images`. A name already used is a 409."""
    return service.place_out(await service.create_place(session=session, tenant=tenant, body=body))


@places_router.get("", response_model=PlacePage, summary="List places")
async def list_places(session: SessionDep, tenant: TenantDep, limit: Limit = 20,
                      cursor: Cursor = None) -> PlacePage:
    rows, next_cursor = await service.page_places(session=session, tenant=tenant, limit=limit,
                                                  cursor=cursor)
    return PlacePage(items=[service.place_out(row) for row in rows], next_cursor=next_cursor)


@places_router.get("/{place_id}", response_model=PlaceOut, summary="Get a place")
async def get_place(place_id: str, session: SessionDep, tenant: TenantDep) -> PlaceOut:
    return service.place_out(await service.get_place(session=session, tenant=tenant,
                                                     place_id=place_id))


@places_router.patch("/{place_id}", response_model=PlaceOut, summary="Rename or describe a place")
async def patch_place(place_id: str, patch: PlacePatch, session: SessionDep,
                      tenant: TenantDep) -> PlaceOut:
    place = await service.get_place(session=session, tenant=tenant, place_id=place_id)
    return service.place_out(await service.patch_place(session=session, place=place, patch=patch))


@places_router.delete("/{place_id}", status_code=204, summary="Delete a place and its images")
async def delete_place(place_id: str, session: SessionDep, tenant: TenantDep,
                       state: StateDep) -> Response:
    place = await service.get_place(session=session, tenant=tenant, place_id=place_id)
    await service.delete_place(session=session, store=state.store, place=place)
    return Response(status_code=204)


# --- place images ----------------------------------------------------------------------------


@places_router.post(
    "/{place_id}/images", response_model=PlaceImageOut, status_code=201,
    summary="Add a background image to a place",
    openapi_extra=multipart_body({
        "image": binary(f"PNG, JPEG or WebP; at most {MAX_INPUT_BYTES // 1024**2} MiB and 16 "
                        "megapixels."),
        **PlaceImageFields.model_json_schema()["properties"],
    }, required=["image", "name"]),
)
async def create_place_image(place_id: str, request: Request, session: SessionDep,
                             tenant: TenantDep, state: StateDep) -> PlaceImageOut:
    """The picture is checked (a real image, not a decompression bomb), stored as PNG with
    its EXIF orientation applied, and given a thumbnail. Its `description` goes into the
    prompt of scenes set in it."""
    place = await service.get_place(session=session, tenant=tenant, place_id=place_id)
    await session.close()  # hold no pooled connection while the upload arrives
    async with read_multipart(request, max_bytes=MAX_INPUT_BYTES + FORM_OVERHEAD_BYTES,
                              file_field="image") as form:
        fields = parse_fields(PlaceImageFields, form, files=("image",))
        part = form.files_of("image")[0]
        if part.size > MAX_INPUT_BYTES:
            raise too_large("image", f"larger than {MAX_INPUT_BYTES} bytes")
        data = await part.read()
    image = await service.create_place_image(
        session=session, store=state.store, place=place, name=fields.name,
        description=fields.description, data=data)
    return service.place_image_out(image, store=state.store)


@places_router.get("/{place_id}/images", response_model=PlaceImagePage,
                   summary="List a place's images")
async def list_place_images(place_id: str, session: SessionDep, tenant: TenantDep,
                            state: StateDep, limit: Limit = 20,
                            cursor: Cursor = None) -> PlaceImagePage:
    place = await service.get_place(session=session, tenant=tenant, place_id=place_id)
    rows, next_cursor = await service.page_place_images(session=session, place=place,
                                                        limit=limit, cursor=cursor)
    return PlaceImagePage(items=[service.place_image_out(row, store=state.store) for row in rows],
                          next_cursor=next_cursor)


@places_router.get("/{place_id}/images/{image_id}", response_model=PlaceImageOut,
                   summary="Get a place's image")
async def get_place_image(place_id: str, image_id: str, session: SessionDep, tenant: TenantDep,
                          state: StateDep) -> PlaceImageOut:
    place = await service.get_place(session=session, tenant=tenant, place_id=place_id)
    image = await service.get_place_image(session=session, place=place, image_id=image_id)
    return service.place_image_out(image, store=state.store)


@places_router.patch("/{place_id}/images/{image_id}", response_model=PlaceImageOut,
                     summary="Rename or describe a place's image")
async def patch_place_image(place_id: str, image_id: str, patch: PlaceImagePatch,
                            session: SessionDep, tenant: TenantDep,
                            state: StateDep) -> PlaceImageOut:
    place = await service.get_place(session=session, tenant=tenant, place_id=place_id)
    image = await service.get_place_image(session=session, place=place, image_id=image_id)
    image = await service.patch_place_image(session=session, image=image, patch=patch)
    return service.place_image_out(image, store=state.store)


@places_router.delete("/{place_id}/images/{image_id}", status_code=204,
                      summary="Delete a place's image")
async def delete_place_image(place_id: str, image_id: str, session: SessionDep,
                             tenant: TenantDep, state: StateDep) -> Response:
    place = await service.get_place(session=session, tenant=tenant, place_id=place_id)
    image = await service.get_place_image(session=session, place=place, image_id=image_id)
    await service.delete_place_image(session=session, store=state.store, image=image)
    return Response(status_code=204)


# --- actions ---------------------------------------------------------------------------------


@actions_router.post("", response_model=ActionOut, status_code=201, summary="Create an action")
async def create_action(body: ActionIn, session: SessionDep, tenant: TenantDep,
                        state: StateDep) -> ActionOut:
    """An action is posed per shot (`close`, `medium`, `far`; `CLS`, `MES`, `FUS` accepted) by
    OpenPose keypoints or a mannequin image from `POST /v1/uploads`, with optional body and
    face masks (uploads too) of the pose guide's size. Every image is checked before anything
    is stored and copied into the action, so later deleting the upload changes nothing.
    Each bad field is named (`shots.close.face_mask`); a name already used is a 409."""
    action = await service.create_action(session=session, store=state.store, tenant=tenant,
                                         body=body)
    return service.action_out(action, store=state.store)


@actions_router.get("", response_model=ActionPage, summary="List actions")
async def list_actions(session: SessionDep, tenant: TenantDep, state: StateDep,
                       limit: Limit = 20, cursor: Cursor = None) -> ActionPage:
    rows, next_cursor = await service.page_actions(session=session, tenant=tenant, limit=limit,
                                                   cursor=cursor)
    return ActionPage(items=[service.action_out(row, store=state.store) for row in rows],
                      next_cursor=next_cursor)


@actions_router.get("/{action_id}", response_model=ActionOut, summary="Get an action")
async def get_action(action_id: str, session: SessionDep, tenant: TenantDep,
                     state: StateDep) -> ActionOut:
    action = await service.get_action(session=session, tenant=tenant, action_id=action_id)
    return service.action_out(action, store=state.store)


@actions_router.patch("/{action_id}", response_model=ActionOut, summary="Change an action")
async def patch_action(action_id: str, patch: ActionPatch, session: SessionDep,
                       tenant: TenantDep, state: StateDep) -> ActionOut:
    """Fields left out are unchanged. A shot given replaces that shot whole; `null` removes
    it; an action keeps at least one shot."""
    action = await service.get_action(session=session, tenant=tenant, action_id=action_id)
    action = await service.patch_action(session=session, store=state.store, action=action,
                                        patch=patch)
    return service.action_out(action, store=state.store)


@actions_router.delete("/{action_id}", status_code=204,
                       summary="Delete an action and its images")
async def delete_action(action_id: str, session: SessionDep, tenant: TenantDep,
                        state: StateDep) -> Response:
    action = await service.get_action(session=session, tenant=tenant, action_id=action_id)
    await service.delete_action(session=session, store=state.store, action=action)
    return Response(status_code=204)
