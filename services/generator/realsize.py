"""Stable Diffusion 1.5 at its real size with random weights, as a folder and as one file.

The tiny models prove the code paths; this one proves them at the sizes people run: an
860M-parameter UNet, the real VAE and a CLIP ViT-L/14 text encoder, with every layer width
and key name SD1.5 has, so a kohya LoRA made for real SD1.5 fits it and a webui-style
single-file checkpoint of it loads through diffusers' single-file loader. No weights are
downloaded: the weights are random, the tokenizer is a character-level BPE padded to CLIP's
49,408 ids (the real vocabulary is data we do not ship).

It is built once per machine into a stable cache (``LOOMIS_REALSIZE_CACHE``, else
``$XDG_CACHE_HOME/loomis/realsize``, else ``~/.cache/loomis/realsize``) by one atomic rename,
so the suite pays the ~1 minute build once and reuses it. Both copies hold the same float16
numbers (the folder is saved in float16 too), so a CPU worker, which upcasts either to
float32, draws the same pixels from both.

``python -m services.generator.realsize`` builds it (if needed) and prints where it is and
what the build cost as JSON; running the build in a child process keeps its memory out of
the caller.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from services.models.cache import build_into_cache
from services.models.tiny.diffusion import write_char_tokenizer

REALSIZE_SEED = 0
SD15_NAME = "sd15-realsize"
# Bump when the built model changes, so machines with an old build make a new one.
_VERSION = "1"
CLIP_VOCAB_SIZE = 49408  # CLIP's BPE: 49,406 tokens, then <|startoftext|> and <|endoftext|>

# UNet2DConditionModel config of stable-diffusion-v1-5/unet/config.json.
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
    "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 768, "attention_head_dim": 8,
}
# AutoencoderKL config of stable-diffusion-v1-5/vae/config.json.
SD15_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512,
    "block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "act_fn": "silu",
    "norm_num_groups": 32, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "scaling_factor": 0.18215,
}
# CLIPTextConfig of openai/clip-vit-large-patch14's text tower, as SD1.5 ships it.
SD15_TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE, "hidden_size": 768, "intermediate_size": 3072,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
    "bos_token_id": CLIP_VOCAB_SIZE - 2, "eos_token_id": CLIP_VOCAB_SIZE - 1,
    "pad_token_id": 1,
}
# PNDMScheduler config of stable-diffusion-v1-5/scheduler/scheduler_config.json.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1,
}


def realsize_cache_dir() -> Path:
    """One cache per machine, shared by test runs, benchmarks and ``loomis`` alike."""
    if explicit := os.environ.get("LOOMIS_REALSIZE_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "loomis" / "realsize"


@dataclass(frozen=True)
class RealSizeModel:
    """Where a built model lies: its diffusers folder and its single-file checkpoint."""

    root: Path
    folder: Path
    single_file: Path

    @classmethod
    def at(cls, root: Path, name: str) -> RealSizeModel:
        return cls(root, root / "diffusers", root / "checkpoints" / f"{name}.safetensors")

    def build_info(self) -> dict[str, Any]:
        """What the build cost (time, peak RSS, bytes), recorded by the builder."""
        info: dict[str, Any] = json.loads((self.root / "build.json").read_text())
        return info


# --- diffusers -> original (LDM / CompVis) key layout ------------------------------------------
# Following diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py, derived from
# the config instead of fixed tables so any UNet of the SD1.5 design converts.

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                  "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                  "conv_shortcut": "skip_connection"}
_VAE_RESNET_TO_LDM = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                         "to_out.0": "proj_out"}


def _unet_prefixes(config: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(diffusers prefix, LDM prefix, renames inside) for every module of a UNet.

    LDM numbers the encoder's modules as one flat list (``input_blocks``): a resnet and its
    attention share an index, each downsampler takes one of its own. The decoder
    (``output_blocks``) has one more resnet per level and its upsampler joins the last index.
    """
    layers = int(config["layers_per_block"])
    yield "conv_in.", "input_blocks.0.0.", {}
    yield "time_embedding.linear_1.", "time_embed.0.", {}
    yield "time_embedding.linear_2.", "time_embed.2.", {}
    yield "conv_norm_out.", "out.0.", {}
    yield "conv_out.", "out.2.", {}
    index = 1
    levels = len(config["down_block_types"])
    for level in range(levels):
        for layer in range(layers):
            yield f"down_blocks.{level}.resnets.{layer}.", f"input_blocks.{index}.0.", _RESNET_TO_LDM
            yield f"down_blocks.{level}.attentions.{layer}.", f"input_blocks.{index}.1.", {}
            index += 1
        if level < levels - 1:
            yield f"down_blocks.{level}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", {}
            index += 1
    yield "mid_block.resnets.0.", "middle_block.0.", _RESNET_TO_LDM
    yield "mid_block.attentions.0.", "middle_block.1.", {}
    yield "mid_block.resnets.1.", "middle_block.2.", _RESNET_TO_LDM
    index = 0
    for level, block_type in enumerate(config["up_block_types"]):
        for layer in range(layers + 1):
            yield f"up_blocks.{level}.resnets.{layer}.", f"output_blocks.{index}.0.", _RESNET_TO_LDM
            yield f"up_blocks.{level}.attentions.{layer}.", f"output_blocks.{index}.1.", {}
            if layer == layers and level < levels - 1:
                slot = 2 if block_type.startswith("CrossAttn") else 1
                yield f"up_blocks.{level}.upsamplers.0.", f"output_blocks.{index}.{slot}.", {}
            index += 1


