"""The built-in ControlNet preprocessors on synthetic images, with no mocks and no downloads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.generator import control
from services.generator.control import (
    COLORS,
    LIMB_BRIGHTNESS,
    NUM_KEYPOINTS,
    PreprocessError,
    PreprocessUnavailable,
    canny,
    controlnet_aux_available,
    openpose_from_photo,
    parse_openpose_json,
    preprocess,
    render_openpose,
    scribble,
    to_openpose_json,
)

REPO = Path(__file__).resolve().parents[1]


def square_image(size: int = 64, lo: int = 16, hi: int = 48) -> tuple[Image.Image, np.ndarray]:
    mask = np.zeros((size, size), dtype=bool)
    mask[lo:hi, lo:hi] = True
    return Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).convert("RGB"), mask


def transition_band(mask: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour on the other side of the boundary: where an edge may lie."""
    band = np.zeros_like(mask)
    band[1:] |= mask[1:] != mask[:-1]
    band[:-1] |= mask[:-1] != mask[1:]
    band[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    band[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    return band


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


# --- canny -----------------------------------------------------------------------------------


def test_canny_edges_lie_exactly_on_the_square_border() -> None:
    image, mask = square_image()
    out = as_array(canny(image))
    assert out.shape == (64, 64, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    assert set(np.unique(out)) <= {0, 255}
    edges = out[..., 0] == 255
    assert not (edges & ~transition_band(mask)).any(), "edge pixels off the border"
    # Every side is traced along (nearly) its whole length, not just a few corner pixels.
    for side in (edges[14:17, 16:48], edges[46:49, 16:48], edges[16:48, 14:17], edges[16:48, 46:49]):
        assert side.any(axis=0 if side.shape[0] == 3 else 1).sum() >= 28


@pytest.mark.parametrize(("low", "high"), [(200, 100), (-1, 100), (10, 256)])
def test_canny_rejects_bad_thresholds(low: int, high: int) -> None:
    image, _ = square_image()
    with pytest.raises(PreprocessError):
        canny(image, low=low, high=high)


def test_canny_through_the_dispatcher_checks_thresholds(tmp_path: Path) -> None:
    image, _ = square_image()
    with pytest.raises(PreprocessError, match="inverted"):
        preprocess("canny", image, params={"low": 150, "high": 50}, model_cache=tmp_path)
    with pytest.raises(PreprocessError, match="integer"):
        preprocess("canny", image, params={"low": True}, model_cache=tmp_path)
    out = preprocess("canny", image, params={"low": 50.0, "high": 150}, model_cache=tmp_path)
    assert as_array(out).any()


def test_canny_flattens_transparency_instead_of_tracing_hidden_pixels() -> None:
    rgba = np.zeros((32, 32, 4), dtype=np.uint8)
    rgba[..., :3] = np.random.default_rng(0).integers(0, 256, (32, 32, 3))  # noise, fully transparent
    out = canny(Image.fromarray(rgba, "RGBA"))
    assert not as_array(out).any()


# --- scribble --------------------------------------------------------------------------------


def test_scribble_gives_thick_binary_strokes_on_the_outline() -> None:
    image, mask = square_image(128, 32, 96)
    pixels = as_array(image).copy()
    pixels[10, 10] = 255  # a lone speck the scribble pass must drop
    out = as_array(scribble(Image.fromarray(pixels)))
    assert out.shape == (128, 128, 3)
    assert set(np.unique(out)) == {0, 255}
    strokes = out[..., 0] == 255
    assert not strokes[0:20, 0:20].any(), "isolated speck survived"
    assert not strokes[40:88, 40:88].any(), "flat interior got strokes"
    assert not strokes[:, :20].any() and not strokes[:, 108:].any()
    # Thicker than a 1-px Canny line: a horizontal cut through the left side crosses >= 2 px.
    assert strokes[64, 20:44].sum() >= 2
    assert strokes[64].sum() >= 4  # both the left and the right side
    assert canny(image).size == (128, 128)


def test_scribble_is_deterministic_and_respects_stroke_width() -> None:
    image, _ = square_image(128, 32, 96)
    thin = as_array(scribble(image, stroke=1))[..., 0] == 255
    thick = as_array(scribble(image, stroke=7))[..., 0] == 255
    assert (as_array(scribble(image, stroke=7)) == as_array(scribble(image, stroke=7))).all()
    assert thick.sum() > 2 * thin.sum()
    with pytest.raises(PreprocessError):
        scribble(image, threshold=0)


# --- openpose rendering ----------------------------------------------------------------------


def person_with(points: dict[int, tuple[float, float, float]]) -> list[tuple[float, float, float] | None]:
    return [points.get(i) for i in range(NUM_KEYPOINTS)]


def test_render_openpose_draws_joints_and_limbs_and_skips_missing_points() -> None:
    # nose, neck, right shoulder present; left shoulder missing; left elbow below the threshold.
    person = person_with({0: (64, 30, 1.0), 1: (64, 60, 0.9), 2: (30, 60, 0.8), 6: (100, 100, 0.01)})
    out = as_array(render_openpose([person], width=128, height=128))
    assert out.shape == (128, 128, 3)
    assert tuple(out[30, 64]) == COLORS[0]  # nose joint
    assert tuple(out[60, 64]) == COLORS[1]  # neck joint
    assert tuple(out[60, 30]) == COLORS[2]  # right shoulder joint
    # Limb 0 (neck -> right shoulder) in the first colour, dimmed.
    assert tuple(out[60, 47]) == tuple(int(c * LIMB_BRIGHTNESS) for c in COLORS[0])
    assert not out[95:106, 95:106].any(), "low-confidence point was drawn"
    assert not out[:, 70:].any(), "something drawn towards the missing left shoulder"
    assert not out[100:].any()


def test_render_openpose_normalized_matches_pixels() -> None:
    pixels = person_with({1: (32, 16, 1.0), 2: (16, 16, 1.0)})
    normal = person_with({1: (0.5, 0.25, 1.0), 2: (0.25, 0.25, 1.0)})
    a = as_array(render_openpose([pixels], width=64, height=64))
    b = as_array(render_openpose([normal], width=64, height=64, normalized=True))
    assert a.any() and (a == b).all()


def test_render_openpose_rejects_wrong_keypoint_count() -> None:
    with pytest.raises(PreprocessError, match="17 keypoints"):
        render_openpose([[(1.0, 1.0, 1.0)] * 17], width=8, height=8)


def test_openpose_json_round_trips() -> None:
    person = person_with({0: (10.0, 12.0, 0.9), 1: (10.0, 30.0, 1.0), 5: (25.5, 30.0, 0.5)})
    data = to_openpose_json([person, person_with({4: (3.0, 4.0, 1.0)})], width=40, height=50)
    assert len(data["people"][0]["pose_keypoints_2d"]) == 54
    people, width, height = parse_openpose_json(data)
    assert (width, height) == (40, 50)
    assert people == [person, person_with({4: (3.0, 4.0, 1.0)})]


def test_openpose_json_normalised_coordinates_are_scaled_to_the_canvas() -> None:
    flat = [0.0] * 54
    flat[3:6] = [0.5, 0.25, 1.0]  # neck
    people, _, _ = parse_openpose_json({"people": [{"pose_keypoints_2d": flat}],
                                        "canvas_width": 200, "canvas_height": 100})
    assert people[0][1] == (100.0, 25.0, 1.0)
    assert people[0][0] is None


def test_openpose_json_accepts_body25() -> None:
    flat = [0.0] * 75
    flat[8 * 3: 8 * 3 + 3] = [50, 50, 1]  # mid-hip: no COCO-18 equivalent, dropped
    flat[9 * 3: 9 * 3 + 3] = [40, 60, 1]  # right hip -> COCO index 8
    people, _, _ = parse_openpose_json({"people": [{"pose_keypoints_2d": flat}]}, default_size=(100, 100))
    assert people[0][8] == (40.0, 60.0, 1.0)
    assert sum(p is not None for p in people[0]) == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"people": [{"pose_keypoints_2d": [1.0] * 53}], "canvas_width": 8, "canvas_height": 8},
         "53 numbers"),
        ({"people": [{"pose_keypoints_2d": [1.0] * 57}], "canvas_width": 8, "canvas_height": 8},
         "57 numbers"),
        ({"people": [], "canvas_width": 8, "canvas_height": 8}, "no people"),
        ({"people": [{"pose_keypoints_2d": [0.0] * 54}], "canvas_width": 8, "canvas_height": 8},
         "no keypoint"),
        ({"people": [{"pose_keypoints_2d": ["a"] * 54}], "canvas_width": 8, "canvas_height": 8}, "number"),
        ({"people": [{}], "canvas_width": 8, "canvas_height": 8}, "pose_keypoints_2d"),
        ({"people": [{"pose_keypoints_2d": [0.5] * 54}]}, "canvas_width"),
        ({"people": [{"pose_keypoints_2d": [0.5] * 54}], "canvas_width": 0, "canvas_height": 8}, "between"),
        ({"canvas_width": 8, "canvas_height": 8}, "people"),
    ],
)
def test_openpose_json_rejects_malformed_input(data: dict[str, object], message: str) -> None:
    with pytest.raises(PreprocessError, match=message):
        parse_openpose_json(data)


