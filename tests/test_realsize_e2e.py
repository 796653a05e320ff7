"""Stable Diffusion 1.5 at its real size, through the API, with no download.

The model is SD1.5's real architecture with random float16 weights (an 860M-parameter UNet,
the real VAE, CLIP ViT-L/14), built once per machine (``services/generator/realsize.py``,
~1 minute, then reused) as a diffusers folder and as a single-file checkpoint in the original
key layout. Both are registered through ``LOOMIS_MODELS__MODELS_FILE`` like an operator
would, on a stack of their own with one generator holding one model at a time, and asked for
64x64 images with one denoising step: what the tiny models prove, at the sizes people run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from services.generator.realsize import (
    SD15_TEXT_CONFIG,
    SD15_UNET_CONFIG,
    ensure_real_sd15,
    find_real_sd15,
)
from shared.models import ModelRegistry
from tests.conftest import RunningStack, S3Server, launch_stack, wait_terminal
from tests.test_modes_e2e import gradient, images_of, upload

FOLDER, SINGLE = "sd15-real", "sd15-real-file"
# Guidance 1 runs the UNet once per step instead of twice (no unconditional pass).
BASE = {"prompt": "a quiet harbour", "model": FOLDER, "steps": 1, "seed": 5,
        "width": 64, "height": 64, "scheduler": "Euler", "guidance_scale": 1.0}
LOAD_TIMEOUT_S = 300.0  # a job that loads the model: up to ~4 GB read and upcast on 2 cores


@pytest.fixture(scope="module")
def real_sd15() -> dict[str, object]:
    """Found in the machine's cache, else built by a child process, so the build's ~4 GB
    peak is not kept in this one."""
    found = find_real_sd15()
    if found is not None:
        return {"folder": str(found.folder), "single_file": str(found.single_file),
                "build": found.build_info()}
    done = subprocess.run([sys.executable, "-m", "services.generator.realsize"],
                          capture_output=True, text=True, check=True, timeout=900)
    report: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def _toml_list(values: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(value) for value in values) + "]"


@pytest.fixture(scope="module")
def real_stack(real_sd15: dict[str, object], tmp_path_factory: pytest.TempPathFactory,
               s3_server: S3Server, model_cache: Path) -> Iterator[RunningStack]:
    tmp = tmp_path_factory.mktemp("stack-realsize")
    widths = ModelRegistry.load().get("sd15").lora_widths  # type: ignore[union-attr]
    lora_widths = ", ".join(f"{part} = {_toml_list(sizes)}" for part, sizes in widths.items())
    common = (f'family = "sd15"\ndefault_size = 64\ndefault_steps = 1\nlora_dim = 768\n'
              f"lora_widths = {{ {lora_widths} }}\n")
    models = tmp / "models.toml"
    models.write_text(
        f'[[models]]\nname = "{FOLDER}"\nsource = {json.dumps(real_sd15["folder"])}\n{common}\n'
        f'[[models]]\nname = "{SINGLE}"\nsource = {json.dumps(real_sd15["single_file"])}\n'
        f'config = {json.dumps(real_sd15["folder"])}\n{common}'
    )
    running = launch_stack(
        tmp, database_url=f"sqlite+aiosqlite:///{tmp / 'loomis.db'}", s3=s3_server,
        model_cache=model_cache,
        extra_env={"LOOMIS_MODELS__MODELS_FILE": str(models),
                   "LOOMIS_GENERATOR__MAX_LOADED_MODELS": "1"},
    )
    yield running
    running.stack.stop()
    running.redis.stop()


def run(client: httpx.Client, spec: dict) -> dict:  # type: ignore[type-arg]
    response = client.post("/v1/generations", json=spec)
    assert response.status_code == 202, response.text
    return wait_terminal(client, response.json()["id"], timeout=LOAD_TIMEOUT_S)


# --- kohya LoRAs with SD1.5's real module names and widths ---------------------------------------


def _kohya_layers() -> dict[str, tuple[int, ...]]:
    """Every layer sd-scripts' LoRA adapts in SD1.5, by kohya name, with its weight's shape.

    sd-scripts adapts the Linear and 1x1 Conv layers inside the UNet's transformer blocks and
    the CLIP encoder's attention and MLP layers, named after diffusers' module paths (the text
    encoder's from transformers 4's ``text_model.`` nesting). The models are built on the meta
    device: names and shapes, no memory.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    layers: dict[str, tuple[int, ...]] = {}
    for name, module in unet.named_modules():
        adapted = isinstance(module, torch.nn.Linear) or (
            isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1))
        if ".attentions." in name and adapted:
            layers["lora_unet_" + name.replace(".", "_")] = tuple(module.weight.shape)
    for name, module in text_encoder.named_modules():
        if name.startswith("encoder.layers.") and isinstance(module, torch.nn.Linear):
            layers["lora_te_text_model_" + name.replace(".", "_")] = tuple(module.weight.shape)
    return layers