def _vae_prefixes(config: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, str]]]:
    """LDM's VAE counts decoder levels from the bottom, diffusers' from the top."""
    levels = len(config["down_block_types"])
    layers = int(config["layers_per_block"])
    yield "quant_conv.", "quant_conv.", {}
    yield "post_quant_conv.", "post_quant_conv.", {}
    for coder in ("encoder", "decoder"):
        yield f"{coder}.conv_in.", f"{coder}.conv_in.", {}
        yield f"{coder}.conv_out.", f"{coder}.conv_out.", {}
        yield f"{coder}.conv_norm_out.", f"{coder}.norm_out.", {}
        for resnet in range(2):
            yield (f"{coder}.mid_block.resnets.{resnet}.", f"{coder}.mid.block_{resnet + 1}.",
                   _VAE_RESNET_TO_LDM)
        yield f"{coder}.mid_block.attentions.0.", f"{coder}.mid.attn_1.", _VAE_ATTENTION_TO_LDM
    for level in range(levels):
        for layer in range(layers):
            yield (f"encoder.down_blocks.{level}.resnets.{layer}.",
                   f"encoder.down.{level}.block.{layer}.", _VAE_RESNET_TO_LDM)
        yield f"encoder.down_blocks.{level}.downsamplers.0.", f"encoder.down.{level}.downsample.", {}
        ldm_level = levels - 1 - level
        for layer in range(layers + 1):
            yield (f"decoder.up_blocks.{level}.resnets.{layer}.",
                   f"decoder.up.{ldm_level}.block.{layer}.", _VAE_RESNET_TO_LDM)
        yield f"decoder.up_blocks.{level}.upsamplers.0.", f"decoder.up.{ldm_level}.upsample.", {}


def _rename(state: dict[str, torch.Tensor], prefixes: Iterator[tuple[str, str, dict[str, str]]],
            *, what: str) -> dict[str, tuple[str, torch.Tensor, dict[str, str]]]:
    """Each key to (LDM key, tensor, the renames applied); an unmapped key is an error, so a
    diffusers layout change cannot silently drop weights from the file."""
    table = sorted(prefixes, key=lambda entry: len(entry[0]), reverse=True)
    out: dict[str, tuple[str, torch.Tensor, dict[str, str]]] = {}
    for key, tensor in state.items():
        match = next((entry for entry in table if key.startswith(entry[0])), None)
        if match is None:
            raise ValueError(f"no LDM name for {what} key {key!r}")
        source, target, renames = match
        rest = key[len(source):]
        for old, new in renames.items():
            if rest.startswith(old + "."):
                rest = new + rest[len(old):]
                break
        out[key] = (target + rest, tensor, renames)
    return out


