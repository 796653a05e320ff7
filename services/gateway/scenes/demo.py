"""Installing the demo catalog for a tenant, so a new user can make a scene at once.

Everything goes through the same service functions as the API (checked images, checked
keypoints), and is found by name before it is made: running it again installs what is missing
and changes nothing that exists, the tenant's own items of the same names included.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.gateway.db.models import Action, Place, PlaceImage, Tenant
from services.gateway.files.stores import GatewayStore
from services.gateway.scenes import service
from services.gateway.scenes.demo_places import DEMO_PLACES
from services.gateway.scenes.demo_poses import DEMO_ACTIONS
from services.gateway.scenes.schemas import ActionIn, PlaceIn


@dataclass(frozen=True)
class DemoItem:
    """One item of the demo, for the operator's report."""

    kind: str  # place, image, action
    name: str
    installed: bool  # False: the tenant had one of that name already


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def install_demo_catalog(*, session: AsyncSession, store: GatewayStore,
                               tenant: Tenant) -> list[DemoItem]:
    """The demo's places (with their images) and actions (every shot from keypoints)."""
    done: list[DemoItem] = []
    for demo_place in DEMO_PLACES:
        place = await session.scalar(select(Place).where(Place.tenant_id == tenant.id,
                                                         Place.name == demo_place.name))
        done.append(DemoItem("place", demo_place.name, place is None))
        if place is None:
            place = await service.create_place(session=session, tenant=tenant, body=PlaceIn(
                name=demo_place.name, description=demo_place.description))
        for demo_image in demo_place.images:
            # An image missing from a place that exists is added: a run cut short finishes.
            found = await session.scalar(select(PlaceImage.id).where(
                PlaceImage.place_id == place.id, PlaceImage.name == demo_image.name))
            done.append(DemoItem("image", f"{demo_place.name}/{demo_image.name}", found is None))
            if found is None:
                await service.create_place_image(
                    session=session, store=store, place=place, name=demo_image.name,
                    description=demo_image.description, data=_png(demo_image.render()))
    for demo_action in DEMO_ACTIONS:
        found = await session.scalar(select(Action.id).where(Action.tenant_id == tenant.id,
                                                             Action.name == demo_action.name))
        done.append(DemoItem("action", demo_action.name, found is None))
        if found is not None:
            continue
        body = ActionIn.model_validate({
            "name": demo_action.name, "description": demo_action.description,
            "shots": {shot: {"pose": {"keypoints": demo.keypoints}, "placement": demo.placement}
                      for shot, demo in demo_action.shots.items()},
        })
        await service.create_action(session=session, store=store, tenant=tenant, body=body)
    return done