def test_preprocess_openpose_from_keypoints_uses_the_image_size_when_the_json_has_none(
        tmp_path: Path) -> None:
    flat = [0.0] * 54
    flat[0:6] = [0.5, 0.2, 1.0, 0.5, 0.4, 1.0]
    keypoints = {"people": [{"pose_keypoints_2d": flat}]}
    out = preprocess("openpose", Image.new("RGB", (80, 60)), params={"keypoints": keypoints},
                     model_cache=tmp_path)
    assert out.size == (80, 60)
    assert tuple(as_array(out)[12, 40]) == COLORS[0]
    with pytest.raises(PreprocessError, match="canvas"):
        preprocess("openpose", None, params={"keypoints": keypoints}, model_cache=tmp_path)
    sized = preprocess("openpose", None, params={"keypoints": keypoints, "width": 40, "height": 40},
                       model_cache=tmp_path)
    assert sized.size == (40, 40)


# --- detector-based openpose -----------------------------------------------------------------


def test_openpose_from_photo_is_unavailable_without_controlnet_aux(tmp_path: Path) -> None:
    assert controlnet_aux_available() is False
    photo = Image.new("RGB", (32, 32), (128, 128, 128))
    with pytest.raises(PreprocessUnavailable) as caught:
        openpose_from_photo(photo, model_dir=tmp_path)
    message = str(caught.value)
    assert "controlnet-aux" in message and "preprocess: false" in message and "keypoints" in message
    with pytest.raises(PreprocessUnavailable):
        preprocess("openpose", photo, params={}, model_cache=tmp_path)


