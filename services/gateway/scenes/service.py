"""The scenes catalog: a tenant's places (with background images) and actions (with shots).

Rows are committed only after their objects are stored, and objects are deleted only after the
rows that name them are gone, so no row ever names a missing object. Scenes refer to catalog
items by id or by name (:func:`find_place`, :func:`find_action`); names are unique per tenant
(per place for images) and never shaped like ids, so either finds one item.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
from typing import TypeVar

from PIL import Image
from sqlalchemy import Select, delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.db.models import (
    Action,
    ActionShot,
    Place,
    PlaceImage,
    Tenant,
    new_id,
    utcnow,
)
from services.gateway.files.stores import GatewayStore
from services.gateway.images import decode_image
from services.gateway.pagination import encode_cursor, newest_first
from services.gateway.scenes import shots as shot_assets
from services.gateway.scenes.schemas import (
    ActionIn,
    ActionOut,
    ActionPatch,
    PlaceImageOut,
    PlaceIn,
    PlaceOut,
    PlacePatch,
    ShotIn,
)
from shared.errors import Conflict, NotFound, ValidationFailed
from shared.keys import action_prefix, place_image_key, place_prefix, place_thumb_key
from shared.specs.scene import Shot

THUMB_SIDE = 256
Row = TypeVar("Row", Place, PlaceImage, Action)


# --- pages -----------------------------------------------------------------------------------


async def _page(session: AsyncSession, query: Select[Row], model: type[Row], *,
                limit: int, cursor: str | None) -> tuple[list[Row], str | None]:
    """Newest first; the cursor is the last row's (created_at, id), so pages never shift."""
    rows = list(await session.scalars(
        newest_first(query, model.created_at, model.id, limit=limit, cursor=cursor)))
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None)


# --- names -----------------------------------------------------------------------------------


def _name_taken(what: str, name: str) -> Conflict:
    return Conflict(f"{what} named {name!r} exists already", code="name_taken",
                    errors=[{"field": "name", "message": f"{what} named {name!r} exists "
                             "already; names are unique", "type": "unique"}])


async def _refuse_taken_name(session: AsyncSession, query: Select[Row], what: str,
                             name: str) -> None:
    if await session.scalar(query.limit(1)) is not None:
        raise _name_taken(what, name)


async def _commit(session: AsyncSession, what: str, name: str) -> None:
    """Commit; two requests racing for one name meet the unique constraint: a 409 for the
    second, as if it had come later."""
    try:
        await session.commit()
    except IntegrityError as exc:
        await session.rollback()
        raise _name_taken(what, name) from exc


# --- places ----------------------------------------------------------------------------------


def place_out(place: Place) -> PlaceOut:
    base = f"/v1/places/{place.id}"
    return PlaceOut(id=place.id, name=place.name, description=place.description,
                    created_at=place.created_at, updated_at=place.updated_at,
                    links={"self": base, "images": f"{base}/images"})


def _place_named(tenant: Tenant, name: str) -> Select[Place]:
    return select(Place).where(Place.tenant_id == tenant.id, Place.name == name)


async def create_place(*, session: AsyncSession, tenant: Tenant, body: PlaceIn) -> Place:
    await _refuse_taken_name(session, _place_named(tenant, body.name), "a place", body.name)
    now = utcnow()
    place = Place(id=new_id(), tenant_id=tenant.id, name=body.name,
                  description=body.description, created_at=now, updated_at=now)
    session.add(place)
    await _commit(session, "a place", body.name)
    return place


async def get_place(*, session: AsyncSession, tenant: Tenant, place_id: str) -> Place:
    place = await session.scalar(
        select(Place).where(Place.id == place_id, Place.tenant_id == tenant.id))
    if place is None:
        raise NotFound(f"place {place_id} not found", code="place_not_found")
    return place


async def page_places(*, session: AsyncSession, tenant: Tenant, limit: int,
                      cursor: str | None) -> tuple[list[Place], str | None]:
    return await _page(session, select(Place).where(Place.tenant_id == tenant.id), Place,
                       limit=limit, cursor=cursor)


