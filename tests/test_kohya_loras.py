"""kohya (sd-scripts) LoRAs: whatever layers a file adapts, the upload check and the worker agree.

diffusers' kohya conversion only recognises a file whose attention outputs are adapted; a LoRA
of the text encoder's ``q_proj`` alone passed the upload check and then failed every job with
"Could not automatically infer state dict type". Files here are built from the tiny models'
own layers, in sd-scripts' naming (SD1.5: the diffusers module path with "_" for "."; SDXL:
the original sgm UNet's block numbering), with every weight drawn at random: peft starts
``lora_B`` at zero, and a LoRA that changes nothing would prove nothing.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save

from services.gateway.loras.inspection import LoraRejected, inspect_lora
from services.generator.loras import convert_kohya_lora
from services.models.tiny.diffusion import ensure_tiny_model
from tests.conftest import RunningStack
from tests.test_loras_e2e import upload_lora
from tests.test_modes_e2e import BASE, images_of, run

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
UNET_TRANSFORMER = (*UNET_ATTENTION, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
UNET_RESNET = ("conv1", "conv2", "conv_shortcut", "time_emb_proj")
TEXT_ENCODER_ALL = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(model: str, cache: Path) -> Any:
    import diffusers

    pipeline_class = (diffusers.StableDiffusionXLPipeline if model == "tiny-sdxl"
                      else diffusers.StableDiffusionPipeline)
    pipe = pipeline_class.from_pretrained(ensure_tiny_model(model, cache))  # type: ignore[no-untyped-call]
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sgm_name(path: str, layers_per_block: int) -> str:
    """A diffusers UNet module path as kohya names it for SDXL (the sgm UNet's numbering)."""
    parts = path.split(".")
    if parts[0] == "mid_block":  # no block number: mid_block.attentions.0 is middle_block.1
        parts = ["mid_block", "0", *parts[1:]]
    if parts[0] == "down_blocks":
        block, kind, index = int(parts[1]), parts[2], int(parts[3])
        number = 1 + block * (layers_per_block + 1) + index
        head = f"input_blocks.{number}.{1 if kind == 'attentions' else 0}"
    elif parts[0] == "mid_block":
        head = f"middle_block.{1 if parts[2] == 'attentions' else 2 * int(parts[3])}"
    elif parts[0] == "up_blocks":
        block, kind, index = int(parts[1]), parts[2], int(parts[3])
        head = f"output_blocks.{block * (layers_per_block + 1) + index}.{1 if kind == 'attentions' else 0}"
    else:
        raise ValueError(f"no sgm name for {path}")
    return ".".join([head, *parts[4:]])


def kohya_lora(pipe: Any, *, unet: tuple[str, ...] = (), text_encoder: tuple[str, ...] = (),
               text_encoder_2: tuple[str, ...] = (), alpha: float | None = None, rank: int = 4,
               seed: int = 0, sgm: bool = False) -> dict[str, torch.Tensor]:
    """kohya tensors for the layers of ``pipe`` whose paths end in the given names."""
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    te_prefix = "lora_te1" if text_encoder_2 else "lora_te"
    for prefix, component, targets in (("lora_unet", "unet", unet), (te_prefix, "text_encoder", text_encoder),
                                       ("lora_te2", "text_encoder_2", text_encoder_2)):
        if not targets:
            continue
        for path, layer in getattr(pipe, component).named_modules():
            if not isinstance(layer, torch.nn.Linear | torch.nn.Conv2d) or not path.endswith(targets):
                continue
            name = path
            if component == "unet" and sgm:
                name = sgm_name(path, pipe.unet.config.layers_per_block)
            elif component != "unet" and not name.startswith("text_model."):
                name = f"text_model.{name}"  # sd-scripts' spelling, from transformers 4's nesting
            key = f"{prefix}_{name.replace('.', '_')}"
            down_shape: tuple[int, ...]
            up_shape: tuple[int, ...]
            if isinstance(layer, torch.nn.Linear):
                down_shape, up_shape = (rank, layer.in_features), (layer.out_features, rank)
            else:
                down_shape = (rank, layer.in_channels, *layer.kernel_size)
                up_shape = (layer.out_channels, rank, 1, 1)
            fan_in = math.prod(down_shape[1:])
            out[f"{key}.lora_down.weight"] = torch.randn(down_shape, generator=generator) / math.sqrt(fan_in)
            out[f"{key}.lora_up.weight"] = torch.randn(up_shape, generator=generator) / math.sqrt(rank)
            if alpha is not None:
                out[f"{key}.alpha"] = torch.tensor(alpha)
    assert out, "no layer matched"
    return out


def _image(pipe: Any, **kwargs: Any) -> np.ndarray:  # type: ignore[type-arg]
    result = pipe("a quiet harbour", num_inference_steps=2, height=64, width=64,
                  generator=torch.Generator().manual_seed(3), output_type="np", **kwargs)
    return np.asarray(result.images[0])


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl"])
def test_conversion_matches_diffusers_where_diffusers_can(model: str, model_cache: Path) -> None:
    """Where diffusers' own conversion works (a file adapting attention outputs), ours gives the
    same pixels: names, alpha scaling and SDXL's block renumbering agree with it."""
    pipe = _load(model, model_cache)
    sdxl = model == "tiny-sdxl"
    state = kohya_lora(pipe, unet=UNET_TRANSFORMER, text_encoder=TEXT_ENCODER_ALL,
                       text_encoder_2=TEXT_ENCODER_ALL if sdxl else (), alpha=1.0, sgm=sdxl)
    base = _image(pipe)
    pipe.load_lora_weights(copy.deepcopy(state), adapter_name="theirs")
    theirs = _image(pipe)
    pipe.delete_adapters("theirs")
    converted = convert_kohya_lora(state, pipe)
    assert len(converted) == len([key for key in state if not key.endswith(".alpha")])
    pipe.load_lora_weights(converted, adapter_name="ours")
    ours = _image(pipe)
    assert not np.allclose(ours, base, atol=1e-3)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_a_kohya_name_the_model_lacks_is_a_clear_error(model_cache: Path) -> None:
    pipe = _load("tiny-sd15", model_cache)
    state = kohya_lora(pipe, text_encoder=("q_proj",))
    state["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 64)
    state["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(64, 4)
    with pytest.raises(ValueError, match="lora_unet_down_blocks_9_attentions_0_proj_in"):
        convert_kohya_lora(state, pipe)


# ------------------------------------------------------------------ through the real stack

# (name, what the file adapts, whether the upload check must refuse it)
VARIANTS: list[tuple[str, dict[str, Any], bool]] = [
    ("full", {"unet": UNET_TRANSFORMER, "text_encoder": TEXT_ENCODER_ALL, "alpha": 2.0}, False),
    ("te-q-only", {"text_encoder": ("q_proj",)}, False),
    ("te-q-only-alpha", {"text_encoder": ("q_proj",), "alpha": 8.0}, False),
    ("te-no-out-proj", {"text_encoder": ("q_proj", "k_proj", "v_proj"), "alpha": 1.0}, False),
    ("unet-no-to-out", {"unet": ("to_q", "to_k", "to_v")}, False),
    ("unet-no-to-out-alpha", {"unet": ("to_q", "to_k", "to_v"), "alpha": 1.0}, False),
    ("unet-mlp-proj", {"unet": ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")}, False),
    ("unet-resnets", {"unet": UNET_RESNET, "alpha": 2.0}, False),
    ("te-mlp-only", {"text_encoder": ("fc1", "fc2"), "alpha": 2.0}, False),
    ("te-mlp-with-dora", {"text_encoder": ("fc1",), "dora": True}, True),
    ("locon-cp", {"unet": ("to_q",), "lora_mid": True}, True),
    ("stray-tensor", {"text_encoder": ("q_proj",), "stray": True}, True),
]


def _variant_bytes(pipe: Any, seed: int, spec: dict[str, Any]) -> bytes:
    state = kohya_lora(pipe, unet=spec.get("unet", ()), text_encoder=spec.get("text_encoder", ()),
                       alpha=spec.get("alpha"), seed=seed)
    module = next(key for key in state if key.endswith(".lora_down.weight")).split(".")[0]
    if spec.get("dora"):
        for key in [key for key in state if key.endswith(".lora_up.weight")]:
            state[key.replace("lora_up.weight", "dora_scale")] = torch.ones(state[key].shape[0], 1)
    if spec.get("lora_mid"):
        state[f"{module}.lora_mid.weight"] = torch.zeros(4, 4, 3, 3)
    if spec.get("stray"):
        state["emb_params"] = torch.zeros(2, 32)
    return save(state, metadata={"ss_network_module": "networks.lora"})


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_every_kohya_upload_accepted_is_applied(stack: RunningStack, model_cache: Path) -> None:
    """Each variant is either refused at upload (422 naming ``file``) or, when accepted,
    changes the image at weight 1 and reproduces the base exactly at weight 0."""
    pipe = _load("tiny-sd15", model_cache)
    with stack.client() as client:
        base = images_of(run(client, BASE))[0]
        for seed, (name, spec, refused) in enumerate(VARIANTS):
            data = _variant_bytes(pipe, seed, spec)
            upload = upload_lora(client, data, name=f"kohya-{name}")
            if refused:
                assert upload.status_code == 422, (name, upload.text)
                problem = upload.json()
                assert problem["code"] == "not_a_lora" and problem["errors"][0]["field"] == "file"
                with pytest.raises(LoraRejected):
                    inspect_lora(data)
                continue
            assert upload.status_code == 201, (name, upload.text)
            assert upload.json()["format"] == "kohya"
            lora = upload.json()["id"]
            on = run(client, {**BASE, "loras": [{"id": lora, "weight": 1.0}]})
            assert on["status"] == "succeeded", (name, on.get("error"))
            assert not np.array_equal(images_of(on)[0], base), name
            off = run(client, {**BASE, "loras": [{"id": lora, "weight": 0.0}]})
            assert np.array_equal(images_of(off)[0], base), name


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_text_encoder_q_proj_only_lora_over_http(stack: RunningStack, model_cache: Path) -> None:
    """The file from the report, as a client sends it: 201 kohya, then a job that uses it."""
    pipe = _load("tiny-sd15", model_cache)
    data = save(kohya_lora(pipe, text_encoder=("q_proj",), seed=7))
    assert all("out_proj" not in key and key.startswith("lora_te_text_model_encoder_layers_")
               for key in kohya_lora(pipe, text_encoder=("q_proj",)))
    with stack.client() as client:
        upload = upload_lora(client, data, name="te-q-proj")
        assert upload.status_code == 201 and upload.json()["format"] == "kohya", upload.text
        job = run(client, {**BASE, "loras": [{"id": upload.json()["id"]}]})
        assert job["status"] == "succeeded", job.get("error")
        assert job["result"]["loras"][0]["name"] == "te-q-proj"
        assert not np.array_equal(images_of(job)[0], images_of(run(client, BASE))[0])


def test_hand_made_kohya_headers_the_worker_cannot_place_are_refused() -> None:
    """Checked without a model: real SD1.5 widths, zero-filled."""
    from tests.test_loras import safetensors_bytes

    good = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": ("F16", [4, 768]),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": ("F16", [768, 4]),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": ("F32", [])}
    assert inspect_lora(safetensors_bytes(good)).format == "kohya"
    with pytest.raises(LoraRejected, match="lora_mid"):
        inspect_lora(safetensors_bytes({**good, "lora_unet_x.lora_mid.weight": ("F16", [4, 4, 3, 3]),
                                        "lora_unet_x.lora_down.weight": ("F16", [4, 320, 1, 1]),
                                        "lora_unet_x.lora_up.weight": ("F16", [320, 4, 1, 1])}))
    with pytest.raises(LoraRejected, match="bundle_emb"):
        inspect_lora(safetensors_bytes({**good, "bundle_emb.style.string_to_param.*": ("F16", [1, 768])}))
