"""A dataset config's per-dataset and per-subset options as the trainer applies them.

The gateway turns a kohya ``dataset_config`` TOML into per-image batch size, resolution,
bucket and subset options; these tests show each one changing what the trainer does (steps,
``ss_*`` metadata, the caption text a step trains on), on the tiny SD1.5 model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from services.trainer.data import crop as _crop
from services.trainer.data import to_tensor as _to_tensor
from services.trainer.train import LoraTrainer, SubsetOptions, TrainConfig
from tests.test_trainer_loop import _config, _examples, model_dir, one_torch_thread  # noqa: F401


def _metadata(lora: bytes) -> dict[str, str]:
    size = int.from_bytes(lora[:8], "little")
    header: dict[str, str] = json.loads(lora[8:8 + size])["__metadata__"]
    return header


def test_a_datasets_batch_size_and_resolution_change_steps_and_metadata(
        model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    cfg = _config(batch_size=2, max_train_epochs=1)
    plain = LoraTrainer(model_dir=model_dir, cfg=cfg, device="cpu").train(
        _examples(), work_dir=tmp_path / "plain")
    examples = _examples()
    for example in examples:  # what the gateway sends for `resolution = [128, 64]`, `batch_size = 4`
        example.batch_size, example.resolution, example.bucket = 4, (128, 64), (128, 64)
    configured = LoraTrainer(model_dir=model_dir, cfg=cfg, device="cpu").train(
        examples, work_dir=tmp_path / "configured")

    assert (plain.steps, configured.steps) == (2, 1)  # 4 images: 2 batches of 2, then 1 of 4
    before, after = _metadata(plain.lora_bytes), _metadata(configured.lora_bytes)
    assert (before["ss_batch_size_per_device"], after["ss_batch_size_per_device"]) == ("2", "4")
    assert (before["ss_resolution"], after["ss_resolution"]) == ("(64, 64)", "(128, 64)")
    assert after["modelspec.resolution"] == "128x64"
    assert json.loads(after["ss_bucket_info"])["buckets"]["0"]["resolution"] == [128, 64]
    (dataset,) = json.loads(after["ss_datasets"])
    assert dataset["batch_size_per_device"] == 4 and dataset["resolution"] == [128, 64]


def test_two_datasets_batch_separately_each_by_its_own_size(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    examples = _examples()
    for index, example in enumerate(examples):  # two [[datasets]]: batch_size 2 and 1
        example.dataset = index // 2
        example.batch_size = 2 if index < 2 else 1
    result = LoraTrainer(model_dir=model_dir, cfg=_config(batch_size=4, max_train_epochs=1),
                         device="cpu").train(examples, work_dir=tmp_path)
    assert result.steps == 3  # 1 batch of 2 + 2 batches of 1; never one batch of 4
    sizes = [d["batch_size_per_device"] for d in json.loads(_metadata(result.lora_bytes)["ss_datasets"])]
    assert sizes == [2, 1]


def _caption_builder(seed: int = 0) -> LoraTrainer:
    trainer = LoraTrainer(model_dir=Path("unused"), cfg=TrainConfig(), device="cpu")
    trainer._py_rng = random.Random(seed)
    return trainer


def test_subset_caption_options_change_the_text_trained_on() -> None:
    caption = "sks dog, red collar, grass, sunny"
    trainer = _caption_builder()
    assert trainer._caption(caption, SubsetOptions()) == caption
    assert trainer._caption(caption, SubsetOptions(caption_prefix="photo of", caption_suffix="hd")) \
        == "photo of sks dog, red collar, grass, sunny hd"
    assert trainer._caption(caption, SubsetOptions(caption_dropout_rate=1.0)) == ""
    shuffled = {trainer._caption(caption, SubsetOptions(shuffle_caption=True, keep_tokens=1))
                for _ in range(30)}
    assert len(shuffled) > 1 and all(text.startswith("sks dog, ") for text in shuffled)
    assert {tuple(sorted(text.split(", "))) for text in shuffled} == {tuple(sorted(caption.split(", ")))}
    by_bar = trainer._caption("sks dog|collar", SubsetOptions(shuffle_caption=True, caption_separator="|"))
    assert sorted(by_bar.split(", ")) == ["collar", "sks dog"]


def _encoded_crops(model_dir: Path, work_dir: Path,  # noqa: F811
                   **overrides: object) -> tuple[set[bytes], bytes]:
    """The distinct pixel tensors the VAE encoded over a run, and the LoRA it made."""
    trainer = LoraTrainer(model_dir=model_dir, cfg=_config(max_train_steps=6, **overrides), device="cpu")
    seen: set[bytes] = set()
    encode = trainer._encode

    def recording(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.update(image.numpy().tobytes() for image in pixels)
        return encode(pixels)

    trainer._encode = recording  # type: ignore[method-assign]
    return seen, trainer.train(_examples(), work_dir=work_dir).lora_bytes


def test_random_crop_moves_the_window_over_each_image(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    # 80x72 images cover a 64x64 bucket at 71x64: 7 px of each row are cropped away
    centred, plain = _encoded_crops(model_dir, tmp_path / "centred")
    moving, lora = _encoded_crops(model_dir, tmp_path / "random", random_crop=True)
    assert len(centred) == 4  # four images, each always cut at the same place
    assert len(moving) > 4  # the same images, cut at other offsets on other steps
    assert lora != plain
    assert _metadata(lora)["ss_random_crop"] == "True" and _metadata(plain)["ss_random_crop"] == "False"
    with pytest.raises(ValueError, match="random_crop"):
        _config(random_crop=True, cache_latents=True)


def test_a_subsets_random_crop_applies_to_its_images_only(model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    examples = _examples()
    examples[0].options = SubsetOptions(random_crop=True)  # a TOML subset with random_crop = true
    examples[0].dataset_dir = "1_moving"
    for example in examples[1:]:
        example.options, example.dataset_dir = SubsetOptions(), "1_still"
    trainer = LoraTrainer(model_dir=model_dir, cfg=_config(max_train_epochs=4), device="cpu")
    seen: set[bytes] = set()
    encode = trainer._encode

    def recording(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.update(image.numpy().tobytes() for image in pixels)
        return encode(pixels)

    trainer._encode = recording  # type: ignore[method-assign]
    result = trainer.train(examples, work_dir=tmp_path)
    # three images always centred, one seen at several offsets over four epochs
    centred = {_to_tensor(trainer._fitted[(index, (64, 64))]).numpy().tobytes() for index in (1, 2, 3)}
    assert centred <= seen and len(seen - centred) > 1
    (dataset,) = json.loads(_metadata(result.lora_bytes)["ss_datasets"])
    assert [(s["image_dir"], s["random_crop"]) for s in dataset["subsets"]] == [
        ("1_moving", True), ("1_still", False)]


def test_the_crop_window_is_centred_or_drawn_from_the_generator() -> None:
    image = _examples()[0].image.resize((71, 64))
    assert _crop(image, (64, 64)).tobytes() == image.crop((3, 0, 67, 64)).tobytes()
    generator = torch.Generator().manual_seed(3)
    windows = {_crop(image, (64, 64), generator).tobytes() for _ in range(20)}
    assert len(windows) > 1 and all(len(w) == 64 * 64 * 3 for w in windows)


def test_long_captions_are_read_in_75_token_chunks(model_dir: Path) -> None:  # noqa: F811
    head = " ".join(["a"] * 80)  # 80 tokens (one per word, with the tiny model's tokenizer too)
    captions = [head + " red dog", head + " blue sky"]  # differ only after token 75

    def embed(length: int) -> torch.Tensor:
        trainer = LoraTrainer(model_dir=model_dir, cfg=_config(max_token_length=length), device="cpu")
        trainer._load()
        with torch.no_grad():
            return trainer._text_embeddings(captions)

    short, long, longest = embed(75), embed(150), embed(225)
    assert short.shape[1] == 77 and long.shape[1] == 152 and longest.shape[1] == 227
    assert torch.equal(short[0], short[1])  # the tail is cut off at 75 tokens
    assert not torch.allclose(long[0], long[1])  # 150 reads it
    # the first chunk is the first 75 tokens read as before: the text encoder is causal
    torch.testing.assert_close(long[:, :76], short[:, :76])
    with pytest.raises(ValueError, match="max_token_length"):
        _config(max_token_length=100)
