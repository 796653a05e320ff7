"""The built-in tiny models work through the same diffusers/transformers calls real weights do.

Workers derive img2img, inpainting and ControlNet pipelines from one loaded base with
``from_pipe``; these tests pin down that each family's tiny model supports every such
derivation, and that the ControlNets are not inert (an untrained ControlNet changes nothing,
which would let ControlNet tests pass without testing anything).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from services.models.tiny.diffusion import BUILDERS, ensure_tiny_model
from shared.models import BUILTIN_PRESETS, ControlType

# Raised inside diffusers' own FluxControlNetModel, nothing we can act on.
pytestmark = pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning")

FAMILIES = ("sd15", "sdxl", "flux")
SIZE = 64
STEPS = 2


def _noise_image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _box_edges() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), outline="white", width=2)
    return image


def _stripes() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE))
    draw = ImageDraw.Draw(image)
    for y in range(4, SIZE, 12):
        draw.line((0, y, SIZE - 1, y), fill="white", width=2)
    return image


INIT = _noise_image(1)
OTHER_INIT = _noise_image(2)
# Control images look like what the preprocessors produce: thin white lines on black.
CONTROL = _box_edges()
OTHER_CONTROL = _stripes()
MASK = Image.new("L", (SIZE, SIZE), 0)
MASK.paste(255, (16, 16, 48, 48))
OTHER_MASK = Image.new("L", (SIZE, SIZE), 0)
OTHER_MASK.paste(255, (0, 0, 32, 64))


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every builtin built once for the module, as a worker's cache would hold them."""
    cache = tmp_path_factory.mktemp("tiny-models")
    for name in BUILDERS:
        ensure_tiny_model(name, cache)
    return cache


@pytest.fixture(scope="module")
def bases(tiny_cache: Path) -> dict[str, Any]:
    """One loaded base pipeline per family; derived pipelines share its modules."""
    loaded = {}
    for family in FAMILIES:
        pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_cache / f"tiny-{family}")
        pipe.set_progress_bar_config(disable=True)
        loaded[family] = pipe
    return loaded


def _controlnet(cache: Path, family: str, kind: str) -> Any:
    cls = diffusers.FluxControlNetModel if family == "flux" else diffusers.ControlNetModel
    return cls.from_pretrained(cache / f"tiny-{family}-controlnet-{kind}")


