"""Loading models the way real repositories lay them out: diffusers' safety checker listed in
``model_index.json``, a component folder missing, single-file checkpoints lying beside the
components, half precision asked for on a CPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from services.generator.loras import LoraAdapterCache, LoraFiles
from services.generator.pipelines import PipelineCache
from services.generator.render import PreparedInputs, render
from services.models.tiny.diffusion import ensure_tiny_model
from services.models.weights import weights_hash
from shared.errors import ModelUnavailable
from shared.models import ModelPreset, ModelRegistry
from shared.specs import GenerationSpec


def _copy_tiny_sd15(model_cache: Path, target: Path) -> Path:
    shutil.copytree(ensure_tiny_model("tiny-sd15", model_cache), target)
    return target


def _tiny_safety_checker() -> Any:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 99},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16)
    checker: Any = StableDiffusionSafetyChecker(config)
    return checker.eval()


def _with_safety_checker(folder: Path) -> Path:
    """What real SD1.5 repositories ship: a checker, its feature extractor, both listed."""
    from transformers import CLIPImageProcessor

    _tiny_safety_checker().save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
                       ).save_pretrained(folder / "feature_extractor")
    index = json.loads((folder / "model_index.json").read_text())
    index.update(safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                 feature_extractor=["transformers", "CLIPImageProcessor"],
                 requires_safety_checker=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _cache(tmp_path: Path, **presets: dict[str, Any]) -> PipelineCache:
    registry = ModelRegistry([ModelPreset(name=name, family="sd15", **fields)  # type: ignore[arg-type]
                              for name, fields in presets.items()])
    return PipelineCache(registry=registry, cache_dir=tmp_path / "cache")


def _spec(**overrides: Any) -> GenerationSpec:
    fields: dict[str, Any] = {"prompt": "a fox", "model": "m", "width": 64, "height": 64,
                              "steps": 1, "seed": 1, "guidance_scale": 1.0, **overrides}
    return GenerationSpec(**fields)


def _render(loaded: Any, tmp_path: Path) -> Any:
    return render(loaded, [_spec()], [PreparedInputs()], loras=[],
                  lora_cache=LoraAdapterCache(LoraFiles(tmp_path / "loras")),
                  on_step=lambda _step, _total: None)


def test_a_listed_safety_checker_is_not_loaded_nor_run(
    model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    folder = _with_safety_checker(_copy_tiny_sd15(model_cache, tmp_path / "sd15"))
    loaded = _cache(tmp_path, m={"source": str(folder)}).get("m")
    assert loaded.pipe.safety_checker is None and loaded.pipe.feature_extractor is None
    for mode in ("img2img", "inpaint"):
        assert loaded.pipeline_for(mode).safety_checker is None

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("diffusers' safety checker ran")

    monkeypatch.setattr(StableDiffusionSafetyChecker, "forward", refuse)
    result = _render(loaded, tmp_path)
    assert result.nsfw_content_detected is None
    assert max(result.images[0].convert("L").getdata()) > 0  # not blacked out


def test_a_pipeline_that_still_flags_images_says_so_per_image(
    model_cache: Path, tmp_path: Path,
) -> None:
    """A pipeline that runs diffusers' checker after all (one built elsewhere and handed
    in): its black image is reported, not passed off as a plain success."""
    from transformers import CLIPImageProcessor

    loaded = _cache(tmp_path, m={"source": "builtin:tiny-sd15"}).get("m")
    checker = _tiny_safety_checker()
    checker.concept_embeds_weights.data.fill_(-1.0)  # every image matches a concept
    loaded.pipe.register_modules(
        safety_checker=checker,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 32},
                                             crop_size={"height": 32, "width": 32}))
    result = _render(loaded, tmp_path)
    assert result.nsfw_content_detected == [True]
    assert max(result.images[0].convert("L").getdata()) == 0


def test_a_missing_component_folder_is_named(model_cache: Path, tmp_path: Path) -> None:
    folder = _copy_tiny_sd15(model_cache, tmp_path / "sd15")
    shutil.rmtree(folder / "text_encoder")
    with pytest.raises(ModelUnavailable) as missing:
        _cache(tmp_path, m={"source": str(folder)}).get("m")
    assert "component `text_encoder` of model 'm'" in missing.value.detail
    assert str(folder / "text_encoder") in missing.value.detail

    (folder / "text_encoder").mkdir()
    (folder / "text_encoder" / "config.json").write_text(
        (model_cache / "tiny-sd15" / "text_encoder" / "config.json").read_text())
    with pytest.raises(ModelUnavailable) as no_weights:
        _cache(tmp_path, m={"source": str(folder)}).get("m")
    assert (f"component `text_encoder` of model 'm': no weights in {folder / 'text_encoder'}"
            in no_weights.value.detail)


def test_the_hash_covers_only_the_files_the_pipeline_loads(
    model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = _copy_tiny_sd15(model_cache, tmp_path / "sd15")
    checkpoint = folder / "sd15-full.safetensors"  # a clone's root-level single file
    checkpoint.write_bytes(b"\0" * (8 << 20))
    variant = folder / "unet" / "diffusion_pytorch_model.fp16.safetensors"
    variant.write_bytes(b"\1" * 1024)
    sidecars = tmp_path / "hashes"
    first = weights_hash(folder, sidecars)

    opened: list[Path] = []
    real_open = Path.open

    def recording_open(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode == "rb":  # reading a weight file: the sidecars are text
            opened.append(self)
        return real_open(self, mode, *args, **kwargs)

    checkpoint.write_bytes(b"\2" * (8 << 20))
    variant.write_bytes(b"\3" * 1024)
    monkeypatch.setattr(Path, "open", recording_open)
    assert weights_hash(folder, sidecars) == first
    assert opened == []  # cached by path, size and mtime; the extra files are never read

    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    with real_open(unet, "r+b") as fh:
        fh.seek(-1, 2)
        last = fh.read(1)
        fh.seek(-1, 2)
        fh.write(bytes([last[0] ^ 1]))
    assert weights_hash(folder, sidecars) != first
    assert opened == [unet]


def test_half_precision_on_a_cpu_is_reported(tmp_path: Path) -> None:
    cache = _cache(tmp_path, half={"source": "builtin:tiny-sd15", "dtype": "float16"},
                   auto={"source": "builtin:tiny-sd15"})
    half = cache.get("half").describe()
    assert half["dtype"] == "float32" and half["requested_dtype"] == "float16"
    assert "float16" in half["dtype_note"] and "float32" in half["dtype_note"]
    assert "dtype_note" not in cache.get("auto").describe()


def _wide_sd15(model_cache: Path, target: Path, *, seed: int) -> int:
    """tiny-sd15 with a UNet wide enough (~200 MB as float32) for its memory to show in RSS;
    returns its weight bytes once loaded. Initialised on the meta device and filled with normal noise: the
    default initialisers take seconds for this size."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    _copy_tiny_sd15(model_cache, target)
    unet: Any
    with init_empty_weights():
        unet = UNet2DConditionModel(  # type: ignore[no-untyped-call]
            block_out_channels=(192, 384), layers_per_block=2, sample_size=8, in_channels=4,
            out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
            attention_head_dim=8, norm_num_groups=32)
    unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*unet.parameters(), *unet.buffers()]:
            tensor.normal_(0.0, 0.02, generator=generator)
    shutil.rmtree(target / "unet")
    # Saved in half precision, as hub repositories mostly are: loaded as float32 on a CPU,
    # the weights are then the process's own memory, not pages of the file.
    unet.half().save_pretrained(target / "unet")
    return sum(p.numel() * 4 for p in unet.parameters())


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS")
def test_switching_models_with_one_loaded_holds_one_model(
    model_cache: Path, tmp_path: Path,
) -> None:
    import weakref

    size = _wide_sd15(model_cache, tmp_path / "a", seed=1)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # another preset: loaded on its own
    assert size > 150 << 20
    cache = _cache(tmp_path, a={"source": str(tmp_path / "a")}, b={"source": str(tmp_path / "b")})
    _render(cache.get("a"), tmp_path)  # settles the libraries' one-off allocations
    baseline = _rss_bytes()
    previous: list[weakref.ref[Any]] = []
    for name in ["b", "a", "b"]:
        loaded = cache.get(name)
        assert cache.loaded_names() == [name]
        assert [ref() for ref in previous] == [None] * len(previous), "an evicted pipeline lives"
        previous = [weakref.ref(loaded.pipe), weakref.ref(loaded.pipe.unet),
                    weakref.ref(loaded.pipeline_for("img2img")),
                    weakref.ref(loaded.pipeline_for("inpaint"))]
        if name == "a":
            _render(loaded, tmp_path)
        del loaded
        growth = _rss_bytes() - baseline
        assert growth < size // 2, f"RSS grew {growth >> 20} MB over one loaded model after {name}"
