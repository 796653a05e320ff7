"""Tiny models with random weights, built from configs, for tests, the demo and benchmarks.

They are saved with ``save_pretrained`` into the model cache once and then loaded through
the same ``from_pretrained`` path as real weights, so the code under test is the real one.
Shapes follow diffusers' own pipeline tests; the VAEs have four blocks so their scale factor
is 8 like real SD (ControlNet's conditioning embedding and Flux's 2x2 latent packing rely on
it). The CLIP tokenizer is byte-level BPE with no merges and the T5 one a unigram model over
single characters: every character is a token, which is all a random-weight encoder needs.

Every builder seeds torch itself, so a model is the same bytes on every machine and run; the
companions of a base model (its inpainting variant, its ControlNets) start from the very same
base weights, as real ones are fine-tuned from their base.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from services.models.cache import build_into_cache
from services.models.tokenizers import bytes_to_unicode
from shared.models import ControlType

TINY_SEED = 0
# Distinct seeds per control type so a family's four ControlNets are four different models.
_CONTROL_SEEDS = {kind: TINY_SEED + 1 + index for index, kind in enumerate(ControlType)}
_INPAINT_SEED = TINY_SEED + 100
# A folder holding either file is a whole model: builds land in the cache by one atomic rename.
_ROOT_FILES = ("model_index.json", "config.json")


def write_char_tokenizer(folder: Path) -> int:
    """Write a CLIP tokenizer (vocab.json + merges.txt) to ``folder``; returns vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for symbol in symbols + [s + "</w>" for s in symbols]:
        vocab[symbol] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return len(vocab)


def _save(model: Any, target: Path) -> None:
    model.save_pretrained(target, safe_serialization=True)


def _clip_text(folder: Path, *, with_projection: bool = False) -> tuple[Any, Any]:
    """A char-level CLIP tokenizer written to ``folder`` and a 32-wide text encoder for it.

    SDXL's second encoder and Flux's pooled prompt need the projection head's output, the
    other uses need only the hidden states; the config is the same either way.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab_size = write_char_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    config = CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=vocab_size, max_position_embeddings=77, projection_dim=32,
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
    )
    model_cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return tokenizer, model_cls(config)


def _t5_text() -> tuple[Any, Any]:
    """A T5 tokenizer and encoder with no sentencepiece model file (none ships offline).

    transformers 5's T5Tokenizer is the ``tokenizers``-backed one (T5TokenizerFast is an alias
    of it) and takes its unigram vocabulary as a list. The list follows T5's layout (pad, eos,
    unk first) so the special-token ids the encoder config names are the real ones.
    """
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(code), -3.0) for code in range(ord("!"), ord("~") + 1)]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    encoder = T5EncoderModel(T5Config(
        vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
    ))
    return tokenizer, encoder


def _sd_vae(**overrides: Any) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 32, 32), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4, norm_num_groups=8, sample_size=64, **overrides,
    )


def _euler_scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1,
    )


def tiny_sd15_unet() -> Any:
    """The tiny-sd15 UNet; seeding here is what makes its ControlNets match the saved model."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(TINY_SEED)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=32,
    )


def tiny_sdxl_unet() -> Any:
    """The tiny-sdxl UNet: two 32-wide encoders give 64-wide cross attention.

    The added "text_time" embedding takes SDXL's six micro-conditioning numbers (original
    size, crop, target size), each embedded 8 wide, plus the second encoder's 32-wide
    projected prompt: 6 * 8 + 32.
    """
    from diffusers import UNet2DConditionModel

    torch.manual_seed(TINY_SEED)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32, norm_num_groups=32,
    )


def tiny_flux_transformer() -> Any:
    """The tiny-flux transformer; 16 input channels are 2x2 patches of 4 latent channels.

    The rope axes (4 + 4 + 8) must add up to the 16-wide attention heads. Guidance is
    embedded, like FLUX.1-dev, so ``guidance_scale`` changes the output.
    """
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(TINY_SEED)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8], guidance_embeds=True,
    )


def _sd15_components(target: Path) -> dict[str, Any]:
    """tiny-sd15's parts; this creation order is part of its weights, keep it."""
    unet = tiny_sd15_unet()
    vae = _sd_vae()
    tokenizer, text_encoder = _clip_text(target / "tokenizer")
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": _euler_scheduler()}


