"""Captioner and tagger on the tiny models, loaded the way the real ones are, and the tag rules.

The tiny BLIP writes random words and the tiny WD14 has random (calibrated) weights, so these
tests pin down behaviour that holds for any weights: loading, batching, determinism, the
threshold contract, category handling and isolation of bad images.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image, ImageDraw

from services.models.tiny.tagging import BUILDERS, WD14_IMAGE_SIZE, WD14_TAGS, ensure_tagger_model
from services.tagger.models import Captioner, ImageFailed, Tagger, TagResult, wd14_pixels
from services.tagger.text import TagOptions, clean_caption, clean_tags, format_tags, merge_metadata


def _scene(seed: int, size: tuple[int, int] = (96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y = (int(v) for v in rng.integers(0, min(size) - 20, 2))
        draw.ellipse((x, y, x + 30, y + 24), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


def _truncated_png() -> Image.Image:
    """Opens fine (the header is intact) and fails when its pixels are decoded."""
    buffer = io.BytesIO()
    _scene(99).save(buffer, "PNG")
    return Image.open(io.BytesIO(buffer.getvalue()[:120]))


IMAGES = [_scene(seed) for seed in range(6)]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The tiny models are too small for intra-op threads to help, and on a busy machine
    threads waiting for each other make token-by-token generation several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def blip_dir(model_cache: Path) -> Path:
    return ensure_tagger_model("tiny-blip", model_cache)


@pytest.fixture(scope="module")
def wd14_dir(model_cache: Path) -> Path:
    return ensure_tagger_model("tiny-wd14", model_cache)


@pytest.fixture(scope="module")
def captioner(blip_dir: Path) -> Captioner:
    return Captioner(blip_dir)


@pytest.fixture(scope="module")
def tagger(wd14_dir: Path) -> Tagger:
    return Tagger(wd14_dir)


# --- the tiny models have the real models' layout -----------------------------------------


def test_tiny_blip_loads_like_the_real_snapshot(blip_dir: Path) -> None:
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(blip_dir)
    processor = BlipProcessor.from_pretrained(blip_dir)
    assert (blip_dir / "vocab.txt").read_text().startswith("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    # BLIP's decoder starts from the added [DEC] token and stops at [SEP], as the real one does.
    assert processor.tokenizer.bos_token == "[DEC]"
    assert model.config.text_config.bos_token_id == processor.tokenizer.bos_token_id
    assert model.config.text_config.sep_token_id == processor.tokenizer.sep_token_id


def test_tiny_wd14_has_the_smilingwolf_io_contract(wd14_dir: Path) -> None:
    session = onnxruntime.InferenceSession(str(wd14_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (model_input,), (model_output,) = session.get_inputs(), session.get_outputs()
    assert isinstance(model_input.shape[0], str)  # dynamic batch
    assert model_input.shape[1:] == [WD14_IMAGE_SIZE, WD14_IMAGE_SIZE, 3]
    assert model_input.type == "tensor(float)"
    with (wd14_dir / "selected_tags.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["tag_id", "name", "category", "count"]
    assert [r["name"] for r in rows if r["category"] == "9"] == ["general", "sensitive", "questionable",
                                                                  "explicit"]
    assert {r["category"] for r in rows} == {"9", "0", "4"}
    assert model_output.shape[-1] == len(rows) == len(WD14_TAGS)
    probs = session.run(None, {model_input.name: np.full((3, 64, 64, 3), 128.0, np.float32)})[0]
    assert probs.shape == (3, len(rows)) and ((probs >= 0) & (probs <= 1)).all()


def test_ensure_reuses_the_cache_and_leaves_no_staging(model_cache: Path, blip_dir: Path,
                                                       wd14_dir: Path) -> None:
    marker = wd14_dir / "model.onnx"
    before = marker.stat().st_mtime_ns
    assert ensure_tagger_model("tiny-wd14", model_cache) == wd14_dir
    assert marker.stat().st_mtime_ns == before
    assert not [p.name for p in model_cache.iterdir() if p.name.startswith(".tiny-")]
    with pytest.raises(KeyError, match="no builder"):
        ensure_tagger_model("tiny-nonexistent", model_cache)
    assert set(BUILDERS) == {"tiny-blip", "tiny-wd14"}


def test_tiny_builds_are_deterministic(blip_dir: Path, tagger: Tagger, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    again = ensure_tagger_model("tiny-blip", tmp_path)
    first, second = load_file(blip_dir / "model.safetensors"), load_file(again / "model.safetensors")
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)
    rebuilt = Tagger(ensure_tagger_model("tiny-wd14", tmp_path))
    assert rebuilt.tag(IMAGES, general_threshold=0.0) == tagger.tag(IMAGES, general_threshold=0.0)


# --- captioner ------------------------------------------------------------------------------


def test_captions_are_words_deterministic_and_independent_of_batch_size(captioner: Captioner) -> None:
    captions = captioner.caption(IMAGES, batch_size=4, max_length=16)
    assert all(isinstance(c, str) and c.strip() for c in captions)
    assert len(set(captions)) > 1, "captions should follow the image"
    assert captioner.caption(IMAGES, batch_size=1, max_length=16) == captions
    assert captioner.caption(IMAGES, batch_size=4, max_length=16) == captions


def test_sampled_captions_depend_on_seed_not_on_batching(captioner: Captioner) -> None:
    def sample(images: list[Image.Image], *, batch_size: int, seed: int) -> list[str]:
        return captioner.caption(images, batch_size=batch_size, seed=seed, max_length=16, do_sample=True,
                                 top_p=0.9)

    seeded = sample(IMAGES, batch_size=4, seed=7)
    assert sample(IMAGES, batch_size=1, seed=7) == seeded
    assert sample(IMAGES[::-1], batch_size=3, seed=7) == seeded[::-1]
    assert sample(IMAGES, batch_size=4, seed=8) != seeded
    greedy = captioner.caption(IMAGES, max_length=16)
    assert captioner.caption(IMAGES, max_length=16, num_beams=2)[0].strip()
    assert seeded != greedy


def test_a_corrupt_image_costs_only_itself(captioner: Captioner) -> None:
    good = captioner.caption(IMAGES[:3], max_length=12)
    mixed = captioner.caption_each([IMAGES[0], _truncated_png(), IMAGES[1], IMAGES[2]], batch_size=4,
                                   max_length=12)
    assert isinstance(mixed[1], OSError)
    assert [mixed[0], mixed[2], mixed[3]] == good
    with pytest.raises(ImageFailed) as failed:
        captioner.caption([IMAGES[0], _truncated_png()], max_length=12)
    assert failed.value.index == 1


def test_caption_options_are_checked(captioner: Captioner) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        captioner.caption(IMAGES[:1], batch_size=0)
    with pytest.raises(ValueError, match="num_beams"):
        captioner.caption(IMAGES[:1], do_sample=True, num_beams=2)


# --- tagger ---------------------------------------------------------------------------------


def test_preprocessing_pads_white_and_swaps_to_bgr() -> None:
    wide = Image.new("RGB", (128, 64), (255, 0, 0))
    pixels = wd14_pixels(wide, 64)
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.float32
    assert pixels[32, 32].tolist() == [0.0, 0.0, 255.0]  # red, as BGR
    assert pixels[2, 32].tolist() == [255.0, 255.0, 255.0]  # the padding band above
    transparent = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert (wd14_pixels(transparent, 64) == 255.0).all()


def test_thresholds_are_monotonic_and_matter(tagger: Tagger) -> None:
    sweep = [0.05, 0.2, 0.35, 0.5, 0.7, 0.9]
    per_threshold = [tagger.tag(IMAGES, general_threshold=t, character_threshold=t) for t in sweep]
    for lower, higher in zip(per_threshold, per_threshold[1:], strict=False):
        for low, high in zip(lower, higher, strict=True):
            assert {n for n, _ in high.general} <= {n for n, _ in low.general}
            assert {n for n, _ in high.character} <= {n for n, _ in low.character}
    counts = [sum(len(r.general) for r in results) for results in per_threshold]
    assert counts == sorted(counts, reverse=True)
    assert len(set(counts)) > 2, counts
    for results, threshold in zip(per_threshold, sweep, strict=True):
        for result in results:
            assert all(p >= threshold for _, p in result.general + result.character)
            probs = [p for _, p in result.general]
            assert probs == sorted(probs, reverse=True)


def test_batched_and_single_runs_agree(tagger: Tagger) -> None:
    batched = np.stack(tagger.probabilities_each(IMAGES, batch_size=8))  # type: ignore[arg-type]
    single = np.stack(tagger.probabilities_each(IMAGES, batch_size=1))  # type: ignore[arg-type]
    np.testing.assert_allclose(batched, single, atol=1e-6, rtol=0)
    assert batched.std(axis=0).mean() > 0.05, "probabilities should depend on the image"


def test_categories_come_from_the_csv(tagger: Tagger) -> None:
    categories = {name: category for name, category, _ in WD14_TAGS}
    results = tagger.tag(IMAGES, general_threshold=0.0, character_threshold=0.0)
    for result in results:
        assert list(result.rating) == ["general", "sensitive", "questionable", "explicit"]
        assert all(0.0 <= p <= 1.0 for p in result.rating.values())
        assert result.top_rating in result.rating
        assert {categories[n] for n, _ in result.general} == {0}
        assert {categories[n] for n, _ in result.character} == {4}
        assert len(result.general) + len(result.character) == len(WD14_TAGS) - 4


def test_tagger_isolates_a_corrupt_image(tagger: Tagger) -> None:
    results = tagger.tag_each([_truncated_png(), IMAGES[0]], batch_size=2)
    assert isinstance(results[0], OSError) and isinstance(results[1], TagResult)
    assert results[1] == tagger.tag(IMAGES[:1])[0]
    with pytest.raises(ImageFailed, match="image 0"):
        tagger.tag([_truncated_png()])
    with pytest.raises(ValueError, match="general_threshold"):
        tagger.tag(IMAGES[:1], general_threshold=1.5)


# --- tag and caption rules --------------------------------------------------------------------


RESULT = TagResult(
    rating={"general": 0.2, "sensitive": 0.7, "questionable": 0.05, "explicit": 0.01},
    general=[("long_hair", 0.9), ("1girl", 0.8), ("^_^", 0.6), ("smile", 0.5), ("long hair", 0.4)],
    character=[("saber_(fate)", 0.95)],
)


def test_format_tags_orders_filters_and_dedupes() -> None:
    tags = format_tags(RESULT.general, RESULT.character, RESULT.rating)
    assert tags == ["saber (fate)", "long hair", "1girl", "^_^", "smile"]
    assert format_tags(RESULT.general, RESULT.character, character_first=False)[-1] == "saber (fate)"
    assert format_tags(RESULT.general, underscores_to_spaces=False)[:2] == ["long_hair", "1girl"]
    tags = format_tags(RESULT.general, RESULT.character, RESULT.rating, undesired={"long hair", "SMILE"},
                       keep_rating=True, prefix=["shs", "1girl", "shs"], escape=True)
    assert tags == ["shs", "1girl", "sensitive", r"saber \(fate\)", "^_^"]
    assert format_tags(["1girl", "shs"], prefix=["shs", " "]) == ["shs", "1girl"]
    options = TagOptions(undesired=frozenset({"1girl"}), prefix=("shs",))
    assert options.format(RESULT.general, RESULT.character) == ["shs", "saber (fate)", "long hair", "^_^",
                                                                "smile"]


def test_clean_tags_and_captions() -> None:
    tags = clean_tags(["rating:safe", "long_hair, Blue_eyes", "general", " smile ", "long hair", "blue eyes",
                       "o_o", "kitty"], replacements={"kitty": "cat, animal", "smile": ""})
    assert tags == ["long hair", "Blue eyes", "o_o", "cat", "animal"]
    assert clean_tags(["general", "1girl"], strip_rating=False) == ["general", "1girl"]
    assert clean_caption("  a girl ,, with  long hair , rating:safe ,") == "a girl, with long hair"
    assert clean_caption("arafed woman holding explicit sign", replacements=[("arafed ", "")]) \
        == "woman holding explicit sign"
    assert clean_caption("A Cat.", strip_rating=False) == "A Cat."


def test_merge_metadata_writes_kohya_shape() -> None:
    existing = {"img/a.png": {"caption": "old caption"}, "img/b.png": {"tags": "x"}}
    merged = merge_metadata(existing, captions={"img/a.png": "a cat ", "img/c.png": "a dog"},
                            tags={"img/a.png": ["cat", "solo"], "img/d.png": []})
    assert json.dumps(merged, sort_keys=False) == json.dumps({
        "img/a.png": {"caption": "a cat", "tags": "cat, solo"},
        "img/b.png": {"tags": "x"},
        "img/c.png": {"caption": "a dog"},
        "img/d.png": {"tags": ""},
    })
    assert existing == {"img/a.png": {"caption": "old caption"}, "img/b.png": {"tags": "x"}}
    assert merge_metadata({}, captions=None, tags=None) == {}
    with pytest.raises(ValueError, match="comma"):
        merge_metadata({}, tags={"a": ["x, y"]})
    with pytest.raises(TypeError):
        merge_metadata({}, tags={"a": "x, y"})