def kohya_lora(*, keep: str = "unet+te", rank: int = 4, seed: int = 1) -> bytes:
    """A kohya LoRA for real SD1.5; ``keep`` picks its layers: ``unet+te`` (what sd-scripts
    writes by default) or ``te_q`` (the text encoder's ``q_proj`` layers and nothing else:
    no ``out_proj``, no UNet part, which diffusers' own kohya detection cannot place).

    ``lora_up`` is random too: a trained one is not zero, and a zero one would change
    nothing and prove nothing.
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    for index, (name, shape) in enumerate(sorted(_kohya_layers().items())):
        is_te = name.startswith("lora_te_")
        if keep == "te_q" and not (is_te and name.endswith("_q_proj")):
            continue
        generator = torch.Generator().manual_seed(seed * 100_000 + index)
        out_features, in_features, *kernel = shape
        down = torch.randn((rank, in_features, *kernel), generator=generator) / math.sqrt(in_features)
        up = torch.randn((out_features, rank, *kernel), generator=generator) * 0.5 / math.sqrt(rank)
        tensors[f"{name}.lora_down.weight"] = down.to(torch.float16)
        tensors[f"{name}.lora_up.weight"] = up.to(torch.float16)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    return save(tensors, metadata={"ss_network_module": "networks.lora",
                                   "ss_network_dim": str(rank), "ss_base_model_version": "sd_v1"})


def upload_lora(client: httpx.Client, data: bytes, name: str) -> httpx.Response:
    return client.post("/v1/loras", data={"base_model": FOLDER, "name": name},
                       files={"file": (f"{name}.safetensors", data, "application/octet-stream")})


# --- the tests ---------------------------------------------------------------------------------


def test_real_sd15_builds_once_at_real_size(real_sd15: dict[str, object]) -> None:
    build = real_sd15["build"]
    assert isinstance(build, dict)
    assert build["parameters"] == {"unet": 859_520_964, "vae": 83_653_863,
                                   "text_encoder": 123_060_480}
    assert build["dtype"] == "float16" and build["folder_bytes"] < 2.2e9
    # Built once per machine: asking again finds it, builds nothing and changes nothing.
    model = ensure_real_sd15()
    stamp = (model.root / "build.json").stat().st_mtime_ns
    assert str(model.single_file) == real_sd15["single_file"]
    assert ensure_real_sd15().build_info() == build
    assert (model.root / "build.json").stat().st_mtime_ns == stamp


def test_ldm_layout_is_what_diffusers_reads_back() -> None:
    """Our diffusers -> LDM conversion, read back by diffusers' own LDM -> diffusers
    converters, gives every tensor back under its own name (tiny models: same code paths,
    values that would expose two swapped layers of one shape)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    from services.generator.realsize import diffusers_to_ldm
    from services.models.tiny.diffusion import _sd_vae, tiny_sd15_unet

    unet, vae = tiny_sd15_unet(), _sd_vae()
    unet_state, vae_state = unet.state_dict(), vae.state_dict()
    checkpoint = diffusers_to_ldm(unet_state, vae_state, {"embeddings.x": torch.ones(1)},
                                  unet_config=dict(unet.config), vae_config=dict(vae.config))
    assert "cond_stage_model.transformer.text_model.embeddings.x" in checkpoint
    assert "model.diffusion_model.input_blocks.0.0.weight" in checkpoint
    for ours, back in ((unet_state, convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))),
                       (vae_state, convert_ldm_vae_checkpoint(checkpoint, dict(vae.config)))):
        assert set(back) == set(ours)
        assert all(torch.equal(back[key], ours[key]) for key in ours)


