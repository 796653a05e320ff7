"""The scenes catalog through HTTP on the real stack: places, their images, actions.

Each test has a tenant of its own, so listings hold exactly what the test made.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from shared.specs.generation import EXAMPLE_POSE
from tests.conftest import RunningStack, create_key

KEYPOINTS = {"people": [{"pose_keypoints_2d": EXAMPLE_POSE}]}  # 0..1 fractions, no canvas


def png(size: tuple[int, int], *, mode: str = "RGB", box: tuple[int, int, int, int] | None = None,
        color: Any = (90, 140, 200)) -> bytes:
    """A plain image, or with ``box`` a black mask that is white inside the box."""
    image = Image.new(mode, size, 0 if box else color)
    if box:
        image.paste(255 if mode == "L" else (255, 255, 255), box)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def upload(client: httpx.Client, data: bytes) -> str:
    response = client.post("/v1/uploads", files={"file": ("x.png", data, "image/png")})
    assert response.status_code == 201, response.text
    return str(response.json()["ref"])


def mask(client: httpx.Client, size: tuple[int, int] = (512, 512),
         box: tuple[int, int, int, int] = (150, 40, 360, 500)) -> str:
    return upload(client, png(size, mode="L", box=box))


def without_urls(action: dict[str, Any]) -> dict[str, Any]:
    """An action as returned, less its presigned URLs (signed anew at every read)."""
    return {**action, "shots": {shot: {k: v for k, v in value.items() if not k.endswith("_url")}
                                for shot, value in action["shots"].items()}}


def fields_of(response: httpx.Response) -> list[str]:
    assert response.headers["content-type"].startswith("application/problem+json"), response.text
    return [error["field"] for error in response.json().get("errors") or []]


@pytest.fixture
def tenant(stack: RunningStack) -> Iterator[str]:
    name = f"scenes-{uuid.uuid4().hex[:8]}"
    stack.keys[name] = create_key(stack.database_url, name)
    yield name


def keypoint_shot(**extra: Any) -> dict[str, Any]:
    return {"pose": {"keypoints": KEYPOINTS, "canvas": [512, 512]}, **extra}


def _db(stack: RunningStack, work: Any) -> Any:
    """Run ``work(session)`` on the stack's database, in this process."""
    from services.gateway.db.session import make_engine, make_sessionmaker

    async def run() -> Any:
        engine = make_engine(stack.database_url)
        try:
            async with make_sessionmaker(engine)() as session:
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _tenant_row(session: Any, name: str) -> Any:
    from sqlalchemy import select

    from services.gateway.db.models import Tenant

    return session.scalar(select(Tenant).where(Tenant.name == name))


def test_places_crud_pagination_names_and_tenancy(stack: RunningStack, tenant: str) -> None:
    with stack.client(tenant) as client, stack.client("bob") as bob:
        made = []
        for name in ("harbour", "old town", "forest"):
            response = client.post("/v1/places", json={"name": name,
                                                       "description": f"the {name}"})
            assert response.status_code == 201, response.text
            made.append(response.json())
        assert made[0]["links"]["images"] == f"/v1/places/{made[0]['id']}/images"

        first = client.get("/v1/places", params={"limit": 2}).json()
        assert [p["name"] for p in first["items"]] == ["forest", "old town"]  # newest first
        second = client.get("/v1/places", params={"limit": 2, "cursor": first["next_cursor"]})
        assert [p["name"] for p in second.json()["items"]] == ["harbour"]
        assert second.json()["next_cursor"] is None
        bad_cursor = client.get("/v1/places", params={"cursor": "not-a-cursor"})
        assert bad_cursor.status_code == 400 and bad_cursor.json()["code"] == "invalid_cursor"

        taken = client.post("/v1/places", json={"name": "harbour"})
        assert taken.status_code == 409 and fields_of(taken) == ["name"]
        assert taken.json()["code"] == "name_taken"
        renamed = client.patch(f"/v1/places/{made[0]['id']}", json={"name": "forest"})
        assert renamed.status_code == 409 and fields_of(renamed) == ["name"]
        id_like = client.post("/v1/places", json={"name": str(uuid.uuid4())})
        assert id_like.status_code == 422 and fields_of(id_like) == ["name"]
        assert client.patch(f"/v1/places/{made[0]['id']}", json={"name": None}).status_code == 422

        patched = client.patch(f"/v1/places/{made[0]['id']}",
                               json={"name": "port", "description": "a busy port"}).json()
        assert (patched["name"], patched["description"]) == ("port", "a busy port")
        assert patched["updated_at"] > made[0]["updated_at"]
        assert client.get(f"/v1/places/{made[0]['id']}").json()["name"] == "port"

        # Another tenant's place is not there for bob, and bob's names are his own.
        place_id = made[0]["id"]
        assert bob.get(f"/v1/places/{place_id}").status_code == 404
        assert bob.patch(f"/v1/places/{place_id}", json={"name": "x"}).status_code == 404
        assert bob.delete(f"/v1/places/{place_id}").status_code == 404
        assert bob.get(f"/v1/places/{place_id}/images").status_code == 404

        assert client.delete(f"/v1/places/{place_id}").status_code == 204
        assert client.get(f"/v1/places/{place_id}").status_code == 404
        assert len(client.get("/v1/places").json()["items"]) == 2


