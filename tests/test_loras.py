"""LoRA upload checks: real files from the tiny models, hand-made headers for real model shapes.

The gateway parses safetensors by hand, so the reference loader is the oracle here: files
it refuses must be refused too, and files the factory makes must load in diffusers.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import random
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load as reference_load

from services.gateway.loras.fit import check_lora_for_model
from services.gateway.loras.inspection import LoraRejected, inspect_lora
from services.models.tiny.diffusion import ensure_tiny_model
from shared.modelfiles import DTYPE_SIZES
from shared.models import ModelFamily, ModelPreset, ModelRegistry
from tests.lora_files import FAMILIES, make_lora, make_pickle_lora

REGISTRY = ModelRegistry.load()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    workers spinning against other processes make a 0.2 s render take seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def preset(name: str) -> ModelPreset:
    found = REGISTRY.get(name)
    assert found is not None
    return found


def safetensors_bytes(tensors: dict[str, tuple[str, list[int]]],
                      metadata: dict[str, str] | None = None) -> bytes:
    """Zero-filled tensors in a valid file: real model shapes without a real model."""
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def with_header(header: object, data: bytes = b"", *, raw: bytes | None = None) -> bytes:
    encoded = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


SUFFIXES = {
    "peft": (".lora_A.weight", ".lora_B.weight"),
    "kohya": (".lora_down.weight", ".lora_up.weight"),
    "diffusers-old": (".lora.down.weight", ".lora.up.weight"),
    "linear-layer": (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    "processor": ("_lora.down.weight", "_lora.up.weight"),
}


def fake_lora(modules: dict[str, tuple[int, int]], *, rank: int = 4, naming: str = "peft") -> bytes:
    """``modules`` maps a module name to its (in, out) features."""
    down, up = SUFFIXES[naming]
    tensors: dict[str, tuple[str, list[int]]] = {}
    for module, (fan_in, fan_out) in modules.items():
        tensors[module + down] = ("F16", [rank, fan_in])
        tensors[module + up] = ("F16", [fan_out, rank])
        if naming == "kohya":
            tensors[module + ".alpha"] = ("F32", [])
    return safetensors_bytes(tensors)


def rejected(data: bytes) -> LoraRejected:
    with pytest.raises(LoraRejected) as caught:
        inspect_lora(data)
    return caught.value


# --------------------------------------------------------------------------- factory files


@pytest.fixture(scope="module")
def sd15_files(model_cache: Path) -> dict[str, bytes]:
    return {fmt: make_lora("sd15", cache_dir=model_cache, fmt=fmt, text_encoder=True)
            for fmt in ("peft", "kohya")}


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_inspect_tiny_sd15_lora(sd15_files: dict[str, bytes], fmt: str) -> None:
    data = sd15_files[fmt]
    info = inspect_lora(data)
    assert info.format == fmt
    assert info.family_hint is ModelFamily.SD15  # width 32 is tiny-sd15's
    assert info.rank == 4
    assert info.dims == {32}
    # 8 attention layers in the UNet (4 projections each) + 2 CLIP layers (4 each)
    assert info.targets == 8 * 4 + 2 * 4
    assert info.has_text_encoder
    assert info.size == len(data)
    assert len(info.sha256) == 64
    if fmt == "peft":
        assert "lora_adapter_metadata" in info.metadata  # diffusers keeps the LoraConfig there
    else:
        assert info.metadata["ss_network_module"] == "networks.lora"


def test_rank_is_the_largest_and_unet_only_files_have_no_text_encoder(model_cache: Path) -> None:
    info = inspect_lora(make_lora("sd15", cache_dir=model_cache, rank=8, seed=1, fmt="kohya"))
    assert (info.rank, info.targets, info.has_text_encoder) == (8, 32, False)


def test_tiny_sd15_lora_fits_tiny_sd15_only(sd15_files: dict[str, bytes]) -> None:
    info = inspect_lora(sd15_files["kohya"])
    check_lora_for_model(info, preset("tiny-sd15"))
    with pytest.raises(LoraRejected) as caught:
        check_lora_for_model(info, preset("tiny-sdxl"))
    assert caught.value.code == "wrong_family"
    assert "width is 32" in str(caught.value) and "tiny-sdxl expects 64" in str(caught.value)
    with pytest.raises(LoraRejected, match="is a Flux model") as caught:
        check_lora_for_model(info, preset("tiny-flux"))
    assert caught.value.code == "wrong_family"


@pytest.mark.parametrize(("family", "width", "own", "others"), [
    ("sdxl", 64, "tiny-sdxl", ["tiny-sd15", "tiny-flux"]),
    ("flux", 32, "tiny-flux", ["tiny-sd15", "tiny-sdxl"]),
])
@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_tiny_sdxl_and_flux_loras(model_cache: Path, family: str, width: int, own: str,
                                  others: list[str], fmt: str) -> None:
    info = inspect_lora(make_lora(family, cache_dir=model_cache, fmt=fmt, text_encoder=True))
    assert (info.format, info.family_hint, set(info.dims)) == (fmt, ModelFamily(family), {width})
    check_lora_for_model(info, preset(own))
    for other in others:
        with pytest.raises(LoraRejected) as caught:
            check_lora_for_model(info, preset(other))
        assert caught.value.code == "wrong_family"


# --------------------------------------------------------------------------- refusals


def test_pickles_are_refused() -> None:
    legacy = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    candidates = [make_pickle_lora(), legacy.getvalue()]
    candidates += [pickle.dumps({"w": [0.0, 1.0]}, protocol=protocol) for protocol in (2, 3, 4, 5)]
    for data in candidates:
        error = rejected(data)
        assert error.code == "pickle_refused"
        assert "safetensors" in str(error)


def _valid() -> bytes:
    return fake_lora({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (32, 32)})


TENSOR = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED = {
    "empty": b"",
    "too short": b"\x10\x00\x00",
    "text": b"this is a LoRA, trust me" * 4,
    "random bytes": random.Random(7).randbytes(4096),
    "header longer than file": struct.pack("<Q", 10**6) + b"{}",
    "huge header length": struct.pack("<Q", 2**63) + b"{}" * 8,
    "truncated header": _valid()[:40],
    "truncated data": _valid()[:-1],
    "extra data": _valid() + b"\0" * 8,
    "header not an object": with_header([TENSOR], b"\0" * 8),
    "header not json": with_header(None, b"", raw=b"{not json at all}"),
    "header not utf-8": with_header(None, b"", raw=b'{"\xff": 1}'),
    "offsets out of range": with_header({"a": {**TENSOR, "data_offsets": [0, 999]}}, b"\0" * 8),
    "offsets reversed": with_header({"a": {**TENSOR, "data_offsets": [8, 0]}}, b"\0" * 8),
    "overlapping tensors": with_header({"a": TENSOR, "b": TENSOR}, b"\0" * 8),
    "gap between tensors": with_header({"a": TENSOR, "b": {**TENSOR, "data_offsets": [12, 20]}},
                                       b"\0" * 20),
    "size does not match shape": with_header({"a": {**TENSOR, "shape": [3]}}, b"\0" * 8),
    "unknown dtype": with_header({"a": {**TENSOR, "dtype": "F7"}}, b"\0" * 8),
    "negative shape": with_header({"a": {**TENSOR, "shape": [-2]}}, b"\0" * 8),
    "metadata not strings": with_header({"__metadata__": {"rank": 4}, "a": TENSOR}, b"\0" * 8),
    "tensor entry not an object": with_header({"a": [0, 8]}, b"\0" * 8),
    "integer too long to parse": with_header(None, b"\0" * 8, raw=b'{"a": {"dtype": "F32", '
                                             b'"shape": [%s], "data_offsets": [0, 8]}}' % (b"9" * 5000)),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_files_are_not_safetensors(name: str) -> None:
    data = MALFORMED[name]
    error = rejected(data)
    assert error.code == "not_safetensors", str(error)
    assert str(error).startswith("This is not a valid .safetensors file")
    with pytest.raises(Exception):  # noqa: B017 - the reference loader refuses it as well
        reference_load(data)


def test_duplicate_names_are_refused_though_the_reference_loader_keeps_one() -> None:
    raw = b'{"a": %s, "a": %s}' % (json.dumps(TENSOR).encode(), json.dumps(TENSOR).encode())
    assert rejected(with_header(None, b"\0" * 8, raw=raw)).code == "not_safetensors"


def test_safetensors_without_lora_weights_is_not_a_lora(model_cache: Path) -> None:
    unet_file = ensure_tiny_model("tiny-sd15", model_cache) / "unet" / "diffusion_pytorch_model.safetensors"
    embedding = safetensors_bytes({"emb_params": ("F32", [2, 768])})
    for data in (unet_file.read_bytes(), embedding, safetensors_bytes({})):
        error = rejected(data)
        assert error.code == "not_a_lora"
        assert "no LoRA weights" in str(error)


def test_half_a_lora_pair_is_not_a_lora() -> None:
    data = safetensors_bytes({"unet.mid_block.attentions.0.proj_in.lora_A.weight": ("F16", [4, 64])})
    error = rejected(data)
    assert error.code == "not_a_lora" and "no up (B) weight" in str(error)
    mismatched = safetensors_bytes({"lora_unet_x.lora_down.weight": ("F16", [4, 64]),
                                    "lora_unet_x.lora_up.weight": ("F16", [64, 8])})
    assert rejected(mismatched).code == "not_a_lora"


def test_reference_loader_agrees_on_hand_made_files() -> None:
    data = fake_lora({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (768, 320)},
                     naming="kohya")
    assert set(reference_load(data)) == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" + suffix
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha")}


# --------------------------------------------------------------------------- real model shapes

SD15_ATTN2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
SD15_KOHYA = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2"
SDXL_KOHYA = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2"


@pytest.mark.parametrize(("modules", "naming", "fmt", "family", "dims"), [
    ({f"unet.{SD15_ATTN2}.to_k": (768, 320), f"unet.{SD15_ATTN2}.to_v": (768, 320)},
     "peft", "peft", ModelFamily.SD15, {768}),
    ({f"{SD15_KOHYA}_to_k": (768, 320),
      "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)},
     "kohya", "kohya", ModelFamily.SD15, {768}),
    ({f"unet.{SD15_ATTN2}.to_k": (768, 320)}, "diffusers-old", "peft", ModelFamily.SD15, {768}),
    ({f"unet.{SD15_ATTN2}.processor.to_k": (768, 320)}, "processor", "peft", ModelFamily.SD15, {768}),
    ({"text_encoder.text_model.encoder.layers.0.mlp.fc1": (768, 3072)},
     "linear-layer", "peft", None, set()),
    ({f"{SDXL_KOHYA}_to_k": (2048, 640),
      "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280)},
     "kohya", "kohya", ModelFamily.SDXL, {2048}),
    ({"unet.down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v": (2048, 1280)},
     "peft", "peft", ModelFamily.SDXL, {2048}),
    ({f"unet.{SD15_ATTN2}.to_k": (1024, 320)}, "peft", "peft", None, {1024}),  # SD2
    ({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (768, 768),
      "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": (1280, 1280)},
     "peft", "peft", ModelFamily.SDXL, set()),
    ({"transformer.transformer_blocks.0.attn.to_q": (3072, 3072),
      "transformer.single_transformer_blocks.0.attn.to_k": (3072, 3072)},
     "peft", "peft", ModelFamily.FLUX, {3072}),
    ({"lora_unet_double_blocks_0_img_attn_qkv": (3072, 9216),
      "lora_unet_single_blocks_0_linear1": (3072, 21504)},
     "kohya", "kohya", ModelFamily.FLUX, {3072}),
    ({"diffusion_model.double_blocks.0.img_attn.qkv": (3072, 9216),  # ComfyUI/BFL export
      "diffusion_model.double_blocks.0.img_attn.proj": (3072, 3072)},
     "kohya", "kohya", ModelFamily.FLUX, {3072}),
])
def test_key_formats(modules: dict[str, tuple[int, int]], naming: str, fmt: str,
                     family: ModelFamily | None, dims: set[int]) -> None:
    info = inspect_lora(fake_lora(modules, rank=8, naming=naming))
    assert (info.format, info.family_hint, set(info.dims)) == (fmt, family, dims)
    assert (info.rank, info.targets) == (8, len(modules))


@pytest.mark.parametrize(("modules", "naming", "model", "message"), [
    ({f"unet.{SD15_ATTN2}.to_k": (768, 320)}, "peft", "sdxl",
     "This LoRA's cross-attention width is 768 (SD1.5); sdxl expects 2048."),
    ({f"{SDXL_KOHYA}_to_k": (2048, 640)}, "kohya", "sd15",
     "This LoRA is for SDXL (it has several transformer blocks per attention layer"),
    ({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280)}, "kohya", "tiny-sd15",
     "This LoRA is for SDXL (it adapts SDXL's second text encoder"),
    ({"transformer.transformer_blocks.0.attn.to_q": (3072, 3072)}, "peft", "sd15",
     "This LoRA is for Flux (it adapts 'transformer.transformer_blocks.0.attn.to_q.lora_A.weight'); "
     "sd15 is an SD1.5 model."),
    ({"lora_unet_double_blocks_0_img_attn_qkv": (3072, 9216)}, "kohya", "tiny-flux",
     "This LoRA's attention width is 3072 (Flux); tiny-flux expects 32."),
    ({f"{SD15_KOHYA}_to_v": (768, 320)}, "kohya", "flux-dev",
     "This LoRA is for a Stable Diffusion UNet"),
])
def test_wrong_family_messages(modules: dict[str, tuple[int, int]], naming: str, model: str,
                               message: str) -> None:
    info = inspect_lora(fake_lora(modules, naming=naming))
    with pytest.raises(LoraRejected) as caught:
        check_lora_for_model(info, preset(model))
    assert caught.value.code == "wrong_family"
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(("modules", "naming", "model"), [
    ({f"unet.{SD15_ATTN2}.to_k": (768, 320)}, "peft", "sd15"),
    ({f"{SDXL_KOHYA}_to_k": (2048, 640)}, "kohya", "sdxl"),
    ({"lora_unet_double_blocks_0_img_attn_qkv": (3072, 9216)}, "kohya", "flux-dev"),
    # Only text-encoder weights: nothing to compare widths with, so any SD model may take it.
    ({"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (768, 768)}, "kohya", "sdxl"),
])
def test_matching_models_accept(modules: dict[str, tuple[int, int]], naming: str, model: str) -> None:
    check_lora_for_model(inspect_lora(fake_lora(modules, naming=naming)), preset(model))


@pytest.mark.parametrize(("modules", "model", "fits"), [
    # Neither names a cross-attention width, so only the full width check tells them apart.
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (640, 640)}, "sd15", True),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (640, 640)}, "tiny-sd15",
     False),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64)}, "tiny-sd15", True),
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64)}, "sd15", False),
    ({"text_encoder.text_model.encoder.layers.0.mlp.fc1": (768, 3072)}, "sdxl", True),
    ({"text_encoder.text_model.encoder.layers.0.mlp.fc1": (768, 3072)}, "tiny-sdxl", False),
    ({"lora_te2_text_model_encoder_layers_0_mlp_fc2": (5120, 1280)}, "sdxl", True),
    ({"lora_unet_single_blocks_0_linear1": (3072, 21504)}, "flux-dev", True),
    ({"transformer.single_transformer_blocks.0.proj_mlp": (3072, 12288)}, "tiny-flux", False),
])
def test_every_layer_width_must_exist_in_the_model(modules: dict[str, tuple[int, int]],
                                                   model: str, fits: bool) -> None:
    naming = "kohya" if next(iter(modules)).startswith("lora_") else "peft"
    info = inspect_lora(fake_lora(modules, naming=naming))
    if fits:
        check_lora_for_model(info, preset(model))
        return
    with pytest.raises(LoraRejected) as caught:
        check_lora_for_model(info, preset(model))
    assert caught.value.code == "wrong_family" and f"which {model} does not have" in str(caught.value)


def _layer_widths(model: torch.nn.Module) -> set[int]:
    widths: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            widths |= {module.in_features, module.out_features}
        elif isinstance(module, torch.nn.Conv2d):
            widths |= {module.in_channels, module.out_channels}
    return widths


def test_preset_widths_are_the_models_own() -> None:
    """The registry's ``lora_widths`` are data; here they are read off the models themselves:
    the tiny ones as built, the real ones from their published configs on the meta device."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from services.models.tiny.diffusion import tiny_flux_transformer, tiny_sd15_unet, tiny_sdxl_unet

    def clip(hidden: int, inner: int, layers: int = 1) -> set[int]:
        config = CLIPTextConfig(hidden_size=hidden, intermediate_size=inner, projection_dim=hidden,
                                num_hidden_layers=layers, num_attention_heads=4, vocab_size=100)
        return _layer_widths(CLIPTextModelWithProjection(config)) | _layer_widths(CLIPTextModel(config))

    def bfl(transformer: torch.nn.Module) -> set[int]:
        # BFL-layout files fuse a single block's q, k, v and MLP input into one linear1.
        inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        return _layer_widths(transformer) | {7 * inner}

    with torch.device("meta"):
        real = {
            "sd15": {"unet": _layer_widths(UNet2DConditionModel(
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                attention_head_dim=8)), "text_encoder": clip(768, 3072)},
            "sdxl": {"unet": _layer_widths(UNet2DConditionModel(
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)),
                "text_encoder": clip(768, 3072), "text_encoder_2": clip(1280, 5120)},
            "flux-dev": {"transformer": bfl(FluxTransformer2DModel(
                in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
                "text_encoder": clip(768, 3072)},
        }
    real["flux-schnell"] = real["flux-dev"]
    tiny = {
        "tiny-sd15": {"unet": _layer_widths(tiny_sd15_unet()), "text_encoder": clip(32, 37)},
        "tiny-sdxl": {"unet": _layer_widths(tiny_sdxl_unet()), "text_encoder": clip(32, 37),
                      "text_encoder_2": clip(32, 37)},
        "tiny-flux": {"transformer": bfl(tiny_flux_transformer()), "text_encoder": clip(32, 37)},
    }
    for name, widths in {**real, **tiny}.items():
        assert {component: set(found) for component, found in preset(name).lora_widths.items()} \
            == widths, name


# --------------------------------------------------------------------------- loading in diffusers


def render(pipe: Any, family: str) -> Any:
    extra = {"max_sequence_length": 32} if family == "flux" else {}
    result = pipe("a red fox", num_inference_steps=2, height=64, width=64,
                  generator=torch.Generator().manual_seed(0), output_type="np", **extra)
    return result.images[0]


# Which parts of each pipeline take LoRA weights (diffusers never adapts Flux's T5).
ADAPTED = {"sd15": {"unet", "text_encoder"}, "sdxl": {"unet", "text_encoder", "text_encoder_2"},
           "flux": {"transformer", "text_encoder"}}


@pytest.mark.filterwarnings("ignore:Already found a .peft_config. attribute:UserWarning")
@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_factory_loras_load_in_diffusers_and_leave_no_trace(
    family: str, model_cache: Path, sd15_files: dict[str, bytes], tmp_path: Path,
) -> None:
    import diffusers

    pipeline_class = getattr(diffusers, FAMILIES[family].pipeline_class)
    pipe = pipeline_class.from_pretrained(ensure_tiny_model(f"tiny-{family}", model_cache))
    pipe.set_progress_bar_config(disable=True)
    files = sd15_files if family == "sd15" else {
        fmt: make_lora(family, cache_dir=model_cache, fmt=fmt, text_encoder=True)
        for fmt in ("peft", "kohya")}
    base = render(pipe, family)

    # peft/diffusers naming from a file path, kohya naming as a state dict (the worker's way).
    (tmp_path / "peft.safetensors").write_bytes(files["peft"])
    pipe.load_lora_weights(str(tmp_path), weight_name="peft.safetensors", adapter_name="peft_lora")
    pipe.load_lora_weights(reference_load(files["kohya"]), adapter_name="kohya_lora")
    adapters = pipe.get_list_adapters()
    assert set(adapters) == ADAPTED[family]
    assert all(set(names) == {"peft_lora", "kohya_lora"} for names in adapters.values())

    outputs = {}
    for name in ("peft_lora", "kohya_lora"):
        pipe.set_adapters([name], [1.0])
        outputs[name] = render(pipe, family)
        assert np.abs(outputs[name] - base).max() > 0.01, f"{name} changed nothing"
        pipe.set_adapters([name], [0.0])
        np.testing.assert_array_equal(render(pipe, family), base)
    if family != "flux":  # the kohya file is the peft one renamed (alpha = rank): the same adapter
        np.testing.assert_allclose(outputs["kohya_lora"], outputs["peft_lora"], atol=1e-5)

    pipe.delete_adapters("peft_lora")
    pipe.set_adapters(["kohya_lora"], [1.0])
    np.testing.assert_array_equal(render(pipe, family), outputs["kohya_lora"])
    pipe.unload_lora_weights()
    np.testing.assert_array_equal(render(pipe, family), base)


def test_the_gateway_side_imports_no_torch() -> None:
    code = ("import sys, services.gateway.loras.inspection; "
            "print(sorted({'torch', 'numpy', 'safetensors'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