def test_img2img_and_inpaint_at_real_size(real_stack: RunningStack) -> None:
    source = gradient(64, 64)
    with real_stack.client() as client:
        ref = upload(client, source)
        # Two steps at strength 0.5: one denoising step, as for txt2img.
        img2img = run(client, {**BASE, "mode": "img2img", "init_image": ref, "strength": 0.5,
                               "steps": 2})
        assert img2img["result"]["pipeline"] == "StableDiffusionImg2ImgPipeline"
        moved = images_of(img2img)[0]
        assert moved.shape == (64, 64, 3) and not np.array_equal(moved, np.asarray(source))
        inpaint = run(client, {**BASE, "mode": "inpaint", "init_image": ref, "steps": 2,
                               "strength": 0.5, "mask": {"shapes": [
                                   {"type": "rect", "x": 16, "y": 16, "width": 32, "height": 32}]}})
        assert inpaint["result"]["pipeline"] == "StableDiffusionInpaintPipeline"
        out = images_of(inpaint)[0]
        keep = np.ones((64, 64), bool)
        keep[16:48, 16:48] = False
        assert np.array_equal(out[keep], np.asarray(source)[keep])
        assert not np.array_equal(out[~keep], np.asarray(source)[~keep])


def test_kohya_loras_with_real_names_and_widths(real_stack: RunningStack) -> None:
    with real_stack.client() as client:
        full = upload_lora(client, kohya_lora(), "real-full")
        assert full.status_code == 201, full.text
        assert full.json()["format"] == "kohya" and full.json()["family"] == "sd15"
        base = images_of(run(client, BASE))[0]
        zero = run(client, {**BASE, "loras": [{"id": full.json()["id"], "weight": 0.0}]})
        assert np.array_equal(images_of(zero)[0], base)
        one = images_of(run(client, {**BASE, "loras": [{"id": full.json()["id"], "weight": 1.0}]}))[0]
        assert not np.array_equal(one, base)

        # Text-encoder q_proj layers and nothing else: what the upload check says is what
        # generation does. Accepted means applied: the prompt's encoding, so the image, moves.
        q_only = upload_lora(client, kohya_lora(keep="te_q", seed=2), "real-q-only")
        if q_only.status_code == 201:
            job = run(client, {**BASE, "loras": [{"id": q_only.json()["id"]}]})
            assert job["status"] == "succeeded", job
            assert not np.array_equal(images_of(job)[0], base)
        else:
            assert q_only.status_code == 422, q_only.text
            assert q_only.json()["errors"][0]["field"] == "file"


def test_single_file_draws_the_folders_pixels(real_stack: RunningStack) -> None:
    with real_stack.client() as client:
        from_folder = run(client, BASE)
        from_file = run(client, {**BASE, "model": SINGLE})
        assert from_file["result"]["pipeline"] == "StableDiffusionPipeline"
        assert np.array_equal(images_of(from_file)[0], images_of(from_folder)[0])
        # Different weights files, different hashes: a manifest names what drew the pixels.
        assert from_file["result"]["model"]["sha256"] != from_folder["result"]["model"]["sha256"]


def test_config_builder_makes_a_flux_the_worker_loads(tmp_path: Path) -> None:
    """The builder the benchmark uses for SDXL and FLUX.1 at real size, run on FLUX.1-dev's
    shipped configs shrunk to a few MB: every component class, tokenizer and scheduler it
    names is built, saved, loaded by the generator's PipelineCache and draws an image."""
    import shutil

    from services.generator.pipelines import PipelineCache
    from services.generator.realsize import CONFIGS, build_from_configs
    from shared.models import ModelPreset

    config = tmp_path / "config"
    shutil.copytree(CONFIGS / "flux-dev", config)
    shrink = {
        "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
                        "num_attention_heads": 2, "joint_attention_dim": 32,
                        "pooled_projection_dim": 32, "axes_dims_rope": [4, 4, 8]},
        "text_encoder": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "projection_dim": 32},
        "text_encoder_2": {"d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 1,
                           "num_heads": 2},
        "vae": {"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4, "layers_per_block": 1},
    }
    for name, changes in shrink.items():
        path = config / name / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    params = build_from_configs(config, tmp_path / "model", dtype=torch.bfloat16)
    assert set(params) == {"transformer", "text_encoder", "text_encoder_2", "vae"}
    preset = ModelPreset(name="flux-shrunk", family="flux", source=str(tmp_path / "model"))
    cache = PipelineCache(registry=ModelRegistry([preset]), cache_dir=tmp_path / "cache",
                          device="cpu")
    loaded = cache.get("flux-shrunk")
    assert type(loaded.pipe).__name__ == "FluxPipeline" and loaded.dtype == "float32"
    with torch.inference_mode():
        image = loaded.pipe(prompt="a lighthouse", num_inference_steps=1, width=64, height=64,
                            max_sequence_length=32, generator=torch.Generator().manual_seed(0),
                            output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