def _save_tiny_sd15(target: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **_sd15_components(target), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    _save(pipe, target)


def _with_inpaint_inputs(unet: Any) -> Any:
    """Widen a UNet to 9 inputs (latents, mask, masked-image latents) as SD-inpainting was.

    The base weights are kept; the 5 new input channels get small random weights rather
    than zeros, so the mask and the masked image do reach the output of an untrained model.
    """
    from diffusers import UNet2DConditionModel

    config = {**unet.config, "in_channels": 9}
    widened = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    base = state["conv_in.weight"]
    generator = torch.Generator().manual_seed(_INPAINT_SEED)
    extra = torch.randn((base.shape[0], 5, *base.shape[2:]), generator=generator) * base.std()
    state["conv_in.weight"] = torch.cat([base, extra], dim=1)
    widened.load_state_dict(state)
    return widened


def _save_tiny_sd15_inpaint(target: Path) -> None:
    from diffusers import StableDiffusionInpaintPipeline

    parts = _sd15_components(target)
    parts["unet"] = _with_inpaint_inputs(parts["unet"])
    pipe = StableDiffusionInpaintPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    _save(pipe, target)


def _save_tiny_sdxl(target: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    unet = tiny_sdxl_unet()
    vae = _sd_vae()
    tokenizer, text_encoder = _clip_text(target / "tokenizer")
    tokenizer_2, text_encoder_2 = _clip_text(target / "tokenizer_2", with_projection=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=_euler_scheduler(),
    )
    _save(pipe, target)


def _save_tiny_flux(target: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = tiny_flux_transformer()
    # Flux's VAE has no quant convs and shifts its latents; the numbers are FLUX.1's.
    vae = _sd_vae(use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                  shift_factor=0.1159)
    tokenizer, text_encoder = _clip_text(target / "tokenizer")
    tokenizer_2, text_encoder_2 = _t5_text()
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )
    _save(pipe, target)


def _reinit(modules: Iterable[torch.nn.Module], generator: torch.Generator, *,
            std: float | None = None) -> None:
    """Draw fresh weights; ``std=None`` is He initialisation, which keeps activations' scale
    through a stack of convolutions so the input image still shows at the end of it."""
    with torch.no_grad():
        for module in modules:
            for param in module.parameters():
                if std is None:
                    scale = (2.0 / param[0].numel()) ** 0.5 if param.ndim > 1 else 0.0
                else:
                    scale = std
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _save_unet_controlnet(target: Path, *, unet_factory: Callable[[], Any], kind: ControlType) -> None:
    """A ControlNet as training would leave it: the UNet's encoder copied, the rest learnt.

    ControlNets start with zero output convolutions so training begins from the base model;
    untrained, one would change nothing and tests of "the control image matters" would pass
    without checking anything. So the zero convolutions get small random weights, and the
    hint encoder weights big enough that the control image, not only the ControlNet's
    presence, moves the output.
    """
    from diffusers import ControlNetModel

    unet = unet_factory()
    seed = _CONTROL_SEEDS[kind]
    torch.manual_seed(seed)
    # Four stride-2 stages in the hint encoder: control images are 8x the latents, as in SD.
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32, 32))
    generator = torch.Generator().manual_seed(seed)
    hint = controlnet.controlnet_cond_embedding
    _reinit([hint.conv_in, hint.blocks], generator)
    _reinit([hint.conv_out], generator, std=0.5)
    _reinit([controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block], generator, std=0.05)
    _save(controlnet, target)


def _save_flux_controlnet(target: Path, *, kind: ControlType) -> None:
    """A Flux ControlNet over the tiny transformer's first blocks; see the UNet one for why
    its zero-initialised layers are randomised."""
    from diffusers import FluxControlNetModel

    transformer = tiny_flux_transformer()
    seed = _CONTROL_SEEDS[kind]
    torch.manual_seed(seed)
    controlnet = FluxControlNetModel.from_transformer(
        transformer, num_layers=1, num_single_layers=1,
        attention_head_dim=transformer.config.attention_head_dim,
        num_attention_heads=transformer.config.num_attention_heads,
    )
    generator = torch.Generator().manual_seed(seed)
    _reinit([controlnet.controlnet_x_embedder], generator, std=0.15)
    _reinit([controlnet.controlnet_blocks, controlnet.controlnet_single_blocks], generator, std=0.05)
    _save(controlnet, target)


def _save_tiny_dpt(target: Path) -> None:
    """A depth estimator for the built-in depth preprocessor, loadable by ``pipeline()``.

    The image processor is saved next to the model so ``pipeline("depth-estimation",
    model=folder)`` finds both offline, as it does for a hub snapshot.
    """
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessorPil

    torch.manual_seed(TINY_SEED)
    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
        image_size=64, patch_size=8, backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[16, 16, 32, 32], fusion_hidden_size=16, use_auxiliary_head=False,
    )
    DPTForDepthEstimation(config).save_pretrained(target)
    DPTImageProcessorPil(
        size={"height": 64, "width": 64}, keep_aspect_ratio=False, ensure_multiple_of=8,
    ).save_pretrained(target)


BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-sd15": _save_tiny_sd15,
    "tiny-sd15-inpaint": _save_tiny_sd15_inpaint,
    "tiny-sdxl": _save_tiny_sdxl,
    "tiny-flux": _save_tiny_flux,
    "tiny-dpt": _save_tiny_dpt,
}
for _kind in ControlType:
    BUILDERS[f"tiny-sd15-controlnet-{_kind.value}"] = partial(
        _save_unet_controlnet, unet_factory=tiny_sd15_unet, kind=_kind)
    BUILDERS[f"tiny-sdxl-controlnet-{_kind.value}"] = partial(
        _save_unet_controlnet, unet_factory=tiny_sdxl_unet, kind=_kind)
    BUILDERS[f"tiny-flux-controlnet-{_kind.value}"] = partial(_save_flux_controlnet, kind=_kind)


def _is_built(target: Path) -> bool:
    return any((target / name).exists() for name in _ROOT_FILES)


def ensure_tiny_model(name: str, cache_dir: Path) -> Path:
    """Build ``name`` into the cache unless it is there; safe when several workers race."""
    return build_into_cache(name, cache_dir, builders=BUILDERS, is_built=_is_built)