def test_place_images_are_checked_stored_with_thumbnails_and_deleted(
    stack: RunningStack, tenant: str,
) -> None:
    with stack.client(tenant) as client, stack.client("bob") as bob:
        place = client.post("/v1/places", json={"name": "square"}).json()
        base = f"/v1/places/{place['id']}/images"
        images = []
        for index, size in enumerate([(640, 480), (480, 640), (300, 200)]):
            response = client.post(base, data={"name": f"view {index}",
                                               "description": f"view number {index}"},
                                   files={"image": ("v.png", png(size), "image/png")})
            assert response.status_code == 201, response.text
            images.append(response.json())
        first = images[0]
        assert (first["width"], first["height"], first["content_type"]) == (640, 480, "image/png")
        with Image.open(io.BytesIO(httpx.get(first["url"]).content)) as stored:
            assert stored.size == (640, 480)
        with Image.open(io.BytesIO(httpx.get(first["thumbnail_url"]).content)) as thumb:
            assert thumb.format == "JPEG" and max(thumb.size) == 256

        page = client.get(base, params={"limit": 2}).json()
        assert [i["name"] for i in page["items"]] == ["view 2", "view 1"]
        rest = client.get(base, params={"limit": 2, "cursor": page["next_cursor"]}).json()
        assert [i["name"] for i in rest["items"]] == ["view 0"] and rest["next_cursor"] is None

        not_image = client.post(base, data={"name": "text"},
                                files={"image": ("a.png", b"just some text", "image/png")})
        assert not_image.status_code == 422 and fields_of(not_image) == ["image"]
        nameless = client.post(base, files={"image": ("a.png", png((64, 64)), "image/png")})
        assert nameless.status_code == 422 and fields_of(nameless) == ["name"]
        taken = client.post(base, data={"name": "view 0"},
                            files={"image": ("a.png", png((64, 64)), "image/png")})
        assert taken.status_code == 409 and fields_of(taken) == ["name"]
        assert len(client.get(base).json()["items"]) == 3

        patched = client.patch(f"{base}/{first['id']}", json={"description": "harbour view"})
        assert patched.json()["description"] == "harbour view"
        assert client.patch(f"{base}/{first['id']}", json={"name": "view 1"}).status_code == 409
        assert bob.get(f"{base}/{first['id']}").status_code == 404
        assert bob.delete(f"{base}/{first['id']}").status_code == 404

        keys = [k for k in stack.s3_keys("places/") if f"/{place['id']}/" in k]
        assert len(keys) == 6  # an image and a thumbnail each
        assert client.delete(f"{base}/{first['id']}").status_code == 204
        assert client.get(f"{base}/{first['id']}").status_code == 404
        left = [k for k in stack.s3_keys("places/") if f"/{place['id']}/" in k]
        assert len(left) == 4 and not any(first["id"] in k for k in left)

        assert client.delete(f"/v1/places/{place['id']}").status_code == 204
        assert [k for k in stack.s3_keys("places/") if f"/{place['id']}/" in k] == []