def _derive(auto_cls: Any, base: Any, **components: Any) -> Any:
    pipe = auto_cls.from_pipe(base, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _common(family: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"prompt": "a red fox in snow", "num_inference_steps": STEPS,
                              "height": SIZE, "width": SIZE}
    if family == "flux":
        # The T5 prompt length defaults to 512; FluxControlNetPipeline's guidance defaults to
        # 7.0 but FluxPipeline's to 3.5, so pin it for comparisons across the two.
        kwargs.update(max_sequence_length=32, guidance_scale=3.5)
    return kwargs


def _seeded(family: str, seed: int) -> dict[str, Any]:
    """Seeded inputs that give a ControlNet pipeline the same start noise as its base.

    Flux ControlNet pipelines VAE-encode the control image by *sampling* with the caller's
    generator before drawing the start noise, so the same seed alone gives different noise;
    passing the noise as ``latents`` keeps base and ControlNet runs comparable.
    """
    generator = torch.Generator("cpu").manual_seed(seed)
    if family != "flux":
        return {"generator": generator}
    latent_tokens = (SIZE // 16) ** 2  # VAE /8, then 2x2 patches
    latents = torch.randn((1, latent_tokens, 16), generator=generator)
    return {"generator": generator, "latents": latents}


def _control(family: str, image: Any, *, task: str) -> dict[str, Any]:
    """SD text-to-image ControlNet pipelines take the control image as ``image``; the rest,
    whose ``image`` is the init image, and all Flux ones take ``control_image``."""
    if family != "flux" and task == "txt2img":
        return {"image": image}
    return {"control_image": image}


def _pixels(result: Any) -> np.ndarray:
    image = result.images[0]
    assert image.size == (SIZE, SIZE)
    return np.asarray(image, dtype=np.int16)


def test_every_builtin_source_has_a_builder() -> None:
    sources = set()
    for preset in BUILTIN_PRESETS:
        sources |= {preset.source, preset.inpaint_source or "", *preset.controlnets.values()}
    builtin = {source.removeprefix("builtin:") for source in sources if source.startswith("builtin:")}
    assert builtin, "no builtin presets found"
    assert builtin <= set(BUILDERS), builtin - set(BUILDERS)
    assert "tiny-dpt" in BUILDERS


def test_ensure_reuses_the_cache_and_leaves_no_staging(tiny_cache: Path) -> None:
    for name in ("tiny-sd15", "tiny-sd15-controlnet-canny", "tiny-dpt"):
        marker = next(p for p in (tiny_cache / name / "model_index.json",
                                  tiny_cache / name / "config.json") if p.exists())
        before = marker.stat().st_mtime_ns
        assert ensure_tiny_model(name, tiny_cache) == tiny_cache / name
        assert marker.stat().st_mtime_ns == before
    assert not [p.name for p in tiny_cache.iterdir() if p.name.startswith(".")]
    with pytest.raises(KeyError, match="no builder"):
        ensure_tiny_model("tiny-nonexistent", tiny_cache)


def _weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    (path,) = [p for p in folder.iterdir() if p.suffix == ".safetensors"]
    return load_file(path)


def test_builds_are_byte_identical_and_sd15_is_unchanged(tiny_cache: Path, tmp_path: Path) -> None:
    for name in ("tiny-sd15", "tiny-sdxl-controlnet-depth", "tiny-flux"):
        again = ensure_tiny_model(name, tmp_path)
        for first in (tiny_cache / name).rglob("*.safetensors"):
            assert first.read_bytes() == (again / first.relative_to(tiny_cache / name)).read_bytes()
    # Seeded pixels elsewhere depend on tiny-sd15's exact weights (and so on its build order).
    sd15 = tiny_cache / "tiny-sd15"
    expected = {
        ("unet", "conv_in.weight"): [-0.0012478034, 0.0894072652, -0.1371741891],
        ("vae", "encoder.conv_in.weight"): [-0.0549120940, 0.0126411822, -0.1440446079],
        ("text_encoder", "embeddings.token_embedding.weight"): [-0.0242537204, 0.0092286263, -0.0100486828],
    }
    for (sub, key), values in expected.items():
        got = _weights(sd15 / sub)[key].flatten()[:3].tolist()
        assert got == pytest.approx(values, abs=1e-7), (sub, key)


def test_companions_start_from_their_base_weights(tiny_cache: Path) -> None:
    sd15, inpaint = tiny_cache / "tiny-sd15", tiny_cache / "tiny-sd15-inpaint"
    for sub in ("vae", "text_encoder"):
        ours, theirs = _weights(sd15 / sub), _weights(inpaint / sub)
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    unet, inpaint_unet = _weights(sd15 / "unet"), _weights(inpaint / "unet")
    assert inpaint_unet["conv_in.weight"].shape[1] == 9
    assert torch.equal(inpaint_unet["conv_in.weight"][:, :4], unet["conv_in.weight"])

    unet_zero_convs = ("controlnet_down_blocks.0.weight", "controlnet_mid_block.weight",
                       "controlnet_cond_embedding.conv_out.weight")
    for family, base_sub, shared_prefixes, zero_convs in (
        ("sd15", "unet", ("down_blocks.", "mid_block."), unet_zero_convs),
        ("sdxl", "unet", ("down_blocks.", "mid_block.", "add_embedding."), unet_zero_convs),
        ("flux", "transformer", ("transformer_blocks.", "x_embedder."),
         ("controlnet_blocks.0.weight", "controlnet_single_blocks.0.weight",
          "controlnet_x_embedder.weight")),
    ):
        base = _weights(tiny_cache / f"tiny-{family}" / base_sub)
        nets = {kind: _weights(tiny_cache / f"tiny-{family}-controlnet-{kind.value}")
                for kind in ControlType}
        for net in nets.values():
            shared = [key for key in net if key.startswith(shared_prefixes)]
            assert shared and all(torch.equal(net[key], base[key]) for key in shared), family
            # Zero convolutions left at zero would make the ControlNet a no-op.
            assert all(net[key].abs().max() > 0 for key in zero_convs), family
        # The four control types are four different models.
        assert len({nets[kind][zero_convs[0]].sum().item() for kind in ControlType}) == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_txt2img_is_seeded(bases: dict[str, Any], family: str) -> None:
    base = bases[family]
    expected = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                "flux": "FluxPipeline"}
    assert type(base).__name__ == expected[family]
    first = _pixels(base(**_common(family), generator=torch.Generator("cpu").manual_seed(7)))
    again = _pixels(base(**_common(family), generator=torch.Generator("cpu").manual_seed(7)))
    other = _pixels(base(**_common(family), generator=torch.Generator("cpu").manual_seed(8)))
    assert np.array_equal(first, again)
    assert np.abs(first - other).max() > 10


EXPECTED_DERIVED = {
    "sd15": ("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    "sdxl": ("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    "flux": ("FluxImg2ImgPipeline", "FluxInpaintPipeline"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_img2img_and_base_model_inpainting_from_pipe(bases: dict[str, Any], family: str) -> None:
    img2img = _derive(diffusers.AutoPipelineForImage2Image, bases[family])
    inpaint = _derive(diffusers.AutoPipelineForInpainting, bases[family])
    assert (type(img2img).__name__, type(inpaint).__name__) == EXPECTED_DERIVED[family]

    def run_img2img(init: Image.Image) -> np.ndarray:
        # SD runs int(steps * strength) steps (0 crashes); Flux skips int(steps * (1 - strength))
        # and so starts from pure noise, ignoring the image, above (steps - 1) / steps.
        return _pixels(img2img(**_common(family), image=init, strength=0.5,
                               generator=torch.Generator("cpu").manual_seed(3)))

    assert np.abs(run_img2img(INIT) - run_img2img(OTHER_INIT)).max() > 10

    def run_inpaint(mask: Image.Image) -> np.ndarray:
        return _pixels(inpaint(**_common(family), image=INIT, mask_image=mask, strength=0.9,
                               generator=torch.Generator("cpu").manual_seed(3)))

    assert np.abs(run_inpaint(MASK) - run_inpaint(OTHER_MASK)).max() > 10


def test_dedicated_inpainting_model(tiny_cache: Path) -> None:
    pipe = diffusers.DiffusionPipeline.from_pretrained(tiny_cache / "tiny-sd15-inpaint")
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline"
    assert pipe.unet.config.in_channels == 9

    def run(mask: Image.Image) -> np.ndarray:
        return _pixels(pipe(**_common("sd15"), image=INIT, mask_image=mask,
                            generator=torch.Generator("cpu").manual_seed(4)))

    # The extra input channels carry weight: the mask reaches the UNet, not just the blend.
    assert np.abs(run(MASK) - run(OTHER_MASK)).max() > 10
    controlled = _derive(diffusers.AutoPipelineForInpainting, pipe,
                         controlnet=_controlnet(tiny_cache, "sd15", "canny"))
    assert type(controlled).__name__ == "StableDiffusionControlNetInpaintPipeline"
    _pixels(controlled(**_common("sd15"), image=INIT, mask_image=MASK, control_image=CONTROL,
                       generator=torch.Generator("cpu").manual_seed(4)))


@pytest.mark.parametrize("family", FAMILIES)
def test_controlnet_scale_zero_is_the_base_model(
    tiny_cache: Path, bases: dict[str, Any], family: str,
) -> None:
    base = bases[family]
    pipe = _derive(diffusers.AutoPipelineForText2Image, base,
                   controlnet=_controlnet(tiny_cache, family, "canny"))
    assert "ControlNet" in type(pipe).__name__

    def run(scale: float, control: Image.Image) -> np.ndarray:
        return _pixels(pipe(**_common(family), **_control(family, control, task="txt2img"),
                            controlnet_conditioning_scale=scale, **_seeded(family, 5)))

    plain = _pixels(base(**_common(family), **_seeded(family, 5)))
    assert np.abs(run(0.0, CONTROL) - plain).max() <= 1
    controlled = run(1.0, CONTROL)
    assert np.abs(controlled - plain).max() > 10
    assert np.abs(run(1.0, OTHER_CONTROL) - controlled).max() > 5


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_controlnet_per_control_settings(
    tiny_cache: Path, bases: dict[str, Any], family: str,
) -> None:
    canny, depth = (_controlnet(tiny_cache, family, kind) for kind in ("canny", "depth"))
    single = _derive(diffusers.AutoPipelineForText2Image, bases[family], controlnet=canny)
    multi = _derive(diffusers.AutoPipelineForText2Image, bases[family], controlnet=[canny, depth])
    wrapper = "FluxMultiControlNetModel" if family == "flux" else "MultiControlNetModel"
    assert type(multi.controlnet).__name__ == wrapper

    alone = _pixels(single(**_common(family), **_control(family, CONTROL, task="txt2img"),
                           controlnet_conditioning_scale=1.0, **_seeded(family, 6)))

    def both(depth_start: float) -> np.ndarray:
        return _pixels(multi(
            **_common(family), **_control(family, [CONTROL, OTHER_CONTROL], task="txt2img"),
            controlnet_conditioning_scale=[1.0, 0.7], control_guidance_start=[0.0, depth_start],
            control_guidance_end=[1.0, 1.0], **_seeded(family, 6),
        ))

    # A step runs a ControlNet while start <= i / steps and (i + 1) / steps <= end: starting
    # the second one at 0.99 leaves it out of both steps and the first one's result alone.
    assert np.abs(both(0.99) - alone).max() <= 1
    assert np.abs(both(0.0) - alone).max() > 5


@pytest.mark.parametrize("family", FAMILIES)
def test_controlnet_img2img_and_inpainting_from_pipe(
    tiny_cache: Path, bases: dict[str, Any], family: str,
) -> None:
    net = _controlnet(tiny_cache, family, "scribble")
    img2img = _derive(diffusers.AutoPipelineForImage2Image, bases[family], controlnet=net)
    inpaint = _derive(diffusers.AutoPipelineForInpainting, bases[family], controlnet=[net, net])
    assert "ControlNet" in type(img2img).__name__ and "ControlNet" in type(inpaint).__name__
    _pixels(img2img(**_common(family), image=INIT, strength=0.5,
                    **_control(family, CONTROL, task="img2img"),
                    generator=torch.Generator("cpu").manual_seed(9)))
    # diffusers 0.42's Flux ControlNet img2img/inpaint pipelines build no control modes for
    # several ControlNets unless given one per net (FluxMultiControlNetModel then finds no
    # inputs and fails with UnboundLocalError); None per net means "not a union ControlNet".
    modes = {"control_mode": [None, None]} if family == "flux" else {}
    _pixels(inpaint(**_common(family), image=INIT, mask_image=MASK, strength=0.9,
                    **_control(family, [CONTROL, OTHER_CONTROL], task="inpaint"),
                    controlnet_conditioning_scale=[0.5, 0.5], **modes,
                    generator=torch.Generator("cpu").manual_seed(9)))


def test_depth_estimation_pipeline(tiny_cache: Path) -> None:
    from transformers import pipeline

    estimator = pipeline("depth-estimation", model=str(tiny_cache / "tiny-dpt"))
    photo = _noise_image(4).resize((80, 48))
    result = estimator(photo)
    depth = result["depth"]
    assert isinstance(depth, Image.Image) and depth.size == photo.size
    assert np.asarray(depth).std() > 1  # a map, not a constant