async def patch_place(*, session: AsyncSession, place: Place, patch: PlacePatch) -> Place:
    if patch.name is not None and patch.name != place.name:
        await _refuse_taken_name(session, select(Place).where(
            Place.tenant_id == place.tenant_id, Place.name == patch.name), "a place", patch.name)
        place.name = patch.name
    if patch.description is not None:
        place.description = patch.description
    place.updated_at = utcnow()
    await _commit(session, "a place", place.name)
    return place


async def delete_place(*, session: AsyncSession, store: GatewayStore, place: Place) -> None:
    """Its images go with it (rows first, then every object under the place's prefix)."""
    await session.execute(delete(PlaceImage).where(PlaceImage.place_id == place.id))
    await session.delete(place)
    await session.commit()
    await store.delete_prefix(place_prefix(place.tenant_id, place.id))


# --- place images ----------------------------------------------------------------------------


def place_image_out(image: PlaceImage, *, store: GatewayStore) -> PlaceImageOut:
    return PlaceImageOut(
        id=image.id, place_id=image.place_id, name=image.name, description=image.description,
        width=image.width, height=image.height, content_type=image.content_type,
        size=image.size, sha256=image.sha256, url=store.presign_get(image.key),
        thumbnail_url=store.presign_get(image.thumb_key), created_at=image.created_at,
        updated_at=image.updated_at)


def _image_named(place_id: str, name: str) -> Select[PlaceImage]:
    return select(PlaceImage).where(PlaceImage.place_id == place_id, PlaceImage.name == name)


def _thumbnail(image: Image.Image) -> bytes:
    small = image.copy()
    small.thumbnail((THUMB_SIDE, THUMB_SIDE))
    buffer = io.BytesIO()
    small.convert("RGB").save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


async def create_place_image(*, session: AsyncSession, store: GatewayStore, place: Place,
                             name: str, description: str, data: bytes) -> PlaceImage:
    """Checked as every input image is (a real image, no decompression bomb) and stored as
    that checked PNG, so a worker never decodes the client's bytes."""
    checked = await asyncio.to_thread(decode_image, data, field="image")
    await _refuse_taken_name(session, _image_named(place.id, name), "an image of this place",
                             name)
    thumb = await asyncio.to_thread(_thumbnail, checked.image)
    image_id = new_id()
    key = place_image_key(place.tenant_id, place.id, image_id)
    thumb_key = place_thumb_key(place.tenant_id, place.id, image_id)
    now = utcnow()
    row = PlaceImage(
        id=image_id, tenant_id=place.tenant_id, place_id=place.id, name=name,
        description=description, key=key, thumb_key=thumb_key, width=checked.size[0],
        height=checked.size[1], content_type="image/png", size=len(checked.png),
        sha256=hashlib.sha256(checked.png).hexdigest(), created_at=now, updated_at=now)
    try:
        await store.put(key, checked.png, content_type="image/png")
        await store.put(thumb_key, thumb, content_type="image/jpeg")
        session.add(row)
        await _commit(session, "an image of this place", name)
    except BaseException:
        await _delete_keys(store, [key, thumb_key])  # nothing half-stored
        raise
    return row


async def get_place_image(*, session: AsyncSession, place: Place, image_id: str) -> PlaceImage:
    image = await session.scalar(select(PlaceImage).where(
        PlaceImage.id == image_id, PlaceImage.place_id == place.id))
    if image is None:
        raise NotFound(f"image {image_id} not found in place {place.id}",
                       code="place_image_not_found")
    return image


async def page_place_images(*, session: AsyncSession, place: Place, limit: int,
                            cursor: str | None) -> tuple[list[PlaceImage], str | None]:
    return await _page(session, select(PlaceImage).where(PlaceImage.place_id == place.id),
                       PlaceImage, limit=limit, cursor=cursor)


