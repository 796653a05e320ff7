"""Real LoRA files for the tiny models, in the namings that uploads arrive in.

Each adapter is built with peft on the tiny model itself, so its shapes are the ones diffusers
expects, and exported through the pipeline class's own ``save_lora_weights`` (diffusers/peft
naming). The kohya variant renames those tensors the way sd-scripts writes them, so both
paths of diffusers' loader are exercised with files we can make offline.

peft initialises ``lora_B`` to zero (a fresh adapter changes nothing), so both halves are
re-drawn from a seeded generator: a test that "the LoRA changes the output" then means it.
"""

from __future__ import annotations

import io
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
# An adapter's tensors (peft names, no component prefix) and its LoraConfig as a dict.
Adapter = tuple[dict[str, torch.Tensor], dict[str, object]]
TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass(frozen=True)
class _TextEncoder:
    subfolder: str
    model_class: str
    kohya_prefix: str


@dataclass(frozen=True)
class _Family:
    pipeline_class: str
    denoiser: Literal["unet", "transformer"]
    denoiser_class: str
    text_encoders: tuple[_TextEncoder, ...]


FAMILIES: dict[str, _Family] = {
    "sd15": _Family("StableDiffusionPipeline", "unet", "UNet2DConditionModel",
                    (_TextEncoder("text_encoder", "CLIPTextModel", "lora_te"),)),
    "sdxl": _Family("StableDiffusionXLPipeline", "unet", "UNet2DConditionModel",
                    (_TextEncoder("text_encoder", "CLIPTextModel", "lora_te1"),
                     _TextEncoder("text_encoder_2", "CLIPTextModelWithProjection", "lora_te2"))),
    # diffusers loads LoRA into Flux's CLIP encoder only, never T5.
    "flux": _Family("FluxPipeline", "transformer", "FluxTransformer2DModel",
                    (_TextEncoder("text_encoder", "CLIPTextModel", "lora_te1"),)),
}


def _family(name: str) -> tuple[str, _Family]:
    key = name.removeprefix("tiny-")
    if key not in FAMILIES:
        raise KeyError(f"no LoRA factory for {name!r}; known: {', '.join(FAMILIES)}")
    return key, FAMILIES[key]


