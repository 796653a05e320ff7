"""Model files as people have them: safetensors headers, single-file checkpoints and a
webui-style models folder.

Everything here reads safetensors headers and ``model_index.json`` only, never weights, so the
gateway can list and check models and LoRA uploads without torch, and a folder of multi-GB
checkpoints is scanned in milliseconds. The safetensors container is simple enough (an 8-byte
little-endian header length, a JSON header, one flat byte buffer) to read by hand, which means
a hostile upload is only ever read as JSON and byte offsets. The gateway's LoRA inspection
(``services/gateway/loras/inspection.py``), the generator's single-file loader and the trainer's
description of the LoRA it wrote all read headers with :func:`read_safetensors_header`.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from shared.models import ModelFamily
from shared.text import control_character, printable

logger = logging.getLogger(__name__)

# The reference implementation refuses larger headers; so do we, before decoding any JSON.
MAX_HEADER_BYTES = 100_000_000

# Bytes per element of the dtypes the spec defines and the worker's loader (safetensors.torch)
# can turn into tensors; a file in any other dtype would only fail later, in a job.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E5M2FNUZ": 1, "F8_E4M3FNUZ": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
    "F64": 8, "C64": 8,
}

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
    except NotSafetensors as exc:
        raise NotAModel(str(exc)) from None
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


# --------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class NotSafetensors(ValueError):
    """A file the reference loader would refuse; ``reason`` says why, for callers that word
    the refusal their own way."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"This is not a valid .safetensors file: {reason}.")
        self.reason = reason


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json keeps the last of duplicate keys silently; two readers could then disagree.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise NotSafetensors(f"the header names {key!r} twice")
        result[key] = value
    return result


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _file_size(file: BinaryIO) -> int:
    size = file.seek(0, io.SEEK_END)
    file.seek(0)
    return size


def read_safetensors_header(data: bytes | BinaryIO) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Validate the container the way the reference loader would, so that what passes here
    also loads in the worker: header inside the file, known dtypes, sizes that match shapes,
    and tensors that tile the data buffer exactly (no gaps, no overlaps, nothing past the end).

    Only the header is read: a multi-GB file is checked from its first bytes and its size.
    Raises ``NotSafetensors``.
    """
    file = io.BytesIO(data) if isinstance(data, bytes) else data
    size = _file_size(file)
    if size < 8:
        raise NotSafetensors(f"it is only {size} bytes long")
    header_len = int.from_bytes(file.read(8), "little")
    if header_len < 2 or header_len > size - 8:
        raise NotSafetensors(f"its header length ({header_len} bytes) does not fit in the "
                             f"{size}-byte file")
    if header_len > MAX_HEADER_BYTES:
        raise NotSafetensors(f"its header is {header_len} bytes, over the {MAX_HEADER_BYTES}-byte "
                             "limit")
    raw = file.read(header_len)
    if raw[:1] != b"{":
        raise NotSafetensors("its header does not start with a JSON object")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except NotSafetensors:
        raise
    except (ValueError, RecursionError) as exc:  # also bad UTF-8 and over-long integers
        raise NotSafetensors("its header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise NotSafetensors("its header is not a JSON object")

    metadata_raw = header.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(value, str) for value in metadata_raw.values()
    ):
        raise NotSafetensors("its __metadata__ is not a map of strings to strings")
    metadata: dict[str, str] = dict(metadata_raw)

    buffer_len = size - 8 - header_len
    tensors = {name: _tensor_entry(name, info, buffer_len) for name, info in header.items()}
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            problem = "overlaps another tensor" if entry.begin < position else "leaves a gap before it"
            raise NotSafetensors(f"tensor {name!r} {problem} (starts at byte {entry.begin}, "
                                 f"expected {position})")
        position = entry.end
    if position != buffer_len:
        raise NotSafetensors(f"its tensors cover {position} of the {buffer_len} data bytes")
    return tensors, metadata


def _tensor_entry(name: str, info: object, buffer_len: int) -> TensorEntry:
    if not isinstance(info, dict):
        raise NotSafetensors(f"the entry for {name!r} is not a tensor description")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise NotSafetensors(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise NotSafetensors(f"tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_count(offset) for offset in offsets)):
        raise NotSafetensors(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if begin > end or end > buffer_len:
        raise NotSafetensors(f"tensor {name!r} lies outside the data (bytes {begin}..{end} "
                             f"of {buffer_len})")
    elements = 1
    for dim in shape:
        elements *= dim
    if elements * DTYPE_SIZES[dtype] != end - begin:
        raise NotSafetensors(f"tensor {name!r} takes {end - begin} bytes but its shape {shape} "
                             f"of {dtype} needs {elements * DTYPE_SIZES[dtype]}")
    return TensorEntry(dtype=dtype, shape=tuple(shape), begin=begin, end=end)
