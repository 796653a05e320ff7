"""Models as people have them: a webui-style models folder (diffusers folders and single-file
checkpoints in the original key layout), `GET /v1/models`, the CLIP tokenizer built from
OpenAI's BPE file, and `loomis loras import` of a webui LoRA folder."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from services.models.tokenizers import CLIP_VOCAB_SIZE, clip_vocab_from_bpe
from shared.modelfiles import NotAModel, checkpoint_family, scan_models_dir
from shared.models import ModelFamily, ModelRegistry, PresetOrigin
from tests.conftest import RunningStack, S3Server, launch_stack, wait_terminal
from tests.lora_files import make_lora, make_pickle_lora


def _fake_checkpoint(path: Path, keys: list[str]) -> Path:
    """A valid safetensors file with the given tensor names (one float each): the header is
    all the scan reads."""
    save_file({key: np.zeros(1, dtype=np.float32) for key in keys}, str(path))
    return path


SD15_KEYS = ["model.diffusion_model.input_blocks.0.0.weight",
             "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",
             "first_stage_model.decoder.conv_in.weight"]
SDXL_KEYS = ["model.diffusion_model.input_blocks.0.0.weight",
             "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
             "conditioner.embedders.1.model.text_projection"]
FLUX_KEYS = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
             "guidance_in.in_layer.weight"]
COMFY_FLUX_KEYS = [f"model.diffusion_model.{key}" for key in FLUX_KEYS[:2]]
SD2_KEYS = ["model.diffusion_model.input_blocks.0.0.weight",
            "cond_stage_model.model.token_embedding.weight"]


def test_family_is_read_from_the_header(tmp_path: Path) -> None:
    cases = {"sd15": (SD15_KEYS, ModelFamily.SD15), "sdxl": (SDXL_KEYS, ModelFamily.SDXL),
             "flux": (FLUX_KEYS, ModelFamily.FLUX), "comfy": (COMFY_FLUX_KEYS, ModelFamily.FLUX)}
    for name, (keys, family) in cases.items():
        assert checkpoint_family(_fake_checkpoint(tmp_path / f"{name}.safetensors", keys)) == family
    with pytest.raises(NotAModel, match="Stable Diffusion 2"):
        checkpoint_family(_fake_checkpoint(tmp_path / "sd2.safetensors", SD2_KEYS))
    with pytest.raises(NotAModel, match="LoRA"):
        checkpoint_family(_fake_checkpoint(
            tmp_path / "lora.safetensors", ["lora_unet_down_blocks_0_attn1_to_q.lora_down.weight"]))
    (tmp_path / "model.ckpt").write_bytes(b"PK\x03\x04")
    with pytest.raises(NotAModel, match="pickle"):
        checkpoint_family(tmp_path / "model.ckpt")


def test_scan_finds_folders_and_files_and_skips_the_rest(tmp_path: Path) -> None:
    models = tmp_path / "Stable-diffusion"
    (models / "my-sdxl").mkdir(parents=True)  # a diffusers folder: model_index.json says what
    (models / "my-sdxl" / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet"]}))
    _fake_checkpoint(models / "dreamshaper_8.safetensors", SD15_KEYS)
    _fake_checkpoint(models / "flux1-dev.safetensors", FLUX_KEYS)
    _fake_checkpoint(models / "sd2.safetensors", SD2_KEYS)  # refused: SD2
    (models / "broken.safetensors").write_bytes(b"\x05\x00\x00\x00")  # refused: not safetensors
    (models / "dreamshaper_8.png").write_bytes(b"preview")  # a webui preview image
    (models / "not-a-model").mkdir()

    found = {name: (family, path.name) for name, family, path in scan_models_dir(models)}
    assert found == {"my-sdxl": (ModelFamily.SDXL, "my-sdxl"),
                     "dreamshaper_8": (ModelFamily.SD15, "dreamshaper_8.safetensors"),
                     "flux1-dev": (ModelFamily.FLUX, "flux1-dev.safetensors")}

    registry = ModelRegistry.load(models_dir=models)
    preset = registry.get("dreamshaper_8")
    assert preset is not None and preset.family == ModelFamily.SD15
    assert preset.source == str((models / "dreamshaper_8.safetensors").resolve())
    assert preset.lora_widths == registry.get("sd15").lora_widths  # type: ignore[union-attr]
    assert registry.origins["dreamshaper_8"] == PresetOrigin.MODELS_DIR
    assert registry.origins["tiny-sd15"] == PresetOrigin.BUILTIN


def test_models_file_overrides_a_scanned_preset(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    _fake_checkpoint(models / "mine.safetensors", SD15_KEYS)
    models_file = tmp_path / "models.toml"
    models_file.write_text(f'[[models]]\nname = "mine"\nfamily = "sd15"\n'
                           f'source = "{models / "mine.safetensors"}"\ndefault_steps = 12\n')
    registry = ModelRegistry.load(models_file, models)
    assert registry.get("mine").limits.default_steps == 12  # type: ignore[union-attr]
    assert registry.origins["mine"] == PresetOrigin.MODELS_FILE


def test_hostile_entries_are_skipped_and_the_listing_stays_sendable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Each of these once stopped the gateway from starting (a RecursionError escaping the
    scan, a FIFO blocking it forever) or made GET /v1/models — and every 'unknown model'
    422, which lists the names — a 500 (a file name that is not UTF-8 cannot be encoded)."""
    import os

    from services.gateway.models.schemas import WeightsFormat
    from services.gateway.models.service import list_models

    models = tmp_path / "models"
    models.mkdir()
    (models / "deep").mkdir()
    (models / "deep" / "model_index.json").write_text("[" * 100_000 + "]" * 100_000)
    os.mkfifo(models / "fifo.safetensors")
    (models / "devzero.safetensors").symlink_to("/dev/zero")
    for name in (os.fsdecode(b"bad\xff.safetensors"), "ctl\x01.safetensors", "two\nlines.safetensors"):
        _fake_checkpoint(models / name, SD15_KEYS)
    (models / "twin").mkdir()  # a folder and a file with the same stem: one preset, said so
    (models / "twin" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    _fake_checkpoint(models / "twin.safetensors", SD15_KEYS)
    _fake_checkpoint(models / "UPPER.SAFETENSORS", SD15_KEYS)
    (models / "dir.safetensors").mkdir()  # a diffusers folder whose name ends in .safetensors
    (models / "dir.safetensors" / "model_index.json").write_text(
        '{"_class_name": "StableDiffusionPipeline"}')
    _fake_checkpoint(models / "tiny-sd15.safetensors", SD15_KEYS)

    with caplog.at_level("WARNING"):
        registry = ModelRegistry.load(models_dir=models)
    scanned = {name for name, origin in registry.origins.items()
               if origin == PresetOrigin.MODELS_DIR}
    assert scanned == {"twin", "UPPER", "dir.safetensors", "tiny-sd15"}
    assert registry.get("twin").source.endswith("twin")  # type: ignore[union-attr]
    log = caplog.text
    for said in ("'deep'", "'fifo.safetensors'", "not a regular file", "'bad?.safetensors'",
                 "'ctl?.safetensors'", "'two?lines.safetensors'", "not UTF-8",
                 "'twin' in the same folder is already the preset 'twin'",
                 "replaces the built-in preset 'tiny-sd15'"):
        assert said in log, said

    page = list_models(registry=registry, model_cache=tmp_path, default_model="tiny-sd15")
    page.model_dump_json()  # every name and source encodes
    shown = {model.name: (model.format, model.weights_present) for model in page.items}
    assert shown["UPPER"] == (WeightsFormat.SINGLE_FILE, True)
    assert shown["dir.safetensors"] == (WeightsFormat.DIFFUSERS_FOLDER, True)


def _synthetic_bpe() -> str:
    """A file shaped like CLIP's bpe_simple_vocab_16e6.txt: a version line, then merges."""
    merges = [f"t{i} x{i}" for i in range(CLIP_VOCAB_SIZE - 2 * 256 - 2)]
    return "\n".join(["#version: 0.2", *merges, "unused merge"]) + "\n"


def test_clip_vocab_follows_openai_simple_tokenizer() -> None:
    vocab, merges = clip_vocab_from_bpe(_synthetic_bpe())
    assert len(vocab) == CLIP_VOCAB_SIZE and len(set(vocab.values())) == CLIP_VOCAB_SIZE
    # Ids as real CLIP has them: printable bytes first ("!" is 0, "a" 64, "a</w>" 320),
    # merges after the 512 byte tokens, the two special tokens last.
    assert vocab["!"] == 0 and vocab["a"] == 64 and vocab["a</w>"] == 320
    assert vocab["t0x0"] == 512
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert merges[0] == "t0 x0" and "unused merge" not in merges
    with pytest.raises(ValueError, match="not CLIP's BPE"):
        clip_vocab_from_bpe("#version\na b\n")


# --------------------------------------------------------------------------- end to end


def _ldm_checkpoint(folder: Path, target: Path) -> Path:
    """The tiny SD1.5 as one file in the original (webui) key layout."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file as save_torch

    from services.generator.realsize import diffusers_to_ldm

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    checkpoint = diffusers_to_ldm(pipe.unet.state_dict(), pipe.vae.state_dict(),
                                  pipe.text_encoder.state_dict(),
                                  unet_config=dict(pipe.unet.config),
                                  vae_config=dict(pipe.vae.config))
    save_torch(checkpoint, str(target))
    return target


@pytest.fixture(scope="module")
def models_stack(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server,
                 model_cache: Path) -> Iterator[RunningStack]:
    """A stack whose gateway and generator see a models folder and a models file."""
    from services.models.tiny.diffusion import ensure_tiny_model

    tmp = tmp_path_factory.mktemp("models-stack")
    tiny = ensure_tiny_model("tiny-sd15", model_cache)
    models = tmp / "Stable-diffusion"
    models.mkdir()
    shutil.copytree(tiny, models / "tiny-folder")
    single = _ldm_checkpoint(tiny, models / "tiny-file.safetensors")
    # The scanned file gets SD1.5's real configs (it would need a real SD1.5); a preset in the
    # models file reads the same file with the tiny model's configs and tokenizer.
    models_file = tmp / "models.toml"
    models_file.write_text(
        f'[[models]]\nname = "tiny-sd15-file"\nfamily = "sd15"\nsource = "{single}"\n'
        f'config = "{tiny}"\ndtype = "float32"\ndefault_size = 64\ndefault_steps = 2\n'
        'lora_dim = 32\n')
    running = launch_stack(tmp, database_url=f"sqlite+aiosqlite:///{tmp / 'loomis.db'}",
                           s3=s3_server, model_cache=model_cache, extra_env={
                               "LOOMIS_MODELS__MODELS_DIR": str(models),
                               "LOOMIS_MODELS__MODELS_FILE": str(models_file)})
    yield running
    running.stack.stop()
    running.redis.stop()


def test_models_lists_every_preset_with_its_limits_and_weights(models_stack: RunningStack) -> None:
    assert httpx.get(f"{models_stack.url}/v1/models").status_code == 401
    with models_stack.client() as client:
        response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    page = response.json()
    models = {model["name"]: model for model in page["items"]}
    assert page["default_model"] == "tiny-sd15"
    assert list(models) == sorted(models)

    folder, single = models["tiny-folder"], models["tiny-file"]
    assert (folder["origin"], folder["source"], folder["format"], folder["family"]) == (
        "models_dir", "tiny-folder", "diffusers_folder", "sd15")
    assert (single["origin"], single["source"], single["format"]) == (
        "models_dir", "tiny-file.safetensors", "single_file")
    assert folder["weights_present"] and single["weights_present"]
    configured = models["tiny-sd15-file"]
    assert configured["origin"] == "models_file" and configured["format"] == "single_file"
    assert configured["source"].endswith("/tiny-file.safetensors")  # as the operator wrote it
    assert (configured["default_width"], configured["default_steps"]) == (64, 2)

    sd15 = models["sd15"]
    assert sd15["format"] == "hub" and sd15["weights_present"] is False  # not in the cache
    assert (sd15["default_width"], sd15["min_width"], sd15["max_height"]) == (512, 64, 1024)
    assert sd15["controlnets"] == ["canny", "depth", "openpose", "scribble"]
    assert sd15["inpainting"] == {"supported": True, "dedicated": True}
    assert "DPM++ 2M Karras" in sd15["schedulers"] and sd15["lora_dim"] == 768
    flux = models["flux-schnell"]
    assert flux["schedulers"] == ["FlowMatch Euler"] and flux["size_multiple"] == 16
    assert (flux["default_steps"], flux["max_steps"], flux["default_guidance"]) == (4, 8, 0.0)
    assert models["tiny-sdxl"]["inpainting"]["dedicated"] is False
    assert models["tiny-sd15"]["weights_present"] and models["tiny-sd15"]["origin"] == "builtin"


def _image(client: httpx.Client, model: str) -> tuple[np.ndarray, dict[str, Any]]:
    response = client.post("/v1/generations", json={
        "prompt": "a lighthouse at dusk", "model": model, "steps": 2, "width": 64,
        "height": 64, "seed": 99})
    assert response.status_code == 202, response.text
    job = wait_terminal(client, response.json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    image = next(a for a in job["artifacts"] if a["kind"] == "image")
    manifest = next(a for a in job["artifacts"] if a["kind"] == "manifest")
    pixels = np.asarray(Image.open(io.BytesIO(httpx.get(image["url"]).content)))
    return pixels, httpx.get(manifest["url"]).json()


def test_single_file_and_folder_draw_the_same_pixels(models_stack: RunningStack) -> None:
    with models_stack.client() as client:
        builtin, _ = _image(client, "tiny-sd15")
        folder, _ = _image(client, "tiny-folder")
        single, manifest = _image(client, "tiny-sd15-file")
    assert np.array_equal(folder, builtin)
    assert np.array_equal(single, builtin)
    assert manifest["model"]["pipeline"] == "StableDiffusionPipeline"
    assert manifest["model"]["source"].endswith("tiny-file.safetensors")


def _import(stack: RunningStack, folder: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "loras", "import", str(folder), *extra],
        env=stack.stack.child_env(), capture_output=True, text=True, timeout=120)


def test_loras_import_takes_good_files_reports_bad_ones_and_is_idempotent(
    models_stack: RunningStack, model_cache: Path, tmp_path: Path,
) -> None:
    folder = tmp_path / "Lora"
    folder.mkdir()
    (folder / "style.safetensors").write_bytes(make_lora("sd15", cache_dir=model_cache, seed=3))
    (folder / "style.png").write_bytes(b"a webui preview")  # skipped, not reported
    (folder / "old.pt").write_bytes(make_pickle_lora())
    (folder / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (folder / "xl.safetensors").write_bytes(make_lora("sdxl", cache_dir=model_cache, seed=4))

    first = _import(models_stack, folder, "--tenant", "alice", "--base-model", "tiny-sd15")
    assert first.returncode == 1, first.stderr  # some files were refused
    lines = {line.split()[1].rstrip(":"): line.split()[0] for line in first.stdout.splitlines()
             if line.split() and line.split()[0] in ("imported", "exists", "refused")}
    assert lines == {"style.safetensors": "imported", "old.pt": "refused",
                     "truncated.safetensors": "refused", "xl.safetensors": "refused"}, first.stdout
    assert "pickle_refused" in first.stdout and "not_safetensors" in first.stdout
    assert "1 imported, 0 already there, 3 refused" in first.stdout

    with models_stack.client() as client:
        loras = client.get("/v1/loras").json()["items"]
        assert [(lora["name"], lora["source"], lora["base_model"]) for lora in loras] == [
            ("style", "import", "tiny-sd15")]
        with models_stack.client("bob") as bob:
            assert bob.get("/v1/loras").json()["items"] == []
        response = client.post("/v1/generations", json={
            "prompt": "x", "model": "tiny-sd15", "steps": 1, "width": 64, "height": 64,
            "loras": [{"id": loras[0]["id"], "weight": 1.0}]})
        assert response.status_code == 202, response.text
        assert wait_terminal(client, response.json()["id"])["status"] == "succeeded"

    again = _import(models_stack, folder, "--tenant", "alice", "--base-model", "tiny-sd15")
    assert "exists    style.safetensors" in again.stdout, again.stdout
    assert "0 imported, 1 already there, 3 refused" in again.stdout
    with models_stack.client() as client:
        assert len(client.get("/v1/loras").json()["items"]) == 1

    unknown = _import(models_stack, folder, "--tenant", "nobody")
    assert unknown.returncode == 1 and "no tenant 'nobody'" in unknown.stderr


def test_loras_import_reports_hostile_files_one_line_each(
    model_cache: Path, tmp_path: Path,
) -> None:
    """A file name that is not UTF-8 once ended the report in a UnicodeEncodeError traceback on
    a UTF-8 terminal (after importing), a name with a line break forged a report line, and a
    broken link or a FIFO was skipped without a word."""
    import os

    from tests.conftest import create_key

    folder = tmp_path / "Lora"
    folder.mkdir()
    lora = make_lora("sd15", cache_dir=model_cache, seed=7)
    (folder / os.fsdecode(b"caf\xe9.safetensors")).write_bytes(lora)  # Latin-1 name
    (folder / "two\nrefused x.safetensors").write_bytes(b"not a lora")
    (folder / "gone.safetensors").symlink_to(tmp_path / "nowhere.safetensors")
    os.mkfifo(folder / "fifo.safetensors")
    (folder / "subfolder").mkdir()  # not reported: webui folders have them
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'loomis.db'}"
    create_key(database_url, "carol")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "LOOMIS_DB__URL": database_url,
           "LOOMIS_STORAGE__BACKEND": "local", "LOOMIS_STORAGE__LOCAL_ROOT": str(tmp_path / "s3"),
           "LOOMIS_MODELS__CACHE_DIR": str(model_cache)}
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "loras", "import", str(folder), "--tenant",
         "carol", "--base-model", "tiny-sd15"], env=env, capture_output=True, text=True,
        timeout=120)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "1 imported, 0 already there, 3 refused", result.stdout
    assert any(line.startswith("imported  caf?.safetensors: caf_") for line in lines)
    assert any(line.startswith("refused   two?refused x.safetensors: ") for line in lines)
    for name in ("gone.safetensors", "fifo.safetensors"):
        assert f"refused   {name}: not a regular file" in result.stdout, result.stdout


def test_models_schema_describes_every_field() -> None:
    from services.gateway.app import create_app

    schema = create_app().openapi()
    operation = schema["paths"]["/v1/models"]["get"]
    assert operation["security"] == [{"bearerAuth": []}]
    components = schema["components"]["schemas"]
    undescribed = [f"{name}.{field}" for name in ("ModelPage", "ModelOut", "InpaintingOut")
                   for field, spec in components[name]["properties"].items()
                   if not spec.get("description")]
    assert undescribed == []


def test_single_file_without_tokenizer_or_of_another_family_says_what_to_do(
    tmp_path: Path, model_cache: Path,
) -> None:
    from services.generator.pipelines import PipelineCache
    from services.models.tiny.diffusion import ensure_tiny_model
    from shared.errors import ModelUnavailable
    from shared.models import ModelPreset

    single = _ldm_checkpoint(ensure_tiny_model("tiny-sd15", model_cache),
                             tmp_path / "tiny.safetensors")
    registry = ModelRegistry([
        ModelPreset(name="no-tokenizer", family=ModelFamily.SD15, source=str(single)),
        ModelPreset(name="said-sdxl", family=ModelFamily.SDXL, source=str(single)),
        ModelPreset(name="gone", family=ModelFamily.SD15, source=str(tmp_path / "gone.safetensors")),
    ])
    cache = PipelineCache(registry=registry, cache_dir=tmp_path / "empty-cache", device="cpu")
    with pytest.raises(ModelUnavailable, match="no CLIP tokenizer is installed: run `loomis "
                       "models tokenizer`"):
        cache.get("no-tokenizer")
    with pytest.raises(ModelUnavailable, match="is a sd15 checkpoint but preset 'said-sdxl' "
                       "says sdxl"):
        cache.get("said-sdxl")
    with pytest.raises(ModelUnavailable, match="gone.safetensors does not exist"):
        cache.get("gone")
