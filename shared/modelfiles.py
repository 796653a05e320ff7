"""Model files as people have them: single-file checkpoints and a webui-style models folder.

Everything here reads safetensors headers and ``model_index.json`` only, never weights, so the
gateway can list and check models without torch, and a folder of multi-GB checkpoints is
scanned in milliseconds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from shared.loras import LoraRejected, read_safetensors_header
from shared.models import ModelFamily
from shared.text import control_character, printable

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors",)  # pickled .ckpt files run code when loaded: not ours

# diffusers' pipeline class (model_index.json ``_class_name``) -> family.
PIPELINE_FAMILIES: dict[str, ModelFamily] = {
    "StableDiffusionPipeline": ModelFamily.SD15,
    "StableDiffusionImg2ImgPipeline": ModelFamily.SD15,
    "StableDiffusionInpaintPipeline": ModelFamily.SD15,
    "StableDiffusionXLPipeline": ModelFamily.SDXL,
    "StableDiffusionXLImg2ImgPipeline": ModelFamily.SDXL,
    "StableDiffusionXLInpaintPipeline": ModelFamily.SDXL,
    "FluxPipeline": ModelFamily.FLUX,
    "FluxImg2ImgPipeline": ModelFamily.FLUX,
    "FluxInpaintPipeline": ModelFamily.FLUX,
}


class NotAModel(ValueError):
    """A file or folder that is not a checkpoint of a family Loomis runs; says why."""


def family_from_keys(keys: list[str] | set[str]) -> ModelFamily:
    """Which family a checkpoint in the original (webui, ComfyUI, BFL) key layout is.

    SDXL checkpoints carry their second text encoder under ``conditioner.embedders.1``; Flux
    has ``double_blocks`` (at the root in BFL's files, under ``model.diffusion_model.`` in
    ComfyUI's); SD1.5 has the LDM UNet and the CLIP-L ``cond_stage_model.transformer``.
    SD2 (``cond_stage_model.model.``, OpenCLIP) and diffusers-layout files are refused by name.
    """
    if any(key.startswith("conditioner.embedders.1.") for key in keys):
        return ModelFamily.SDXL
    if any(key.startswith(("double_blocks.", "model.diffusion_model.double_blocks."))
           for key in keys):
        return ModelFamily.FLUX
    has_unet = any(key.startswith("model.diffusion_model.") for key in keys)
    if has_unet and any(key.startswith("cond_stage_model.transformer.") for key in keys):
        return ModelFamily.SD15
    if has_unet and any(key.startswith("cond_stage_model.model.") for key in keys):
        raise NotAModel("it is a Stable Diffusion 2 checkpoint (OpenCLIP text encoder); "
                        "Loomis runs SD1.5, SDXL and Flux")
    if any(key.startswith(("down_blocks.", "transformer_blocks.", "single_transformer_blocks."))
           for key in keys):
        raise NotAModel("it is one diffusers component (diffusers key names), not a whole "
                        "checkpoint; use the diffusers folder it came from")
    if any("lora_" in key or ".alpha" in key for key in list(keys)[:200]):
        raise NotAModel("it is a LoRA, not a checkpoint; upload it with POST /v1/loras or "
                        "`loomis loras import`")
    raise NotAModel("its tensor names are not those of an SD1.5, SDXL or Flux checkpoint")


def checkpoint_family(path: Path) -> ModelFamily:
    """The family of a single-file checkpoint, from its header alone."""
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        kind = path.suffix or "files without a suffix"
        raise NotAModel(f"only .safetensors checkpoints are loaded, not {kind} (pickle files "
                        "run code when opened)")
    if not path.is_file():  # a FIFO would block the scan (and startup) forever, /dev/zero too
        raise NotAModel("it is not a regular file")
    try:
        with path.open("rb") as fh:
            tensors, _ = read_safetensors_header(fh)
    except LoraRejected as exc:
        raise NotAModel(exc.message) from None
    return family_from_keys(set(tensors))


def folder_family(path: Path) -> ModelFamily:
    """The family of a diffusers folder, from its ``model_index.json``."""
    try:
        index = json.loads((path / "model_index.json").read_text())
        class_name = index["_class_name"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise NotAModel(f"its model_index.json cannot be read: {exc}") from None
    family = PIPELINE_FAMILIES.get(class_name) if isinstance(class_name, str) else None
    if family is None:
        raise NotAModel(f"its pipeline is {class_name!r}; Loomis runs "
                        f"{', '.join(sorted(PIPELINE_FAMILIES))}")
    return family


def scan_models_dir(root: Path) -> list[tuple[str, ModelFamily, Path]]:
    """(preset name, family, path) for each checkpoint and diffusers folder directly in ``root``.

    The layout is a webui's ``models/Stable-diffusion``: one ``<name>.safetensors`` per model,
    the name being the file's stem; a folder holding ``model_index.json`` counts as a model
    named after the folder. Anything else is skipped with a log line saying why, so one bad
    file never hides the others.
    """
    found: list[tuple[str, ModelFamily, Path]] = []
    if not root.is_dir():
        logger.warning("models folder %s does not exist; no models scanned from it", root)
        return found
    taken: dict[str, Path] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        try:
            if path.is_dir():
                if not (path / "model_index.json").is_file():
                    continue
                name, family = path.name, folder_family(path)
            elif path.suffix.lower() in CHECKPOINT_SUFFIXES:
                name, family = path.stem, checkpoint_family(path)
            else:
                continue
            if (bad := control_character(name)) is not None:
                # Requests refuse such a model name, and a name that is not UTF-8 (a surrogate
                # here) cannot even be sent in a JSON response: listing it would break them.
                raise NotAModel(f"its name has a control character or bytes that are not "
                                f"UTF-8 ({bad}); rename it")
            if name in taken:
                raise NotAModel(f"{taken[name].name!r} in the same folder is already the "
                                f"preset {name!r}; rename one of them")
        except (NotAModel, OSError) as exc:
            logger.warning("skipping %r in the models folder: %s", printable(path.name), exc)
            continue
        taken[name] = path
        found.append((name, family, path))
    return found
