"""Scenes through HTTP with the real stack (tiny-sd15, a real LoRA, the real MiniLM): what a
scene changes, where, and what it refuses.

The pixel assertions are the contract: outside the body and face masks the output is the
background exactly; stage 2 touches only the face mask; the pose guide's ControlNet matters.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from shared.specs import EXAMPLE_POSE
from tests.conftest import RunningStack, wait_terminal
from tests.lora_files import make_lora

pytestmark = pytest.mark.parametrize("stack", ["sqlite"], indirect=True)

WIDTH, HEIGHT = 96, 128
POSE = {"keypoints": {"people": [{"pose_keypoints_2d": EXAMPLE_POSE}]}, "canvas": [512, 512]}


def background() -> Image.Image:
    """A place photo stand-in with structure everywhere, so any repaint shows."""
    x = np.linspace(0, 255, WIDTH, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, HEIGHT, dtype=np.float32)[:, None]
    rgb = np.stack([np.broadcast_to(x, (HEIGHT, WIDTH)), np.broadcast_to(y, (HEIGHT, WIDTH)),
                    (x * y / 255) % 256], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fetch(url: str) -> np.ndarray:  # type: ignore[type-arg]
    return np.asarray(Image.open(io.BytesIO(httpx.get(url).content)))


def by_kind(job: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return sorted((a for a in job["artifacts"] if a["kind"] == kind),
                  key=lambda a: a["index"] or 0)


def catalog(client: httpx.Client, suffix: str = "") -> dict[str, str]:
    place = client.post("/v1/places", json={"name": f"park{suffix}",
                                            "description": "a quiet park"})
    assert place.status_code == 201, place.text
    image = client.post(f"/v1/places/{place.json()['id']}/images",
                        data={"name": "path", "description": "a gravel path under trees"},
                        files={"image": ("bg.png", png(background()), "image/png")})
    assert image.status_code == 201, image.text
    action = client.post("/v1/actions", json={
        "name": f"standing{suffix}", "description": "standing upright, arms at the sides",
        "shots": {"MES": {"pose": POSE}}})
    assert action.status_code == 201, action.text
    return {"place": place.json()["id"], "image": image.json()["id"],
            "action": action.json()["id"]}


def scene(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/scenes", json=body)
    assert response.status_code == 202, response.text
    job = wait_terminal(client, response.json()["id"], timeout=300)
    assert job["status"] == "succeeded", job.get("error")
    return job


@pytest.fixture(scope="module")
def scene_setup(stack: RunningStack, model_cache: Path) -> dict[str, str]:
    with stack.client() as client:
        ids = catalog(client, "-e2e")
        lora = client.post("/v1/loras", data={"base_model": "tiny-sd15", "name": "face-e2e"},
                           files={"file": ("face.safetensors",
                                           make_lora("sd15", cache_dir=model_cache, seed=5),
                                           "application/octet-stream")})
        assert lora.status_code == 201, lora.text
        return {**ids, "lora": lora.json()["id"]}


def base_body(ids: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"place": ids["place"], "image": ids["image"], "action": ids["action"],
            "shot": "medium", "subject": {"age": "adult", "gender": "woman",
                                          "details": "a red coat"},
            "model": "tiny-sd15", "steps": 3, "seed": 21, **extra}


def test_a_scene_with_a_face_lora_changes_only_the_masked_pixels(
        stack: RunningStack, scene_setup: dict[str, str]) -> None:
    with stack.client() as client:
        job = scene(client, base_body(scene_setup, lora={"id": scene_setup["lora"]}))
        again = scene(client, base_body(scene_setup, lora={"id": scene_setup["lora"]}))
    final = fetch(by_kind(job, "image")[0]["url"]).astype(int)
    stage1 = fetch(by_kind(job, "stage_image")[0]["url"]).astype(int)
    body = fetch(by_kind(job, "body_mask")[0]["url"]) > 0
    face = fetch(by_kind(job, "face_mask")[0]["url"]) > 0
    pose = by_kind(job, "pose_control")
    bg = np.asarray(background()).astype(int)
    assert final.shape == bg.shape and body.shape == bg.shape[:2] and pose
    outside = ~(body | face)
    assert outside.any() and np.array_equal(final[outside], bg[outside])
    assert (np.abs(final - bg).sum(axis=2)[body] > 0).any()  # the person went in
    changed = np.abs(final - stage1).sum(axis=2) > 0
    assert changed.any() and not changed[~face].any()  # stage 2 touched the face only
    assert np.array_equal(final, fetch(by_kind(again, "image")[0]["url"]).astype(int))
    result = job["result"]
    assert result["stages"] == ["body", "face"]
    assert "woman" in result["prompt"] and "wearing a red coat" in result["prompt"]
    assert "a gravel path under trees" in result["prompt"]
    assert result["action"]["id"] == scene_setup["action"]
    assert job["spec"]["seed"] == 21 and job["kind"] == "scene"
    # progress spans both stages, each with its own step count
    with stack.client() as client, httpx.stream(
            "GET", f"{stack.url}/v1/jobs/{job['id']}/events", headers=client.headers,
            timeout=30) as response:
        data = [json.loads(line[5:]) for line in response.iter_lines()
                if line.startswith("data:")]
    progress = [e["data"] for e in data if e["type"] == "progress"]
    assert {p["stage"] for p in progress} == {"body", "face"}
    assert all(p["step"] <= p["total_steps"] for p in progress)
    fractions = [p["progress"] for p in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_control_scale_changes_the_body(stack: RunningStack, scene_setup: dict[str, str]) -> None:
    with stack.client() as client:
        held = scene(client, base_body(scene_setup, control_scale=1.0))
        free = scene(client, base_body(scene_setup, control_scale=0.0))
    body = fetch(by_kind(held, "body_mask")[0]["url"]) > 0
    a = fetch(by_kind(held, "image")[0]["url"]).astype(int)
    b = fetch(by_kind(free, "image")[0]["url"]).astype(int)
    assert not np.array_equal(a[body], b[body])
    assert held["result"]["stages"] == ["body"] and not by_kind(held, "stage_image")


def test_an_action_is_picked_from_text_with_its_scores(stack: RunningStack,
                                                       scene_setup: dict[str, str]) -> None:
    actions = {"waving hello": "standing and waving hello with one raised hand",
               "sitting on a bench": "sitting down on a park bench, resting",
               "running in a park": "running along a path between the trees, arms swinging",
               "pointing at a monument": "standing and pointing at a monument with one arm"}
    with stack.client("bob") as client:
        ids = catalog(client, "-text")
        for name, description in actions.items():
            made = client.post("/v1/actions", json={"name": name, "description": description,
                                                    "shots": {"far": {"pose": POSE}}})
            assert made.status_code == 201, made.text
        for text, expected in (("greeting a friend with a raised hand", "waving hello"),
                               ("resting on a seat", "sitting on a bench"),
                               ("jogging", "running in a park")):
            job = scene(client, {**base_body(ids), "action": None, "action_text": text,
                                 "shot": "FUS", "steps": 2})
            result = job["result"]
            assert result["action"]["name"] == expected, result
            scores = result["action_scores"]
            assert [s["name"] for s in scores][0] == expected and len(scores) == 4
            assert scores == sorted(scores, key=lambda s: -s["score"])


def test_bad_scenes_are_refused_naming_the_field_and_make_no_job(
        stack: RunningStack, scene_setup: dict[str, str], model_cache: Path) -> None:
    with stack.client() as client, stack.client("bob") as bob:
        theirs = catalog(bob, "-theirs")
        their_lora = bob.post("/v1/loras", data={"base_model": "tiny-sd15", "name": "bob-face"},
                              files={"file": ("b.safetensors", make_lora(
                                  "sd15", cache_dir=model_cache, seed=6),
                                  "application/octet-stream")}).json()["id"]
        sdxl_lora = client.post("/v1/loras", data={"base_model": "tiny-sdxl", "name": "xl-face"},
                                files={"file": ("x.safetensors", make_lora(
                                    "sdxl", cache_dir=model_cache, seed=6),
                                    "application/octet-stream")}).json()["id"]
        before = len(client.get("/v1/jobs", params={"limit": 100}).json()["items"])
        body = base_body(scene_setup)
        cases: list[tuple[dict[str, Any], str]] = [
            ({**body, "place": "nowhere"}, "place"),
            ({**body, "image": "no-such-image"}, "image"),
            ({**body, "action": "levitating"}, "action"),
            ({**body, "shot": "sideways"}, "shot"),
            ({**body, "shot": "close"}, "shot"),  # the action has only a medium shot
            ({**body, "subject": {"age": "ancient", "gender": "man"}}, "subject.age"),
            ({**body, "action": None, "action_text": "   "}, "action_text"),
            ({**body, "action": None}, "body"),
            ({**body, "place": theirs["place"]}, "place"),
            ({**body, "action": theirs["action"]}, "action"),
            ({**body, "lora": {"id": "no-such-lora"}}, "lora.id"),
            ({**body, "lora": {"id": their_lora}}, "lora.id"),
            ({**body, "lora": {"id": sdxl_lora}}, "lora.id"),  # another family's
            ({**body, "model": "flux-schnell"}, "model"),  # it has no openpose ControlNet
            ({**body, "prompt_template": "a {person}"}, "prompt_template"),
            ({**body, "lora": {"id": scene_setup["lora"]}, "strength": {"face": 0.1}},
             "strength.face"),  # 0.1 x 3 steps: no denoising step left
            ({**body, "strength": {"body": 0.1}}, "strength.body"),
            ({**body, "prompt_template": "{age:>99999999}"}, "prompt_template"),
            ({**body, "prompt_template": "{details}", "subject": {"gender": "man"}},
             "prompt_template"),  # an empty prompt
            ({**body, "prompt_template": "{action}" * 60}, "prompt_template"),  # too long
        ]
        for case, field in cases:
            response = client.post("/v1/scenes", json=case)
            assert response.status_code == 422, (field, response.text)
            problem = response.json()
            assert response.headers["content-type"].startswith("application/problem+json")
            fields = [e["field"] for e in problem.get("errors", [])]
            assert any(f == field or f.startswith(f"{field}.") or f.endswith(f".{field}")
                       for f in fields) or field == "body", (field, problem)
        after = len(client.get("/v1/jobs", params={"limit": 100}).json()["items"])
        assert after == before


def test_match_previews_the_ranking_and_caches_embeddings(stack: RunningStack) -> None:
    with stack.client("bob") as client:
        for name, description in (("wave-m", "standing and waving hello with one raised hand"),
                                  ("sit-m", "sitting down on a park bench, resting")):
            made = client.post("/v1/actions", json={"name": name, "description": description,
                                                    "shots": {"close": {"pose": POSE}}})
            assert made.status_code == 201, made.text
        first = client.post("/v1/actions/match", json={"text": "resting on a seat",
                                                       "shot": "CLS"})
        assert first.status_code == 200, first.text
        scores = first.json()["scores"]
        assert scores[0]["name"] == "sit-m" and {s["name"] for s in scores} == {"wave-m", "sit-m"}
        again = client.post("/v1/actions/match", json={"text": "resting on a seat",
                                                       "shot": "close"}).json()["scores"]
        assert again == scores  # from the cached embeddings: the same figures
        from sqlalchemy import create_engine, text

        engine = create_engine(stack.database_url.replace("+aiosqlite", ""))
        with engine.connect() as conn:
            cached = conn.execute(text("SELECT name, embedding_hash FROM actions "
                                       "WHERE name IN ('wave-m', 'sit-m')")).all()
        engine.dispose()
        assert len(cached) == 2 and all(row.embedding_hash for row in cached)
        for bad, field in (({"text": "  "}, "text"), ({"text": "x", "shot": "aerial"}, "shot")):
            response = client.post("/v1/actions/match", json=bad)
            assert response.status_code == 422, response.text
            assert any(e["field"].endswith(field) for e in response.json()["errors"])


def test_the_demo_catalog_makes_a_scene_in_one_request(stack: RunningStack) -> None:
    """A new user's path: the demo catalog, then one request naming its place, image, action
    and shot; a close-up with a placement reaching past the frame works too."""
    import subprocess
    import sys

    from services.gateway.scenes.demo_places import DEMO_PLACES
    from services.gateway.scenes.demo_poses import DEMO_ACTIONS

    installed = subprocess.run(
        [sys.executable, "-m", "services.cli", "scenes", "demo-catalog", "--tenant", "bob"],
        env=stack.stack.child_env(), capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr
    place = DEMO_PLACES[0]
    with stack.client("bob") as client:
        for action, shot in ((DEMO_ACTIONS[1].name, "far"), (DEMO_ACTIONS[0].name, "close")):
            job = scene(client, {"place": place.name, "image": place.images[0].name,
                                 "action": action, "shot": shot,
                                 "subject": {"age": "old", "gender": "man"},
                                 "model": "tiny-sd15", "steps": 2, "seed": 3})
            body = fetch(by_kind(job, "body_mask")[0]["url"]) > 0
            final = fetch(by_kind(job, "image")[0]["url"])
            assert final.shape[:2] == body.shape and 0 < body.mean() < 0.9
            assert job["result"]["action"]["name"] == action


def _job_keys(stack: RunningStack, job_id: str) -> list[str]:
    return [key for key in stack.s3_keys("outputs/") if f"/{job_id}/" in key]


def test_a_face_stage_failure_leaves_no_artifacts(stack: RunningStack, model_cache: Path,
                                                  scene_setup: dict[str, str]) -> None:
    with stack.client() as client:
        lora = client.post("/v1/loras", data={"base_model": "tiny-sd15", "name": "gone-face"},
                           files={"file": ("gone.safetensors",
                                           make_lora("sd15", cache_dir=model_cache, seed=9),
                                           "application/octet-stream")}).json()["id"]
        # its file vanishes from storage after registration: stage 1 runs, stage 2 cannot
        for key in stack.s3_keys("loras/"):
            if lora in key:
                stack.s3.client().delete_object(Bucket=stack.bucket, Key=key)
        response = client.post("/v1/scenes", json=base_body(scene_setup, lora={"id": lora}))
        assert response.status_code == 202, response.text
        job = wait_terminal(client, response.json()["id"], timeout=300)
    assert job["status"] == "failed", job
    assert _job_keys(stack, job["id"]) == [] and job["artifacts"] == []


def test_a_scene_can_be_canceled_in_its_face_stage(stack: RunningStack,
                                                    scene_setup: dict[str, str]) -> None:
    with stack.client() as client:
        response = client.post("/v1/scenes", json=base_body(
            scene_setup, lora={"id": scene_setup["lora"]}, steps=60, num_images=2))
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        with httpx.stream("GET", f"{stack.url}/v1/jobs/{job_id}/events",
                          headers=client.headers, timeout=120) as events:
            for line in events.iter_lines():
                if line.startswith("data:") and '"stage": "face"' in line.replace('":"', '": "'):
                    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
                    break
        job = wait_terminal(client, job_id, timeout=120)
    assert job["status"] == "canceled", job
    assert _job_keys(stack, job_id) == []


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-flux"])
def test_scenes_on_the_other_tiny_families(stack: RunningStack, scene_setup: dict[str, str],
                                           model: str) -> None:
    """Each family with inpainting and an openpose ControlNet runs a scene; pixels outside the
    body mask stay the background's."""
    with stack.client() as client:
        job = scene(client, base_body(scene_setup, model=model, steps=2))
    final = fetch(by_kind(job, "image")[0]["url"]).astype(int)
    body = fetch(by_kind(job, "body_mask")[0]["url"]) > 0
    bg = np.asarray(background()).astype(int)
    assert np.array_equal(final[~body], bg[~body])
    assert job["result"]["model"]["name"] == model