def _randomise(state: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fan-in scaled draws: large enough to move every pixel, small enough to stay finite."""
    out: dict[str, torch.Tensor] = {}
    for name in sorted(state):
        tensor = state[name]
        fan_in = tensor.shape[1]
        scale = (1.0 if ".lora_A." in name else 0.5) / math.sqrt(fan_in)
        out[name] = (torch.randn(tensor.shape, generator=generator) * scale).to(tensor.dtype)
    return out


def _adapter_state(module: torch.nn.Module, targets: list[str], rank: int,
                   generator: torch.Generator) -> Adapter:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=True)
    module.add_adapter(config, adapter_name="factory")  # type: ignore[operator]
    state = _randomise(get_peft_model_state_dict(module, adapter_name="factory",
                                                 save_embedding_layers=False), generator)
    return state, config.to_dict()  # type: ignore[no-untyped-call]


def _peft_bytes(family: _Family, components: dict[str, Adapter]) -> bytes:
    import diffusers

    pipeline_class = getattr(diffusers, family.pipeline_class)
    kwargs: dict[str, object] = {}
    for component, (state, config) in components.items():
        kwargs[f"{component}_lora_layers"] = state
        kwargs[f"{component}_lora_adapter_metadata"] = config
    with tempfile.TemporaryDirectory() as folder:
        pipeline_class.save_lora_weights(folder, weight_name="lora.safetensors", **kwargs)
        return (Path(folder) / "lora.safetensors").read_bytes()


def _kohya_module(prefix: str, module: str) -> str:
    if prefix.startswith("lora_te") and module.startswith("encoder."):
        # sd-scripts names CLIP layers from transformers 4's nesting (text_model.encoder…).
        module = f"text_model.{module}"
    return f"{prefix}_{module.replace('.', '_')}"


def _kohya_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in state:
        if ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            modules[module] = (state[name], state[f"{module}.lora_B.weight"])
    return modules


def _kohya_entry(out: dict[str, torch.Tensor], name: str, down: torch.Tensor, up: torch.Tensor) -> None:
    out[f"{name}.lora_down.weight"] = down.contiguous()
    out[f"{name}.lora_up.weight"] = up.contiguous()
    # alpha = rank: a scale of 1, the same adapter the peft file describes.
    out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))


def _kohya_flux_transformer(state: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """sd-scripts trains Flux in BFL's layout, where q, k and v are one fused ``qkv`` layer.

    Three rank-r adapters become one rank-3r adapter: the down weights stacked and the up
    weights block-diagonal, which diffusers splits back exactly. Single blocks are left out:
    diffusers' converter assumes real Flux widths (3072/12288) for ``linear1``.
    """
    pairs = _kohya_pairs(state)
    blocks = sorted({int(name.split(".")[1]) for name in pairs if name.startswith("transformer_blocks.")})
    for index in blocks:
        base = f"transformer_blocks.{index}.attn"
        qkv = [pairs[f"{base}.{proj}"] for proj in ("to_q", "to_k", "to_v")]
        fused_up = torch.block_diag(*[up for _, up in qkv])  # type: ignore[no-untyped-call]
        _kohya_entry(out, f"lora_unet_double_blocks_{index}_img_attn_qkv",
                     torch.cat([down for down, _ in qkv]), fused_up)
        down, up = pairs[f"{base}.to_out.0"]
        _kohya_entry(out, f"lora_unet_double_blocks_{index}_img_attn_proj", down, up)


def _kohya_bytes(family: _Family, components: dict[str, Adapter]) -> bytes:
    from safetensors.torch import save

    out: dict[str, torch.Tensor] = {}
    prefixes = {encoder.subfolder: encoder.kohya_prefix for encoder in family.text_encoders}
    for component, (state, _) in components.items():
        if component == "transformer":
            _kohya_flux_transformer(state, out)
            continue
        prefix = "lora_unet" if component == "unet" else prefixes[component]
        for module, (down, up) in _kohya_pairs(state).items():
            _kohya_entry(out, _kohya_module(prefix, module), down, up)
    rank = max(tensor.shape[0] for name, tensor in out.items() if name.endswith("lora_down.weight"))
    return save(out, metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank)})


def make_lora(family: str, *, cache_dir: Path, rank: int = 4, seed: int = 0,
              fmt: str = "peft", text_encoder: bool = False) -> bytes:
    """A safetensors LoRA for tiny-``family`` (``sd15``, ``sdxl``, ``flux``) that diffusers loads."""
    import diffusers
    import transformers

    from services.models.tiny.diffusion import ensure_tiny_model

    if fmt not in ("peft", "kohya"):
        raise ValueError(f"unknown LoRA format {fmt!r}; use 'peft' or 'kohya'")
    key, spec = _family(family)
    model_dir = ensure_tiny_model(f"tiny-{key}", cache_dir)
    generator = torch.Generator().manual_seed(seed)
    denoiser = getattr(diffusers, spec.denoiser_class).from_pretrained(model_dir, subfolder=spec.denoiser)
    components: dict[str, Adapter] = {
        spec.denoiser: _adapter_state(denoiser, TARGET_MODULES, rank, generator)}
    if text_encoder:
        for encoder in spec.text_encoders:
            model = getattr(transformers, encoder.model_class).from_pretrained(
                model_dir, subfolder=encoder.subfolder)
            components[encoder.subfolder] = _adapter_state(model, TEXT_ENCODER_TARGETS, rank, generator)
    return _peft_bytes(spec, components) if fmt == "peft" else _kohya_bytes(spec, components)


def make_pickle_lora() -> bytes:
    """What a .ckpt/.pt LoRA upload looks like: ``torch.save`` of a state dict (a zip of pickles)."""
    buffer = io.BytesIO()
    torch.save({"lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32)}, buffer)
    return buffer.getvalue()