# --- depth -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def depth_cache(model_cache: Path) -> Path:
    from services.models.tiny.diffusion import ensure_tiny_model

    ensure_tiny_model("tiny-dpt", model_cache)
    return model_cache


def test_depth_returns_a_normalised_map_of_the_input_size(depth_cache: Path) -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    out = control.depth(image, model_dir=depth_cache / "tiny-dpt")
    pixels = as_array(out)
    assert out.mode == "RGB" and out.size == (70, 45)
    assert (pixels[..., 0] == pixels[..., 2]).all()
    assert pixels.min() == 0 and pixels.max() == 255
    again = preprocess("depth", image, params={}, model_cache=depth_cache)
    assert (as_array(again) == pixels).all()


def test_depth_refuses_model_names_outside_the_cache(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 8))
    with pytest.raises(PreprocessError, match="model-cache name"):
        preprocess("depth", image, params={"model": "../secrets"}, model_cache=tmp_path)
    with pytest.raises(PreprocessUnavailable, match="not in the model cache"):
        preprocess("depth", image, params={"model": "no-such-model"}, model_cache=tmp_path)


# --- dispatcher ------------------------------------------------------------------------------


def test_preprocess_rejects_unknown_kinds_params_and_missing_images(tmp_path: Path) -> None:
    image, _ = square_image()
    with pytest.raises(PreprocessError, match="unknown preprocessor"):
        preprocess("hed", image, params={}, model_cache=tmp_path)
    with pytest.raises(PreprocessError, match="unknown parameter"):
        preprocess("canny", image, params={"lo": 1}, model_cache=tmp_path)
    with pytest.raises(PreprocessError, match="needs an image"):
        preprocess("scribble", None, params={}, model_cache=tmp_path)


def test_module_imports_without_torch() -> None:
    """The gateway imports this module for its preview endpoint and never installs torch."""
    code = ("import sys, services.generator.control; "
            "heavy = {'torch', 'transformers', 'cv2', 'numpy'} & set(sys.modules); "
            "sys.exit(', '.join(sorted(heavy)) or None)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=60)
    assert result.returncode == 0, result.stderr