def test_actions_take_aliases_keypoints_images_masks_and_placement(
    stack: RunningStack, tenant: str,
) -> None:
    with stack.client(tenant) as client:
        mannequin = upload(client, png((384, 576)))
        body, face = mask(client), mask(client, box=(220, 40, 290, 110))
        tall_body = mask(client, (384, 576), box=(100, 50, 280, 560))
        own_canvas = {**KEYPOINTS, "canvas_width": 512, "canvas_height": 512}
        response = client.post("/v1/actions", json={
            "name": "waving", "description": "waving hello",
            "shots": {
                "CLS": keypoint_shot(body_mask=body, face_mask=face),
                "MES": {"pose": {"keypoints": own_canvas}},
                "FUS": {"pose": {"image": mannequin, "control": "depth"}, "body_mask": tall_body,
                        "placement": {"x": 0.5, "y": 0.9, "height": 0.3}},
            }})
        assert response.status_code == 201, response.text
        action = response.json()
        shots = action["shots"]
        assert set(shots) == {"close", "medium", "far"}
        close = shots["close"]
        assert (close["pose_kind"], close["control"], close["canvas"]) == ("keypoints",
                                                                          "openpose", [512, 512])
        stored = close["keypoints"]["people"][0]["pose_keypoints_2d"]
        assert stored[:3] == pytest.approx([0.5 * 512, 0.16 * 512, 1])  # kept as pixels
        assert close["keypoints"]["canvas_width"] == 512 and close["pose_image_url"] is None
        with Image.open(io.BytesIO(httpx.get(close["face_mask_url"]).content)) as face_png:
            assert face_png.mode == "L" and face_png.size == (512, 512)
        assert shots["medium"]["body_mask_url"] is None and shots["medium"]["canvas"] == [512, 512]
        far = shots["far"]
        assert (far["pose_kind"], far["control"], far["canvas"]) == ("image", "depth", [384, 576])
        assert far["placement"] == {"x": 0.5, "y": 0.9, "height": 0.3}
        assert httpx.get(far["pose_image_url"]).status_code == 200
        assert without_urls(client.get(f"/v1/actions/{action['id']}").json()) == \
            without_urls(action)

        # The images were copied: the action's objects are its own, not the uploads.
        owned = [k for k in stack.s3_keys("actions/") if f"/{action['id']}/" in k]
        assert len(owned) == 4 and not any("uploads" in k for k in owned)

        for name in ("standing", "sitting"):
            assert client.post("/v1/actions", json={
                "name": name, "shots": {"medium": keypoint_shot()}}).status_code == 201
        page = client.get("/v1/actions", params={"limit": 2}).json()
        assert [a["name"] for a in page["items"]] == ["sitting", "standing"]
        rest = client.get("/v1/actions", params={"cursor": page["next_cursor"]}).json()
        assert [a["name"] for a in rest["items"]] == ["waving"] and rest["next_cursor"] is None


def test_bad_actions_name_the_field_and_create_nothing(stack: RunningStack, tenant: str) -> None:
    with stack.client(tenant) as client, stack.client("bob") as bob:
        small_face = mask(client, (256, 256), box=(100, 10, 150, 60))
        body = mask(client)
        # Uploads are content-addressed per tenant: bob's own picture, which this tenant lacks.
        foreign = mask(bob, box=(11, 12, 413, 414))
        empty = upload(client, png((512, 512), mode="L", color=0))

        def refused(shots: dict[str, Any], status: int = 422) -> list[str]:
            response = client.post("/v1/actions", json={"name": "bad", "shots": shots})
            assert response.status_code == status, response.text
            return fields_of(response)

        assert refused({"close": keypoint_shot(body_mask=body, face_mask=small_face)}) == [
            "shots.close.face_mask"]
        assert refused({"CLS": keypoint_shot(face_mask=small_face),
                        "far": keypoint_shot(body_mask=foreign)}) == [
            "shots.close.face_mask", "shots.far.body_mask"]
        assert refused({"medium": {"pose": {"image": upload(client, png((300, 400))),
                                            "control": "canny"}, "body_mask": body}}) == [
            "shots.medium.body_mask"]
        assert refused({"close": keypoint_shot(body_mask=empty)}) == ["shots.close.body_mask"]
        assert refused({"close": {"pose": {"image": foreign, "control": "depth"}}}) == [
            "shots.close.pose.image"]
        assert refused({"close": {"pose": {"keypoints": KEYPOINTS}}}) == ["shots.close.pose.canvas"]
        assert refused({"close": {"pose": {"image": body}}}) == ["shots.close.pose.control"]
        assert refused({"close": {"pose": {"keypoints": {"people": []}, "canvas": [64, 64]}}}) == [
            "shots.close.pose.keypoints"]
        assert refused({"close": {"pose": {"keypoints": {**KEYPOINTS, "canvas_width": 512,
                                                         "canvas_height": 512},
                                           "canvas": [256, 256]}}}) == ["shots.close.pose.canvas"]
        assert refused({"close": keypoint_shot(body_mask="upload:nope")}) == [
            "shots.close.body_mask"]
        assert refused({"close": keypoint_shot(placement={"x": 0.5, "y": 0.9, "height": 0})}) \
            == ["shots.close.placement.height"]
        assert refused({"close": keypoint_shot(placement={"x": 0.5, "y": 99, "height": 1})}) \
            == ["shots.close.placement.y"]
        assert refused({"wide": keypoint_shot()}) == ["shots.wide.[key]"]
        assert refused({}) == ["shots"]
        assert refused({"close": keypoint_shot(), "CLS": keypoint_shot()}) == ["shots"]

        assert client.get("/v1/actions").json()["items"] == []
        tenant_id = _db(stack, lambda s: _tenant_row(s, tenant)).id
        assert stack.s3_keys(f"actions/{tenant_id}/") == []

        made = client.post("/v1/actions", json={"name": "ok", "shots": {"far": keypoint_shot()}})
        assert made.status_code == 201
        again = client.post("/v1/actions", json={"name": "ok", "shots": {"far": keypoint_shot()}})
        assert again.status_code == 409 and fields_of(again) == ["name"]
        action_id = made.json()["id"]
        assert bob.get(f"/v1/actions/{action_id}").status_code == 404
        assert bob.patch(f"/v1/actions/{action_id}", json={"name": "mine"}).status_code == 404
        assert bob.delete(f"/v1/actions/{action_id}").status_code == 404
        assert client.get(f"/v1/actions/{action_id}").status_code == 200