def test_a_scene_retried_with_its_idempotency_key_is_one_job(
        stack: RunningStack, scene_setup: dict[str, str]) -> None:
    with stack.client() as client:
        body, headers = base_body(scene_setup, seed=99), {"Idempotency-Key": "scene-once"}
        first = client.post("/v1/scenes", json=body, headers=headers)
        again = client.post("/v1/scenes", json=body, headers=headers)
        other = client.post("/v1/scenes", json={**body, "seed": 98}, headers=headers)
        assert first.status_code == again.status_code == 202, first.text
        assert again.json()["id"] == first.json()["id"]
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert other.status_code == 409
        wait_terminal(client, first.json()["id"], timeout=300)


def test_every_scene_option_changes_the_result(stack: RunningStack,
                                               scene_setup: dict[str, str]) -> None:
    """Each generation control of a scene reaches the stage it belongs to: changing it changes
    the pixels (or the prompt) against the same scene without the change."""
    lora = {"id": scene_setup["lora"]}
    base = base_body(scene_setup, lora=lora)

    def final(job: dict[str, Any], index: int = 0) -> np.ndarray:  # type: ignore[type-arg]
        return fetch(by_kind(job, "image")[index]["url"]).astype(int)

    with stack.client() as client:
        reference = scene(client, base)
        variants = {
            "strength.body": {"strength": {"body": 0.5, "face": 0.6}},
            "strength.face": {"strength": {"body": 1.0, "face": 1.0}},
            "lora.weight": {"lora": {**lora, "weight": 0.3}},
            "guidance_scale": {"guidance_scale": 2.0},
            "steps": {"steps": 5},
            "scheduler": {"scheduler": "DDIM"},
            "negative_prompt": {"negative_prompt": "blurry"},
            "seed": {"seed": 22},
            "subject.details": {"subject": {"age": "adult", "gender": "woman",
                                            "details": "a blue hat"}},
        }
        for name, change in variants.items():
            changed = scene(client, {**base, **change})
            assert not np.array_equal(final(changed), final(reference)), name
        templated = scene(client, {**base, "prompt_template": "{gender} {action}, {image}"})
        two = scene(client, {**base, "num_images": 2})
    assert templated["result"]["prompt"] == \
        "woman standing upright, arms at the sides, a gravel path under trees"
    assert not np.array_equal(final(templated), final(reference))
    assert len(by_kind(two, "image")) == 2 and len(by_kind(two, "stage_image")) == 2
    assert two["result"]["seeds"] == [21, 22]  # image i uses seed + i
    assert not np.array_equal(final(two, 0), final(two, 1))
