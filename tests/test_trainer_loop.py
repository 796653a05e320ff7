"""The LoRA trainer on the tiny SD1.5 model: a few 64 px steps per run, seeded, on CPU.

What is checked is what a worker relies on: the file passes the gateway's LoRA checks and
changes diffusers' output, a resumed run is the uninterrupted one, stopping returns at once,
and the options kohya documents as incompatible are refused before any model is loaded.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load

from services.gateway.loras.fit import check_lora_for_model
from services.gateway.loras.inspection import inspect_lora
from services.models.tiny.diffusion import ensure_tiny_model
from services.trainer import (
    LoraTrainer,
    OptimizerUnavailable,
    SamplePrompt,
    TrainConfig,
    TrainExample,
    TrainResult,
)
from services.trainer.kohya_format import lora_file, lora_record, lora_state_dict
from shared.models import ModelRegistry

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRIGGER = "zkw person"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads; on 2 busy cores they only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_tiny_model("tiny-sd15", tmp_path_factory.mktemp("models"))


def _examples() -> list[TrainExample]:
    rng = np.random.default_rng(0)
    examples = []
    for index in range(4):
        # Smooth colour blobs rather than white noise: something a VAE encodes like a picture.
        base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((80, 72), Image.Resampling.BICUBIC)
        examples.append(TrainExample(image=image, caption=f"{TRIGGER}, red shirt, pose {index}"))
    return examples


def _config(**overrides: Any) -> TrainConfig:
    options: dict[str, Any] = {
        "rank": 4, "alpha": 4.0, "learning_rate": 1e-3, "batch_size": 2, "max_train_steps": 6,
        "seed": 7, "resolution": 64, "optimizer": "AdamW", "base_model_hash": "abc123",
    }
    options.update(overrides)
    return TrainConfig(**options)


def _train(model_dir: Path, work_dir: Path, cfg: TrainConfig, **kwargs: Any) -> TrainResult:
    return LoraTrainer(model_dir=model_dir, cfg=cfg, device="cpu").train(_examples(), work_dir=work_dir,
                                                                          **kwargs)


@pytest.fixture(scope="module")
def six_steps(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, list[tuple]]:
    calls: list[tuple] = []
    result = _train(model_dir, tmp_path_factory.mktemp("run"), _config(),
                    on_step=lambda *args: calls.append(args))
    return result, calls


def test_six_steps_give_a_lora_the_gateway_accepts(six_steps: tuple[TrainResult, list[tuple]]) -> None:
    result, calls = six_steps
    assert result.steps == 6 and result.epochs == 3 and not result.stopped
    assert math.isfinite(result.final_loss) and all(math.isfinite(loss) for loss in result.losses)
    assert [call[0] for call in calls] == [1, 2, 3, 4, 5, 6]
    step, total, epoch, loss_avg, lr, rate, eta = calls[-1]
    assert (total, epoch, lr) == (6, 3, pytest.approx(1e-3)) and rate > 0 and eta == 0
    assert math.isfinite(loss_avg)

    info = inspect_lora(result.lora_bytes)
    preset = ModelRegistry.load().get("tiny-sd15")
    assert preset is not None
    check_lora_for_model(info, preset)
    assert info.format == "kohya" and info.rank == 4 and not info.has_text_encoder
    # to_q/to_k/to_v/to_out.0 of self and cross attention in the tiny UNet's 4 transformer
    # blocks (one down, one mid, two up).
    assert info.targets == 4 * 2 * 4
    meta = info.metadata
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "4.0")
    assert (meta["ss_max_train_steps"], meta["ss_num_epochs"], meta["ss_seed"]) == ("6", "3", "7")
    assert meta["ss_sd_model_hash"] == "abc123" and meta["ss_lr_scheduler"] == "constant"
    assert json.loads(meta["ss_tag_frequency"])["1_img"]["zkw person"] == 4
    assert json.loads(meta["ss_dataset_dirs"]) == {"1_img": {"n_repeats": 1, "img_count": 4}}
    assert "ss_training_finished_at" in meta



def test_the_trainer_records_its_lora_as_the_gateway_records_an_upload(
        six_steps: tuple[TrainResult, list[tuple]]) -> None:
    """The trainer describes the file it wrote without the gateway's inspection; the two must
    never drift, or a trained LoRA would be checked against other widths than an uploaded one."""
    result, _ = six_steps
    assert lora_record(result.lora_bytes) == inspect_lora(result.lora_bytes).record()


def test_the_trainers_record_of_a_text_encoder_and_conv_lora_is_the_gateways() -> None:
    """A file from the trainer's own writer, no model: text encoder and UNet adapters, a
    convolution among them, and more metadata than the record keeps."""
    rank, adapter = 2, "default"
    layers = {  # peft module -> (in, out) widths, and a kernel for the convolution
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (24, 32, None),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v": (24, 32, None),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32, None),
        "unet.down_blocks.0.resnets.0.conv1": (16, 40, 3),
        "te.encoder.layers.0.self_attn.q_proj": (24, 24, None),
        "te.text_model.encoder.layers.1.mlp.fc1": (24, 96, None),
    }
    trainable: dict[str, torch.nn.Parameter] = {}
    for module, (fan_in, fan_out, kernel) in layers.items():
        conv = (kernel, kernel) if kernel else ()
        trainable[f"{module}.lora_A.{adapter}.weight"] = torch.nn.Parameter(torch.ones(rank, fan_in, *conv))
        trainable[f"{module}.lora_B.{adapter}.weight"] = torch.nn.Parameter(
            torch.ones(fan_out, rank, *((1, 1) if kernel else ())))
    data = lora_file(lora_state_dict(trainable, alpha=1.0, save_precision="fp16"),
                     {f"ss_key_{index:02d}": str(index) for index in range(30)})
    record = lora_record(data)
    assert record == inspect_lora(data).record()
    assert (record["targets"], record["has_text_encoder"], record["dims"]) == (6, True, [24])
    assert record["widths"] == {"text_encoder": [24, 96], "unet": [16, 24, 32, 40]}
    assert len(record["metadata"]) == 20


def test_trained_lora_changes_diffusers_output(six_steps: tuple[TrainResult, list[tuple]],
                                               model_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    result, _ = six_steps
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def render() -> np.ndarray:
        out = pipe(TRIGGER, width=64, height=64, num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images[0]
        return np.asarray(out)

    base = render()
    pipe.load_lora_weights(load(result.lora_bytes), adapter_name="trained")
    pipe.set_adapters(["trained"], adapter_weights=[1.0])
    with_lora = render()
    pipe.set_adapters(["trained"], adapter_weights=[0.0])
    assert np.array_equal(render(), base)
    assert np.abs(with_lora - base).max() > 1e-4


def test_cache_latents_refuses_augmentation() -> None:
    with pytest.raises(ValueError, match="cache_latents"):
        _config(cache_latents=True, flip_aug=True)
    with pytest.raises(ValueError, match="rank"):
        _config(rank=0)


def test_fp16_needs_cuda(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="fp16"):
        LoraTrainer(model_dir=model_dir, cfg=_config(mixed_precision="fp16"), device="cpu")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is here")
def test_missing_optimizer_package_is_reported(model_dir: Path) -> None:
    with pytest.raises(OptimizerUnavailable, match="bitsandbytes"):
        LoraTrainer(model_dir=model_dir, cfg=_config(optimizer="AdamW8bit"), device="cpu")


def test_resume_repeats_the_uninterrupted_run(six_steps: tuple[TrainResult, list[tuple]], model_dir: Path,
                                              tmp_path: Path) -> None:
    done: list[int] = []
    samples: list[tuple[int, int, tuple[int, int]]] = []
    checkpoints: list[tuple[int, Path | None]] = []
    # Previews at step 3 as well: rendering them must not disturb the training generators.
    cfg = _config(save_every_n_steps=3, save_state=True, sample_every_n_steps=3,
                  sample_prompts=[SamplePrompt(TRIGGER, width=64, height=64, steps=2, seed=1)])
    first = _train(model_dir, tmp_path, cfg, on_step=lambda step, *_: done.append(step),
                   on_sample=lambda step, index, image: samples.append((step, index, image.size)),
                   on_checkpoint=lambda step, data, state: checkpoints.append((step, state)),
                   should_stop=lambda: len(done) >= 3)
    assert first.stopped and first.steps == 3 and done == [1, 2, 3]
    assert first.state_dir == tmp_path / "state-3" and checkpoints == [(3, first.state_dir)]
    assert samples == [(3, 0, (64, 64))]

    resumed_steps: list[int] = []
    second = _train(model_dir, tmp_path, cfg, resume_state=first.state_dir,
                    on_step=lambda step, *_: resumed_steps.append(step))
    assert resumed_steps == [4, 5, 6] and second.steps == 6 and not second.stopped

    uninterrupted, _ = six_steps
    assert second.losses == uninterrupted.losses[3:]
    expected, got = load(uninterrupted.lora_bytes), load(second.lora_bytes)
    assert expected.keys() == got.keys()
    # Same seed, same CPU kernels, same order of operations: bit for bit, not merely close.
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_should_stop_before_the_first_step(model_dir: Path, tmp_path: Path) -> None:
    result = _train(model_dir, tmp_path, _config(save_state=True, save_state_on_stop=True),
                    should_stop=lambda: True)
    assert result.stopped and result.steps == 0 and result.state_dir is None
    inspect_lora(result.lora_bytes)


def test_state_saved_on_stop_resumes_mid_epoch(model_dir: Path, tmp_path: Path) -> None:
    """Batches of one: the stop after step 2 falls in the middle of the first epoch's four."""
    cfg = _config(batch_size=1, save_state=True, save_state_on_stop=True)
    whole = _train(model_dir, tmp_path / "whole", cfg)
    steps: list[int] = []
    stopped = _train(model_dir, tmp_path / "parts", cfg, on_step=lambda step, *_: steps.append(step),
                     should_stop=lambda: len(steps) >= 2)
    assert stopped.stopped and stopped.state_dir == tmp_path / "parts" / "state-2"
    rest = _train(model_dir, tmp_path / "parts", cfg, resume_state=stopped.state_dir)
    assert stopped.losses + rest.losses == whole.losses
    assert (rest.steps, rest.epochs) == (6, 2)
    expected, got = load(whole.lora_bytes), load(rest.lora_bytes)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_cached_latents_train_like_encoding_every_step(six_steps: tuple[TrainResult, list[tuple]],
                                                       model_dir: Path, tmp_path: Path) -> None:
    cache = tmp_path / "latents"
    cached = _train(model_dir, tmp_path, _config(max_train_steps=1, cache_latents=True,
                                                 latents_cache_dir=cache))
    files = sorted(cache.iterdir())
    assert len(files) == 4
    # The VAE sees one image at a time when caching and a batch of two otherwise; CPU kernels
    # may sum in another order across batch sizes, so the losses agree to float rounding.
    uninterrupted, _ = six_steps
    assert cached.losses[0] == pytest.approx(uninterrupted.losses[0], rel=1e-5)
    again = _train(model_dir, tmp_path, _config(max_train_steps=1, cache_latents=True,
                                                latents_cache_dir=cache))
    assert sorted(cache.iterdir()) == files and again.losses == cached.losses