def _embedding(stack: RunningStack, action_id: str, value: list[float] | None = None) -> Any:
    """Set the embedding cache (as the scene job would), or read it back."""
    from services.gateway.db.models import Action

    async def work(session: Any) -> Any:
        action = await session.get(Action, action_id)
        if value is not None:
            action.embedding, action.embedding_hash = value, "a" * 64
            await session.commit()
        return action.embedding, action.embedding_hash

    return _db(stack, work)


def test_patch_replaces_shots_clears_the_embedding_and_delete_removes_objects(
    stack: RunningStack, tenant: str,
) -> None:
    with stack.client(tenant) as client:
        body = mask(client)
        action = client.post("/v1/actions", json={"name": "sitting", "description": "sits", "shots": {
            "close": keypoint_shot(body_mask=body), "medium": keypoint_shot(body_mask=body)}}).json()
        url = f"/v1/actions/{action['id']}"
        before = [k for k in stack.s3_keys("actions/") if f"/{action['id']}/" in k]
        assert len(before) == 2

        _embedding(stack, action["id"], [0.1, 0.2])
        changed = client.patch(url, json={"shots": {"MES": None, "far": keypoint_shot(
            placement={"x": 0.3, "y": 0.95, "height": 0.4})}})
        assert changed.status_code == 200, changed.text
        assert set(changed.json()["shots"]) == {"close", "far"}
        assert _embedding(stack, action["id"]) == ([0.1, 0.2], "a" * 64)  # text unchanged
        after = [k for k in stack.s3_keys("actions/") if f"/{action['id']}/" in k]
        assert len(after) == 1 and after[0] in before  # the medium shot's mask is gone

        replaced = client.patch(url, json={"shots": {"close": keypoint_shot(face_mask=mask(
            client, box=(230, 40, 280, 100)))}}).json()
        assert replaced["shots"]["close"]["body_mask_url"] is None
        now = [k for k in stack.s3_keys("actions/") if f"/{action['id']}/" in k]
        assert len(now) == 1 and now[0] not in before and "face_mask" in now[0]

        assert fields_of(client.patch(url, json={"shots": {"close": None, "far": None}})) == [
            "shots"]
        assert client.patch(url, json={"name": None}).status_code == 422
        assert client.patch(url, json={"name": "sitting"}).status_code == 200
        assert _embedding(stack, action["id"]) == ([0.1, 0.2], "a" * 64)  # the same name
        described = client.patch(url, json={"description": "sitting on a bench"})
        assert described.json()["description"] == "sitting on a bench"
        assert _embedding(stack, action["id"]) == (None, None)
        _embedding(stack, action["id"], [0.3])
        client.patch(url, json={"name": "seated"})
        assert _embedding(stack, action["id"]) == (None, None)

        assert client.delete(url).status_code == 204
        assert client.get(url).status_code == 404
        assert [k for k in stack.s3_keys("actions/") if f"/{action['id']}/" in k] == []