async def patch_place_image(*, session: AsyncSession, image: PlaceImage,
                            patch: PlacePatch) -> PlaceImage:
    what = "an image of this place"
    if patch.name is not None and patch.name != image.name:
        await _refuse_taken_name(session, _image_named(image.place_id, patch.name), what,
                                 patch.name)
        image.name = patch.name
    if patch.description is not None:
        image.description = patch.description
    image.updated_at = utcnow()
    await _commit(session, what, image.name)
    return image


async def _delete_keys(store: GatewayStore, keys: list[str]) -> None:
    """Delete exact keys: every catalog key ends in a fresh id and an extension, so it is a
    prefix of itself alone."""
    for key in keys:
        await store.delete_prefix(key)


async def delete_place_image(*, session: AsyncSession, store: GatewayStore,
                             image: PlaceImage) -> None:
    await session.delete(image)
    await session.commit()
    await _delete_keys(store, [image.key, image.thumb_key])


# --- actions ---------------------------------------------------------------------------------


def action_out(action: Action, *, store: GatewayStore) -> ActionOut:
    return ActionOut(
        id=action.id, name=action.name, description=action.description,
        shots={Shot(row.shot): shot_assets.shot_out(row, presign=store.presign_get)
               for row in action.shots},
        created_at=action.created_at, updated_at=action.updated_at)


def _action_named(tenant_id: str, name: str) -> Select[Action]:
    return select(Action).where(Action.tenant_id == tenant_id, Action.name == name)


async def create_action(*, session: AsyncSession, store: GatewayStore, tenant: Tenant,
                        body: ActionIn) -> Action:
    """Every shot is checked first (one 422 naming each bad field); then the images are
    copied under the action's prefix and the rows committed, or the copies removed."""
    await _refuse_taken_name(session, _action_named(tenant.id, body.name), "an action",
                             body.name)
    prepared = await shot_assets.prepare_shots(store=store, tenant_id=tenant.id,
                                               shots=body.shots)
    now = utcnow()
    action = Action(id=new_id(), tenant_id=tenant.id, name=body.name,
                    description=body.description, created_at=now, updated_at=now)
    written: list[str] = []
    try:
        rows = []
        for one in prepared:
            keys = await shot_assets.store_shot(store=store, tenant_id=tenant.id,
                                                action_id=action.id, prepared=one,
                                                written=written)
            row = ActionShot(id=new_id(), action_id=action.id)
            shot_assets.apply_shot(row, one, keys)
            rows.append(row)
        action.shots = rows
        session.add(action)
        await _commit(session, "an action", body.name)
    except BaseException:
        await store.delete_prefix(action_prefix(tenant.id, action.id))
        raise
    return action


async def get_action(*, session: AsyncSession, tenant: Tenant, action_id: str) -> Action:
    action = await session.scalar(
        select(Action).where(Action.id == action_id, Action.tenant_id == tenant.id))
    if action is None:
        raise NotFound(f"action {action_id} not found", code="action_not_found")
    return action


async def page_actions(*, session: AsyncSession, tenant: Tenant, limit: int,
                       cursor: str | None) -> tuple[list[Action], str | None]:
    return await _page(session, select(Action).where(Action.tenant_id == tenant.id), Action,
                       limit=limit, cursor=cursor)