def test_text_encoder_lora_and_other_optimizers(model_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    result = _train(model_dir, tmp_path, _config(
        max_train_steps=2, train_text_encoder=True, text_encoder_lr=5e-4, optimizer="Adafactor",
        save_precision="fp16", shuffle_caption=True, keep_tokens=1, noise_offset=0.05,
        min_snr_gamma=5.0, clip_skip=2, flip_aug=True, gradient_accumulation_steps=2,
        multires_noise_iterations=3))
    assert result.steps == 2 and math.isfinite(result.final_loss)
    info = inspect_lora(result.lora_bytes)
    assert info.has_text_encoder and info.metadata["ss_lr_scheduler"] == "adafactor"
    tensors = load(result.lora_bytes)
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float16}
    assert any(name.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for name in tensors)
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(tensors, adapter_name="te")
    assert any("lora_A" in name for name, _ in pipe.text_encoder.named_modules())

    sgd = _train(model_dir, tmp_path, _config(max_train_steps=2, optimizer="SGDNesterov",
                                              lr_scheduler="cosine", lr_warmup_steps=1))
    assert sgd.steps == 2 and math.isfinite(sgd.final_loss)


def test_a_photo_is_trained_the_way_up_its_exif_orientation_says() -> None:
    """Found by hostile testing: the gateway buckets a photo by its EXIF-oriented size (a
    phone's portrait photo: landscape pixels and Orientation 6), the trainer read the raw
    pixels, so the photo trained on its side, cropped to the portrait bucket."""
    import io

    from services.gateway.datasets.ingest import ingest
    from services.trainer.worker import upright

    pixels = Image.new("RGB", (128, 64), (10, 200, 30))
    pixels.paste((200, 10, 10), (0, 0, 16, 64))  # a red stripe on the left: the top, upright
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    buffer = io.BytesIO()
    pixels.save(buffer, format="JPEG", exif=exif)
    data = buffer.getvalue()
    checked = ingest(files=[("1_x/p.jpg", io.BytesIO(data))], zips=[],
                     caption_extensions=(".caption",))
    item = checked.items[0]
    image = upright(data)
    assert image.size == (item.width, item.height) == (64, 128)
    red, green = image.getpixel((32, 4)), image.getpixel((32, 120))
    assert red[0] > 150 > red[1] and green[1] > 150 > green[0]  # type: ignore[index]