def test_scene_lookups_take_an_id_or_a_name(stack: RunningStack, tenant: str) -> None:
    """What POST /v1/scenes resolves its `place`, `image` and `action` with."""
    from services.gateway.scenes import service
    from shared.errors import NotFound
    from shared.specs.scene import Shot

    with stack.client(tenant) as client:
        place = client.post("/v1/places", json={"name": "park"}).json()
        image = client.post(f"/v1/places/{place['id']}/images", data={"name": "summer"},
                            files={"image": ("p.png", png((96, 64)), "image/png")}).json()
        waving = client.post("/v1/actions", json={"name": "waving", "shots": {
            "close": keypoint_shot(), "far": keypoint_shot()}}).json()
        client.post("/v1/actions", json={"name": "pointing", "shots": {"close": keypoint_shot()}})

    async def work(session: Any) -> None:
        owner = await _tenant_row(session, tenant)
        for ref in (place["id"], "park"):
            found = await service.find_place(session, owner, ref)
            assert found.id == place["id"]
            for image_ref in (image["id"], "summer"):
                assert (await service.find_place_image(session, found, image_ref)).id == image["id"]
        for ref in (waving["id"], "waving"):
            action = await service.find_action(session, owner, ref)
            assert action.id == waving["id"] and {s.shot for s in action.shots} == {"close", "far"}
        bob = await _tenant_row(session, "bob")
        for missing in (service.find_place(session, bob, "park"),
                        service.find_place_image(session, found, "winter"),
                        service.find_action(session, owner, "nope"),
                        service.find_action(session, bob, waving["id"])):
            with pytest.raises(NotFound):
                await missing
        far = await service.list_actions_with_shot(session, owner, Shot.FAR)
        assert [(a.name, s.shot) for a, s in far] == [("waving", "far")]
        close = await service.list_actions_with_shot(session, owner, "close")
        assert [(a.name, s.shot) for a, s in close] == [("pointing", "close"), ("waving", "close")]
        assert await service.list_actions_with_shot(session, bob, "close") == []

    _db(stack, work)


def test_demo_catalog_installs_once_and_twice_changes_nothing(
    stack: RunningStack, tenant: str,
) -> None:
    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", "scenes", "demo-catalog", "--tenant", tenant],
            env=stack.stack.child_env(), capture_output=True, text=True,
            timeout=300)

    with stack.client(tenant) as client:
        # An action the tenant already has by a demo name is left as it is.
        mine = client.post("/v1/actions", json={"name": "waving", "description": "my own",
                                                "shots": {"far": keypoint_shot()}}).json()
        first = run()
        assert first.returncode == 0, first.stderr
        assert "exists     action  waving" in first.stdout, first.stdout
        places = client.get("/v1/places", params={"limit": 100}).json()["items"]
        actions = client.get("/v1/actions", params={"limit": 100}).json()["items"]
        assert len(places) >= 3 and len(actions) >= 5
        assert all(len(a["shots"]) == 3 for a in actions if a["name"] != "waving")
        assert without_urls(client.get(f"/v1/actions/{mine['id']}").json()) == without_urls(mine)
        for place in places:
            images = client.get(f"/v1/places/{place['id']}/images").json()["items"]
            assert images and all(i["width"] > 0 for i in images)
        keys = stack.s3_keys("places/") + stack.s3_keys("actions/")

        second = run()
        assert second.returncode == 0, second.stderr
        assert second.stdout.splitlines()[-1].startswith("0 installed"), second.stdout
        assert client.get("/v1/places", params={"limit": 100}).json()["items"] == places
        again = client.get("/v1/actions", params={"limit": 100}).json()["items"]
        assert [without_urls(a) for a in again] == [without_urls(a) for a in actions]
        assert stack.s3_keys("places/") + stack.s3_keys("actions/") == keys
    from services.gateway.scenes.demo_poses import DEMO_ACTIONS

    by_name = {a["name"]: a for a in actions}
    for demo in DEMO_ACTIONS:
        if demo.name == "waving":
            continue
        for shot, framed in demo.shots.items():  # a close-up's figure reaches past the frame
            assert by_name[demo.name]["shots"][shot]["placement"] == framed.placement

    unknown = subprocess.run(
        [sys.executable, "-m", "services.cli", "scenes", "demo-catalog", "--tenant", "nobody-x"],
        env=stack.stack.child_env(), capture_output=True, text=True,
        timeout=300)
    assert unknown.returncode == 1 and "no tenant 'nobody-x'" in unknown.stderr