async def patch_action(*, session: AsyncSession, store: GatewayStore, action: Action,
                       patch: ActionPatch) -> Action:
    """Shots given replace those shots (null removes one); the replaced objects are deleted
    once the new ones are committed. A new name or description clears the embedding cache,
    so action matching embeds the new text."""
    changes: dict[Shot, ShotIn | None] = dict(patch.shots or {})
    existing = {Shot(row.shot): row for row in action.shots}
    removed = {shot for shot, spec in changes.items() if spec is None}
    if not (set(existing) - removed) | (set(changes) - removed):
        raise ValidationFailed([{"field": "shots", "message": "an action keeps at least one "
                                 "shot; this would remove the last"}])
    if patch.name is not None and patch.name != action.name:
        await _refuse_taken_name(session, _action_named(action.tenant_id, patch.name),
                                 "an action", patch.name)
    prepared = await shot_assets.prepare_shots(
        store=store, tenant_id=action.tenant_id,
        shots={s: spec for s, spec in changes.items() if spec is not None})
    text_changed = ((patch.name is not None and patch.name != action.name)
                    or (patch.description is not None and patch.description != action.description))
    written: list[str] = []
    replaced: list[str] = []
    try:
        for one in prepared:
            keys = await shot_assets.store_shot(store=store, tenant_id=action.tenant_id,
                                                action_id=action.id, prepared=one,
                                                written=written)
            row = existing.get(one.shot)
            if row is None:  # a new shot
                row = ActionShot(id=new_id(), action_id=action.id)
                action.shots.append(row)
            else:  # replaced in place: the (action, shot) pair stays unique throughout
                replaced += shot_assets.shot_keys(row)
            shot_assets.apply_shot(row, one, keys)
        for shot, spec in changes.items():
            if spec is None and shot in existing:
                replaced += shot_assets.shot_keys(existing[shot])
                action.shots.remove(existing[shot])
        if patch.name is not None:
            action.name = patch.name
        if patch.description is not None:
            action.description = patch.description
        if text_changed:
            action.embedding = None
            action.embedding_hash = None
        action.updated_at = utcnow()
        await _commit(session, "an action", action.name)
    except BaseException:
        await session.rollback()
        await _delete_keys(store, written)
        raise
    await _delete_keys(store, replaced)
    return action


async def delete_action(*, session: AsyncSession, store: GatewayStore, action: Action) -> None:
    """Its shots go with it; then every object under the action's prefix."""
    await session.delete(action)
    await session.commit()
    await store.delete_prefix(action_prefix(action.tenant_id, action.id))


# --- what a scene submission uses ------------------------------------------------------------
# Positional, as the submission calls them; each raises NotFound (naming no field: the caller
# knows which of its fields it resolved and answers a 422 naming it).


async def find_place(session: AsyncSession, tenant: Tenant, ref: str) -> Place:
    """The tenant's place with this id, else with this name."""
    for column in (Place.id, Place.name):
        place = await session.scalar(select(Place).where(Place.tenant_id == tenant.id,
                                                         column == ref))
        if place is not None:
            return place
    raise NotFound(f"no place {ref!r}", code="place_not_found")


async def find_place_image(session: AsyncSession, place: Place, ref: str) -> PlaceImage:
    """The place's image with this id, else with this name."""
    for column in (PlaceImage.id, PlaceImage.name):
        image = await session.scalar(select(PlaceImage).where(PlaceImage.place_id == place.id,
                                                              column == ref))
        if image is not None:
            return image
    raise NotFound(f"no image {ref!r} in place {place.name!r}", code="place_image_not_found")


async def find_action(session: AsyncSession, tenant: Tenant, ref: str) -> Action:
    """The tenant's action with this id, else with this name (its shots loaded)."""
    for column in (Action.id, Action.name):
        action = await session.scalar(select(Action).where(Action.tenant_id == tenant.id,
                                                           column == ref))
        if action is not None:
            return action
    raise NotFound(f"no action {ref!r}", code="action_not_found")


async def list_actions_with_shot(session: AsyncSession, tenant: Tenant,
                                 shot: Shot | str) -> list[tuple[Action, ActionShot]]:
    """The candidates for picking an action from text: every action of the tenant's that can
    be shot this way, with that shot, by name."""
    shot = Shot(shot)
    rows = await session.execute(
        select(Action, ActionShot).join(ActionShot, ActionShot.action_id == Action.id)
        .where(Action.tenant_id == tenant.id, ActionShot.shot == shot.value)
        .order_by(Action.name))
    return [(action, action_shot) for action, action_shot in rows.tuples()]
