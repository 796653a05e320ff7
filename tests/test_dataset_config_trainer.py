"""A dataset config's per-dataset and per-subset options as the trainer applies them.

The gateway turns a kohya ``dataset_config`` TOML into per-image batch size, resolution,
bucket and subset options; these tests show each one changing what the trainer does (steps,
``ss_*`` metadata, the caption text a step trains on), on the tiny SD1.5 model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

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