def diffusers_to_ldm(unet: dict[str, torch.Tensor], vae: dict[str, torch.Tensor],
                     text_encoder: dict[str, torch.Tensor], *, unet_config: dict[str, Any],
                     vae_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An SD1.x pipeline's state dicts as one checkpoint in the original key layout, the one
    webuis and model sites use (``model.diffusion_model.``, ``first_stage_model.``,
    ``cond_stage_model.transformer.text_model.``).

    The VAE's attention projections are 1x1 convolutions in LDM, linear layers in diffusers,
    so their weights gain two trailing dimensions.
    """
    checkpoint: dict[str, torch.Tensor] = {}
    for ldm_key, tensor, _ in _rename(unet, _unet_prefixes(unet_config), what="UNet").values():
        checkpoint[f"model.diffusion_model.{ldm_key}"] = tensor
    for ldm_key, tensor, renames in _rename(vae, _vae_prefixes(vae_config), what="VAE").values():
        if renames is _VAE_ATTENTION_TO_LDM and ldm_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        checkpoint[f"first_stage_model.{ldm_key}"] = tensor
    for key, tensor in text_encoder.items():
        # transformers >= 5.6 flattened CLIPTextModel; checkpoints keep the older nesting.
        nested = key if key.startswith("text_model.") else f"text_model.{key}"
        checkpoint[f"cond_stage_model.transformer.{nested}"] = tensor
    return {key: tensor.contiguous() for key, tensor in checkpoint.items()}


# --- the build ---------------------------------------------------------------------------------


def write_padded_clip_tokenizer(folder: Path) -> None:
    """A character-level CLIP tokenizer whose ids span CLIP's real 49,408.

    The characters get the low ids, fillers no text can produce take the rest, and the two
    special tokens sit at CLIP's own ids, so the embedding table and the special-token ids
    in the text encoder's config are the real ones.
    """
    from transformers import CLIPTokenizer

    size = write_char_tokenizer(folder)
    vocab: dict[str, int] = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    specials = ("<|startoftext|>", "<|endoftext|>")
    for special in specials:
        del vocab[special]
    for filler in range(size - len(specials), CLIP_VOCAB_SIZE - len(specials)):
        vocab[f"<|filler{filler}|>"] = filler
    for offset, special in enumerate(specials):
        vocab[special] = CLIP_VOCAB_SIZE - len(specials) + offset
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    # Saved through the class so tokenizer_config.json (max length 77, pad token) is there.
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)


def _build_sd15(staging: Path) -> None:
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    started = time.perf_counter()
    torch.manual_seed(REALSIZE_SEED)
    # Each part is drawn in float32 (PyTorch's initialisers), then kept as float16 only.
    unet: Any = UNet2DConditionModel(**SD15_UNET_CONFIG)
    vae: Any = AutoencoderKL(**SD15_VAE_CONFIG)
    text_encoder: Any = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
    for part in (unet, vae, text_encoder):
        part.to(torch.float16)
    built_s = time.perf_counter() - started
    model = RealSizeModel.at(staging, SD15_NAME)
    tokenizer_dir = model.folder / "tokenizer"
    write_padded_clip_tokenizer(tokenizer_dir)
    pipe: Any = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(model.folder, safe_serialization=True)
    checkpoint = diffusers_to_ldm(
        unet.state_dict(), vae.state_dict(), text_encoder.state_dict(),
        unet_config=dict(unet.config), vae_config=dict(vae.config),
    )
    model.single_file.parent.mkdir(parents=True)
    save_file(checkpoint, model.single_file, metadata={"format": "pt"})
    params = {name: sum(p.numel() for p in part.parameters())
              for name, part in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder))}
    folder_bytes = sum(p.stat().st_size for p in model.folder.rglob("*") if p.is_file())
    info = {
        "name": SD15_NAME, "version": _VERSION, "dtype": "float16", "parameters": params,
        "init_s": round(built_s, 2), "build_s": round(time.perf_counter() - started, 2),
        "folder_bytes": folder_bytes, "single_file_bytes": model.single_file.stat().st_size,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    (staging / "build.json").write_text(json.dumps(info, indent=2))


# --- any family at real size, from the component configs shipped in configs/ -------------------

CONFIGS = Path(__file__).parent / "configs"
# Real-size models the benchmark builds: family config folder and the precision on disk
# (what the public weights ship in).
CONFIG_MODELS: dict[str, tuple[str, torch.dtype]] = {
    "sdxl": ("sdxl", torch.float16),
    "flux-dev": ("flux-dev", torch.bfloat16),
    "flux-schnell": ("flux-schnell", torch.bfloat16),
}


def _random_(module: torch.nn.Module, *, dtype: torch.dtype, generator: torch.Generator) -> int:
    """Give a module built on the meta device random weights in ``dtype``; returns the
    parameter count.

    Drawn straight in the target precision, one tensor at a time, so a 12B-parameter Flux
    never exists in float32. Weights get a fan-in scaled normal (activations keep their
    scale through deep stacks), biases zeros, norm scales ones. Buffers were built for real.
    """
    count = 0
    with torch.no_grad():
        for owner in module.modules():
            for name, param in list(owner.named_parameters(recurse=False)):
                if param.ndim >= 2:
                    fan_in = param[0].numel()
                    value = torch.empty(param.shape, dtype=dtype).normal_(
                        0.0, fan_in ** -0.5, generator=generator)
                elif name == "bias":
                    value = torch.zeros(param.shape, dtype=dtype)
                else:
                    value = torch.ones(param.shape, dtype=dtype)
                owner.register_parameter(name, torch.nn.Parameter(value, requires_grad=False))
                count += value.numel()
    module.to(dtype)  # the buffers
    return count


def _component(config: Path, name: str, library: str, class_name: str, *, dtype: torch.dtype,
               generator: torch.Generator, staging: Path) -> tuple[Any, int]:
    """One pipeline component at the size its config says (random weights, real buffers)."""
    from accelerate import init_empty_weights

    folder = config / name
    if library == "transformers" and class_name.startswith("CLIPTokenizer"):
        write_padded_clip_tokenizer(staging / name)
        import transformers

        settings_file = folder / "tokenizer_config.json"
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        overrides = {key: settings[key] for key in ("pad_token", "model_max_length")
                     if key in settings}
        return getattr(transformers, class_name).from_pretrained(staging / name, **overrides), 0
    if library == "transformers" and class_name.startswith("T5Tokenizer"):
        from transformers import T5TokenizerFast  # type: ignore[attr-defined]

        pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
        pieces += [(chr(code), -3.0) for code in range(ord("!"), ord("~") + 1)]
        return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512), 0
    module_lib = __import__(library)
    cls = getattr(module_lib, class_name)
    if "Scheduler" in class_name:
        return cls.from_pretrained(folder), 0
    if library == "diffusers":
        with init_empty_weights():
            model = cls.from_config(cls.load_config(folder))
    else:
        with init_empty_weights():
            model = cls(cls.config_class.from_pretrained(folder))
    return model, _random_(model, dtype=dtype, generator=generator)


def build_from_configs(config: Path, staging: Path, *, dtype: torch.dtype) -> dict[str, int]:
    """A whole pipeline at the sizes of ``config`` (a diffusers folder of configs), saved
    with ``save_pretrained`` into ``staging``; returns parameters per component."""
    import diffusers

    index = json.loads((config / "model_index.json").read_text())
    generator = torch.Generator().manual_seed(REALSIZE_SEED)
    parts: dict[str, Any] = {}
    params: dict[str, int] = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        if entry[0] is None:
            parts[name] = None
            continue
        parts[name], count = _component(config, name, entry[0], entry[1], dtype=dtype,
                                        generator=generator, staging=staging)
        if count:
            params[name] = count
    pipe = getattr(diffusers, index["_class_name"])(**parts)
    pipe.save_pretrained(staging, safe_serialization=True)
    return params


def _build_config_model(staging: Path, *, kind: str) -> None:
    family, dtype = CONFIG_MODELS[kind]
    started = time.perf_counter()
    params = build_from_configs(CONFIGS / family, staging / "diffusers", dtype=dtype)
    folder_bytes = sum(p.stat().st_size for p in (staging / "diffusers").rglob("*") if p.is_file())
    info = {
        "name": f"{kind}-realsize", "version": _VERSION, "dtype": str(dtype).removeprefix("torch."),
        "parameters": params, "build_s": round(time.perf_counter() - started, 2),
        "folder_bytes": folder_bytes,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    (staging / "build.json").write_text(json.dumps(info, indent=2))


def ensure_real_model(kind: str, cache_dir: Path | None = None) -> RealSizeModel:
    """``sd15``, ``sdxl``, ``flux-dev`` or ``flux-schnell`` at real size, built on first use.
    Only SD1.5 also gets a single-file checkpoint (``single_file`` of the others is absent)."""
    if kind == "sd15":
        return ensure_real_sd15(cache_dir)
    if kind not in CONFIG_MODELS:
        raise KeyError(f"no real-size builder for {kind!r}; known: sd15, {', '.join(CONFIG_MODELS)}")
    cache = cache_dir if cache_dir is not None else realsize_cache_dir()
    name = f"{kind}-realsize-v{_VERSION}"
    root = build_into_cache(name, cache, builders={name: partial(_build_config_model, kind=kind)},
                            is_built=_is_built)
    return RealSizeModel.at(root, f"{kind}-realsize")


def _is_built(root: Path) -> bool:
    return (root / "build.json").exists()


def _sd15_root(cache_dir: Path | None) -> Path:
    return (cache_dir if cache_dir is not None else realsize_cache_dir()) / f"{SD15_NAME}-v{_VERSION}"


def find_real_sd15(cache_dir: Path | None = None) -> RealSizeModel | None:
    """The built model, or None; never builds (a caller can build it in a child process)."""
    root = _sd15_root(cache_dir)
    return RealSizeModel.at(root, SD15_NAME) if _is_built(root) else None


def ensure_real_sd15(cache_dir: Path | None = None) -> RealSizeModel:
    """SD1.5 at real size (random float16 weights), built on first use; safe under races."""
    target = _sd15_root(cache_dir)
    root = build_into_cache(target.name, target.parent, builders={target.name: _build_sd15},
                            is_built=_is_built)
    return RealSizeModel.at(root, SD15_NAME)


def main(argv: list[str] | None = None) -> int:
    """Build if needed; print the paths and the build's costs as one JSON object."""
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--model", default="sd15", choices=["sd15", *CONFIG_MODELS])
    args = parser.parse_args(argv)
    started = time.perf_counter()
    model = ensure_real_model(args.model, args.cache_dir)
    report = {"folder": str(model.folder), "single_file": str(model.single_file),
              "ready_s": round(time.perf_counter() - started, 2), "build": model.build_info()}
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
