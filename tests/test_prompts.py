"""Webui prompt weighting and long prompts: the parser, and encoding on tiny SD1.5 and SDXL models.

The tiny models' tokenizer is character-level, so a 200-character prompt is 200 tokens: three
75-token chunks, well past the 77 that diffusers keeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from services.generator.prompts import (
    BREAK,
    encode_prompts,
    needs_custom_encoding,
    parse_prompt_weights,
    supports_prompt_weighting,
)
from services.models.tiny.diffusion import ensure_tiny_model

R = 1.1
S = 1 / 1.1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a cat", [("a cat", 1.0)]),
        ("", [("", 1.0)]),
        ("a (word) b", [("a ", 1.0), ("word", R), (" b", 1.0)]),
        ("((word))", [("word", R * R)]),
        ("(((word)))", [("word", R ** 3)]),
        ("[word]", [("word", S)]),
        ("[[word]]", [("word", S * S)]),
        ("(word:1.3)", [("word", 1.3)]),
        ("(a:0.5)", [("a", 0.5)]),
        ("(a:.5) (b:2)", [("a", 0.5), (" ", 1.0), ("b", 2.0)]),
        ("(a:-1)", [("a", -1.0)]),
        ("( a : 1.5 )", [(" a ", 1.5)]),
        ("((a:2) b)", [("a", 2 * R), (" b", R)]),
        ("[(a:1.5) b]", [("a", 1.5 * S), (" b", S)]),
        ("[(a)]", [("a", R * S)]),
        ("a (b:1.0) c", [("a b c", 1.0)]),
        ("(a) (b)", [("a", R), (" ", 1.0), ("b", R)]),
        ("(a)(b)", [("ab", R)]),
        # escapes are literal brackets (and an escaped backslash is one backslash)
        (r"\(a\) \[b\]", [("(a) [b]", 1.0)]),
        (r"(a \(b\))", [("a (b)", R)]),
        (r"a\\b", [("a\\b", 1.0)]),
        (r"a\b", [("a\\b", 1.0)]),
        # malformed input is text, as in webui
        ("(a:x)", [("a:x", R)]),
        ("a:b", [("a:b", 1.0)]),
        ("(a:1.2.3)", [("a:1.2.3", R)]),
        ("a)", [("a)", 1.0)]),
        ("a] b", [("a] b", 1.0)]),
        ("b:1.5)", [("b:1.5)", 1.0)]),
        ("(a", [("a", R)]),
        ("x (a [b", [("x ", 1.0), ("a ", R), ("b", R * S)]),
        # BREAK: a keyword only in capitals and as a whole word; it eats the spaces around it
        ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
        ("a BREAK BREAK b", [("a", 1.0), BREAK, BREAK, ("b", 1.0)]),
        ("(a BREAK b)", [("a", R), BREAK, ("b", R)]),
        ("BREAK", [BREAK]),
        ("a break b aBREAK", [("a break b aBREAK", 1.0)]),
    ],
)
def test_parse_prompt_weights(text: str, expected: list[tuple[str, float]]) -> None:
    parsed = parse_prompt_weights(text)
    assert [t for t, _ in parsed] == [t for t, _ in expected]
    assert [w for _, w in parsed] == pytest.approx([w for _, w in expected])


# --- encoding ------------------------------------------------------------------------------

LONG = "abcdefghijklmnopqrstuvwxy" * 8  # 200 characters, no spaces: 200 tokens


@pytest.fixture(scope="module")
def sd15(model_cache: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(ensure_tiny_model("tiny-sd15", model_cache))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl(model_cache: Path) -> Any:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(ensure_tiny_model("tiny-sdxl", model_cache))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe: Any, embeds: dict[str, torch.Tensor] | None = None, *, output_type: str = "np", **kwargs: Any,
) -> np.ndarray[Any, Any]:
    """Two seeded steps; ``output_type="latent"`` skips the VAE, the slow part on a busy CPU."""
    steps: list[int] = []

    def on_step_end(_pipe: Any, step: int, _timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        steps.append(step)
        return tensors

    with torch.inference_mode():
        images = pipe(
            **(embeds or {}), **kwargs, width=64, height=64, num_inference_steps=2, output_type=output_type,
            generator=torch.Generator("cpu").manual_seed(1), callback_on_step_end=on_step_end,
        ).images
    assert steps == [0, 1]
    return np.asarray(images)


def test_needs_custom_encoding(sd15: Any) -> None:
    tokenizer = sd15.tokenizer
    assert not needs_custom_encoding("a red fox", "blurry", tokenizer)
    assert not needs_custom_encoding("a red fox :) ]", "", tokenizer)
    assert not needs_custom_encoding("x" * 75, "", tokenizer)
    assert needs_custom_encoding("x" * 76, "", tokenizer)
    assert needs_custom_encoding("a fox", "x" * 76, tokenizer)
    assert needs_custom_encoding("a (fox)", "", tokenizer)
    assert needs_custom_encoding("a fox", "[blurry]", tokenizer)
    assert needs_custom_encoding(r"a \(fox\)", "", tokenizer)
    assert needs_custom_encoding("a BREAK fox", "", tokenizer)


def test_sd15_plain_prompt_matches_diffusers(sd15: Any) -> None:
    ours = encode_prompts(sd15, prompt="a red fox in snow", negative_prompt="blurry", num_images=2)
    assert set(ours) == {"prompt_embeds", "negative_prompt_embeds"}
    theirs = sd15.encode_prompt("a red fox in snow", "cpu", 2, True, "blurry")
    for mine, reference in zip((ours["prompt_embeds"], ours["negative_prompt_embeds"]), theirs, strict=True):
        assert mine.shape == reference.shape == (2, 77, 32)
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=0)


def test_sd15_long_prompt_keeps_its_tail(sd15: Any) -> None:
    kwargs = encode_prompts(sd15, prompt=LONG, negative_prompt="", num_images=1)
    assert kwargs["prompt_embeds"].shape == (1, 3 * 77, 32)
    assert kwargs["negative_prompt_embeds"].shape == (1, 3 * 77, 32)  # padded for CFG
    image = generate(sd15, kwargs)
    assert image.shape == (1, 64, 64, 3)

    changed = LONG[:150] + "Z" + LONG[151:]
    latents = generate(sd15, kwargs, output_type="latent")
    changed_latents = generate(sd15, encode_prompts(sd15, prompt=changed, negative_prompt="", num_images=1),
                               output_type="latent")
    assert not np.allclose(latents, changed_latents, atol=1e-4)
    # ...while diffusers' own encoding truncates at 77 tokens and cannot see the change.
    truncated, _ = sd15.encode_prompt(LONG, "cpu", 1, False)
    assert torch.equal(truncated, sd15.encode_prompt(changed, "cpu", 1, False)[0])


def test_sd15_negative_longer_than_prompt_and_no_cfg(sd15: Any) -> None:
    kwargs = encode_prompts(sd15, prompt="(fox:1.2)", negative_prompt=LONG, num_images=2)
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape == (2, 3 * 77, 32)
    assert generate(sd15, kwargs, output_type="latent", guidance_scale=1.0).shape == (2, 4, 8, 8)


def test_sd15_break_starts_a_new_chunk(sd15: Any) -> None:
    broken = encode_prompts(sd15, prompt="a fox BREAK snow", negative_prompt="", num_images=1)
    assert broken["prompt_embeds"].shape == (1, 2 * 77, 32)
    second = encode_prompts(sd15, prompt="snow", negative_prompt="", num_images=1)["prompt_embeds"]
    torch.testing.assert_close(broken["prompt_embeds"][:, 77:], second)
    assert encode_prompts(sd15, prompt="a BREAK BREAK b", negative_prompt="", num_images=1)[
        "prompt_embeds"].shape == (1, 3 * 77, 32)
    # weighted text that merely spells the keyword is text, not a break
    spelled = encode_prompts(sd15, prompt="(BRE:-1)(AK:-1)", negative_prompt="", num_images=1)
    assert spelled["prompt_embeds"].shape == (1, 77, 32)


def test_sd15_weights(sd15: Any) -> None:
    def embeds(prompt: str) -> torch.Tensor:
        return encode_prompts(sd15, prompt=f"a {prompt} in snow", negative_prompt="", num_images=1)[
            "prompt_embeds"]

    plain = embeds("fox")
    assert torch.equal(embeds("(fox:1.0)"), plain)
    weighted = embeds("(fox:1.5)")
    assert not torch.allclose(weighted, plain, atol=1e-4)
    # webui's method: emphasis redistributes, the chunk's mean stays where it was
    assert weighted.mean().item() == pytest.approx(plain.mean().item(), abs=1e-6)
    assert not torch.allclose(embeds("[fox]"), plain, atol=1e-4)


def test_sdxl_plain_prompt_matches_diffusers(sdxl: Any) -> None:
    ours = encode_prompts(sdxl, prompt="a red fox in snow", negative_prompt="blurry", num_images=2)
    theirs = sdxl.encode_prompt("a red fox in snow", device="cpu", num_images_per_prompt=2,
                                do_classifier_free_guidance=True, negative_prompt="blurry")
    names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
             "negative_pooled_prompt_embeds")
    assert set(ours) == set(names)
    for name, reference in zip(names, theirs, strict=True):
        assert ours[name].shape == reference.shape
        torch.testing.assert_close(ours[name], reference, atol=1e-5, rtol=0)


def test_sdxl_long_weighted_prompt(sdxl: Any) -> None:
    kwargs = encode_prompts(sdxl, prompt="(fox:1.4) " + LONG, negative_prompt="[blurry]", num_images=1)
    assert kwargs["prompt_embeds"].shape == kwargs["negative_prompt_embeds"].shape == (1, 3 * 77, 64)
    assert kwargs["pooled_prompt_embeds"].shape == kwargs["negative_pooled_prompt_embeds"].shape == (1, 32)
    image = generate(sdxl, kwargs)
    assert image.shape == (1, 64, 64, 3)

    changed = encode_prompts(sdxl, prompt="(fox:1.4) " + LONG[:150] + "Z" + LONG[151:],
                             negative_prompt="[blurry]", num_images=1)
    assert not torch.equal(changed["prompt_embeds"][:, 2 * 77:], kwargs["prompt_embeds"][:, 2 * 77:])
    torch.testing.assert_close(changed["prompt_embeds"][:, :2 * 77], kwargs["prompt_embeds"][:, :2 * 77])

    plain = encode_prompts(sdxl, prompt="fox", negative_prompt="", num_images=1)["prompt_embeds"]
    assert torch.equal(encode_prompts(sdxl, prompt="(fox:1.0)", negative_prompt="",
                                      num_images=1)["prompt_embeds"], plain)
    assert not torch.allclose(encode_prompts(sdxl, prompt="(fox:1.5)", negative_prompt="",
                                             num_images=1)["prompt_embeds"], plain, atol=1e-4)


def test_flux_is_not_weighted(model_cache: Path, sd15: Any, sdxl: Any) -> None:
    from diffusers import FluxPipeline

    flux = FluxPipeline.from_pretrained(ensure_tiny_model("tiny-flux", model_cache))
    assert supports_prompt_weighting(sd15) and supports_prompt_weighting(sdxl)
    assert not supports_prompt_weighting(flux)
    with pytest.raises(TypeError, match="SD1.5 and SDXL"):
        encode_prompts(flux, prompt="(fox:1.2)", negative_prompt="", num_images=1)
