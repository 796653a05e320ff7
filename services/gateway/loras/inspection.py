"""Reading an uploaded LoRA adapter without torch: what it adapts, at which widths, for which model.

The gateway inspects uploads (and ``loomis loras import``'s files) with it before anything is
stored or queued; deciding whether a LoRA fits a given model is ``fit.py``'s. The trainer
describes the LoRA it wrote itself (``services/trainer/kohya_format.py``), and a test holds its
record equal to :meth:`LoraInfo.record` of the same bytes.

Pickled checkpoints are refused outright: unpickling runs arbitrary code. The container is read
by ``shared.modelfiles.read_safetensors_header``; everything here looks at tensor names and
shapes only, and no tensor data is decoded.

One file although it is over 400 lines: the key-name parsers and the checks on what they find
are one inspection whose parts only make sense together.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

from shared.modelfiles import NotSafetensors, TensorEntry, read_safetensors_header
from shared.models import BUILTIN_PRESETS, ModelFamily

LoraFormat = Literal["peft", "kohya"]
# Which network the LoRA's weights attach to; None when it only adapts text encoders.
Denoiser = Literal["unet", "flux"]

_ZIP_MAGIC = b"PK\x03\x04"

# Input widths of the real models' attention projections, to say which model a file is for.
REAL_WIDTHS: dict[Denoiser, dict[int, tuple[str, ModelFamily | None]]] = {
    "unet": {768: ("SD1.5", ModelFamily.SD15), 1024: ("SD2", None), 2048: ("SDXL", ModelFamily.SDXL)},
    "flux": {3072: ("Flux", ModelFamily.FLUX)},
}
DENOISER_FAMILIES: dict[Denoiser, tuple[ModelFamily, ...]] = {
    "unet": (ModelFamily.SD15, ModelFamily.SDXL),
    "flux": (ModelFamily.FLUX,),
}


class LoraRejected(ValueError):
    """An upload we will not store; ``code`` is stable for clients, the message is for people."""

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class LoraInfo:
    """What an upload is, worked out once so neither the gateway nor a job re-reads the file.

    ``dims`` holds the input widths of the layers that pin a LoRA to one model: SD's
    cross-attention ``attn2.to_k``/``to_v`` (the text encoder width) and Flux's attention
    q/k (the transformer width). ``family_hint`` is None when names and widths do not say.
    ``widths`` holds every input and output width of the adapted layers, per component
    (``unet``, ``transformer``, ``text_encoder``...): a LoRA with a layer of a width the model
    lacks cannot load into it ("size mismatch"), whichever layers it adapts.
    """

    format: LoraFormat
    family_hint: ModelFamily | None
    rank: int
    targets: int
    has_text_encoder: bool
    metadata: dict[str, str]
    dims: frozenset[int]
    sha256: str
    size: int
    denoiser: Denoiser | None = None
    # One tensor name per kind of evidence, quoted back to the user when a check fails.
    denoiser_key: str | None = None
    sdxl_marker: str | None = None
    sdxl_marker_reason: str | None = None
    widths: dict[str, frozenset[int]] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """What a LoRA's row keeps (JSON), so submissions are checked without the file."""
        return {"targets": self.targets, "has_text_encoder": self.has_text_encoder,
                "dims": sorted(self.dims),
                "widths": {component: sorted(found) for component, found in self.widths.items()},
                "metadata": dict(list(self.metadata.items())[:20])}


# --------------------------------------------------------------------------- LoRA key names

Component = Literal["unet", "flux", "text_encoder", "text_encoder_2", "text_encoder_3", "unknown"]
Role = Literal["down", "up", "alpha", "extra"]

_PEFT_PATTERNS = (
    # peft: module.lora_A.weight, also with the adapter name left in (module.lora_A.default.weight)
    re.compile(r"^(?P<module>.+)\.lora_(?P<role>A|B)(?:\.[A-Za-z0-9_-]+)?\.weight$"),
    # diffusers before peft: module.lora.down.weight and module.lora_linear_layer.down.weight
    re.compile(r"^(?P<module>.+)\.(?:lora|lora_linear_layer)\.(?P<role>down|up)\.weight$"),
    # diffusers' attention processors: attn1.processor.to_q_lora.down.weight
    re.compile(r"^(?P<module>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)"
               r"\.weight$"),
)
_PEFT_EXTRAS = re.compile(r"\.(?:alpha|lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?|lora_B\.bias)$")
_KOHYA_PATTERN = re.compile(
    r"^lora_(?P<prefix>unet|te1|te2|te3|te|transformer)_(?P<module>[^.]+)"
    r"\.(?P<role>lora_down\.weight|lora_up\.weight|alpha|dora_scale|lora_mid\.weight)$"
)
# kohya's suffixes on dotted module names: ComfyUI/BFL exports (diffusion_model.double_blocks.0…)
_KOHYA_DOTTED = re.compile(r"^(?P<module>.+)\.(?P<role>lora_down\.weight|lora_up\.weight)$")
_KOHYA_COMPONENTS: dict[str, Component] = {
    "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2", "te3": "text_encoder_3",
}
_KOHYA_FLUX_BLOCKS = ("double_blocks_", "single_blocks_", "img_in", "txt_in", "time_in", "vector_in",
                      "guidance_in", "final_layer")
_PEFT_COMPONENTS: dict[str, Component] = {
    "unet": "unet", "transformer": "flux", "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2", "text_encoder_3": "text_encoder_3",
}
# The pipeline component each part of a LoRA loads into, as diffusers and model presets name it.
_MODEL_COMPONENTS: dict[Component, str] = {
    "unet": "unet", "flux": "transformer", "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2", "text_encoder_3": "text_encoder_3",
}
_ROLES: dict[str, Role] = {
    "A": "down", "down": "down", "lora_down.weight": "down",
    "B": "up", "up": "up", "lora_up.weight": "up",
    "alpha": "alpha",
}
# SD1.x/2.x UNets have exactly one transformer block per attention; SDXL has 2 or 10.
_EXTRA_TRANSFORMER_BLOCK = re.compile(r"transformer_blocks[._](?:[1-9]|\d{2,})[._]")
_SD_CROSS_KV = re.compile(r"attn2[._]to_[kv]$")
# Every tensor of an sd-scripts SD1.5/SDXL file the worker can place (services/generator/loras.py).
_KOHYA_SD_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_KOHYA_SD_APPLIED = re.compile(
    r"^lora_(?:unet|te|te1|te2)_[^.]+\.(?:lora_down\.weight|lora_up\.weight|alpha)$")
_FLUX_ATTN_IN = re.compile(
    r"(?:attn\.to_[qk]|(?:img|txt)_attn[._]qkv|single_blocks[._]\d+[._]linear1|attn_to_[qk])$"
)


@dataclass(frozen=True)
class _Key:
    fmt: LoraFormat
    component: Component
    module: str
    role: Role


def _parse_kohya(name: str) -> _Key | None:
    match = _KOHYA_PATTERN.match(name)
    if match is None:
        return None
    prefix, module = match["prefix"], match["module"]
    component: Component
    if prefix == "unet":
        component = "flux" if module.startswith(_KOHYA_FLUX_BLOCKS) else "unet"
    elif prefix == "transformer":
        component = "flux"
    else:
        component = _KOHYA_COMPONENTS[prefix]
    return _Key("kohya", component, f"lora_{prefix}_{module}", _ROLES.get(match["role"], "extra"))


def _parse_dotted_kohya(name: str) -> _Key | None:
    match = _KOHYA_DOTTED.match(name)
    if match is None:
        return None
    return _Key("kohya", _infer_component(match["module"]), match["module"], _ROLES[match["role"]])


def _parse_peft(name: str) -> _Key | None:
    for pattern in _PEFT_PATTERNS:
        match = pattern.match(name)
        if match is not None:
            module = match["module"]
            if "proj" in pattern.groupindex:
                suffix = "to_out.0" if match["proj"] == "to_out" else match["proj"]
                module = f"{module}.{suffix}"
            role = _ROLES[match["role"]]
            break
    else:
        if _PEFT_EXTRAS.search(name) is None:
            return None
        module, role = name.rsplit(".", 1)[0], "extra"
    # The module keeps its prefix: text_encoder and text_encoder_2 share layer names.
    module = module.removeprefix("base_model.model.")
    head, _, rest = module.partition(".")
    component = _PEFT_COMPONENTS.get(head) if rest else None
    return _Key("peft", component or _infer_component(module), module, role)


def _infer_component(module: str) -> Component:
    """Files without diffusers' component prefix (bare peft state dicts, ComfyUI/BFL exports)
    still load; place their modules by the layout their names reveal."""
    path = module.removeprefix("model.").removeprefix("diffusion_model.")
    if path.startswith(("text_model.", "encoder.layers.", "text_encoders.clip_l.")):
        return "text_encoder"
    if path.startswith(("down_blocks.", "up_blocks.", "mid_block.", "input_blocks.", "middle_block.",
                        "output_blocks.", "conv_in", "conv_out", "time_embedding.")):
        return "unet"
    if path.startswith(("transformer_blocks.", "single_transformer_blocks.", "double_blocks.",
                        "single_blocks.")):
        return "flux"
    return "unknown"


@dataclass
class _Module:
    component: Component
    shapes: dict[Role, tuple[int, ...]] = field(default_factory=dict)
    names: dict[Role, str] = field(default_factory=dict)


def _collect_modules(tensors: dict[str, TensorEntry]) -> tuple[LoraFormat, dict[str, _Module]]:
    keys = {name: key for name in tensors
            if (key := _parse_kohya(name) or _parse_peft(name) or _parse_dotted_kohya(name))}
    formats = {key.fmt for key in keys.values() if key.role in ("down", "up")}
    if not formats:
        sample = ", ".join(repr(name) for name in sorted(tensors)[:3]) or "none"
        raise LoraRejected(
            "This safetensors file holds no LoRA weights (expected tensor names ending in "
            "'.lora_A.weight'/'.lora_B.weight' or kohya's '.lora_down.weight'/'.lora_up.weight'; "
            f"found {len(tensors)} tensors such as {sample}). Full checkpoints, embeddings and "
            "LyCORIS LoHa/LoKr files are not LoRAs.",
            code="not_a_lora",
        )
    if len(formats) > 1:
        raise LoraRejected("This file mixes kohya (lora_unet_…) and diffusers/peft tensor names, "
                           "so no loader can apply it; export it in one naming.", code="not_a_lora")
    fmt: LoraFormat = formats.pop()
    modules: dict[str, _Module] = {}
    for name, key in keys.items():
        if key.fmt != fmt:
            continue
        module = modules.setdefault(key.module, _Module(key.component))
        module.shapes[key.role] = tensors[name].shape
        module.names[key.role] = name
    return fmt, {name: module for name, module in modules.items()
                 if "down" in module.shapes or "up" in module.shapes}


def _module_rank(name: str, module: _Module) -> int:
    down, up = module.shapes.get("down"), module.shapes.get("up")
    if down is None or up is None:
        have, lack = ("down (A)", "up (B)") if up is None else ("up (B)", "down (A)")
        raise LoraRejected(f"LoRA module {name!r} has its {have} weight but no "
                           f"{lack} weight, so it cannot be applied.", code="not_a_lora")
    if len(down) < 2 or len(up) < 2 or down[0] == 0 or up[1] != down[0]:
        raise LoraRejected(f"LoRA module {name!r} has mismatched down/up shapes "
                           f"{list(down)} and {list(up)} (the rank must agree).", code="not_a_lora")
    return down[0]


def _quoted_name(module: _Module) -> str:
    return module.names.get("down") or module.names.get("up") or next(iter(module.names.values()))


def _sdxl_marker(modules: dict[str, _Module], denoiser: Denoiser | None) -> tuple[str, str] | None:
    if denoiser == "flux":  # Flux's text_encoder_2 is T5, not SDXL's second CLIP
        return None
    for module in modules.values():
        name = _quoted_name(module)
        if module.component == "text_encoder_2":
            return name, "it adapts SDXL's second text encoder"
        if module.component == "unet" and _EXTRA_TRANSFORMER_BLOCK.search(name):
            return name, "it has several transformer blocks per attention layer, which SD1.5 lacks"
    return None


def _check_kohya_sd_names(tensors: Iterable[str]) -> None:
    """An sd-scripts file for a Stable Diffusion UNet loads only if every tensor is part of a
    LoRA module the worker can place; anything else would fail every job that uses it."""
    for name in sorted(tensors):
        if _KOHYA_SD_APPLIED.match(name):
            continue
        if name.endswith(".dora_scale"):
            # Applying the low-rank part without the magnitude would give other pixels than
            # the ones it was trained for: refused, not silently half-applied.
            raise LoraRejected(
                f"This LoRA holds {name!r}, a DoRA magnitude vector; DoRA adapters cannot be "
                "applied faithfully here. Export it as a plain LoRA (without DoRA).",
                code="not_a_lora")
        if name.endswith(".lora_mid.weight"):
            raise LoraRejected(
                f"This LoRA holds {name!r}, a LyCORIS LoCon 'lora_mid' weight (a convolution "
                "factored with CP/Tucker decomposition), which cannot be applied here; export "
                "it without CP decomposition (no use_tucker/use_cp), or as a plain LoRA.",
                code="not_a_lora")
        raise LoraRejected(
            f"This kohya LoRA also holds {name!r}, which is not part of a LoRA module "
            "(lora_unet_…/lora_te_…/lora_te1_…/lora_te2_… with lora_down/lora_up/alpha), so no "
            "job could apply the file; remove it or export the LoRA without it.",
            code="not_a_lora")


def _families_with_width(width: int, denoiser: Denoiser) -> set[ModelFamily]:
    _, real = REAL_WIDTHS[denoiser].get(width, ("", None))
    families = {real} if real is not None else set()
    families |= {preset.family for preset in BUILTIN_PRESETS
                 if preset.lora_dim == width and preset.family in DENOISER_FAMILIES[denoiser]}
    return families


def _family_hint(denoiser: Denoiser | None, sdxl: bool, dims: Iterable[int]) -> ModelFamily | None:
    if denoiser == "flux":
        return ModelFamily.FLUX
    if sdxl:
        return ModelFamily.SDXL
    if denoiser is None:
        return None
    candidates: set[ModelFamily] | None = None
    for width in dims:
        found = _families_with_width(width, denoiser)
        candidates = found if candidates is None else candidates & found
    if candidates is not None and len(candidates) == 1:
        return candidates.pop()
    return None


def inspect_lora(data: bytes | BinaryIO) -> LoraInfo:
    """Everything the gateway needs to accept or refuse an upload, from names and shapes alone.

    ``data`` may be a seekable file: only its header is held in memory, and the hash is
    computed in chunks, so checking a 2 GiB upload costs no more than a small one.

    Raises ``LoraRejected`` with code ``pickle_refused``, ``not_safetensors`` or ``not_a_lora``.
    """
    file = io.BytesIO(data) if isinstance(data, bytes) else data
    file.seek(0)
    head = file.read(8)
    if head.startswith(_ZIP_MAGIC):
        raise _pickle_refused()
    try:
        tensors, metadata = read_safetensors_header(file)
    except NotSafetensors as exc:
        if _looks_like_pickle(head):
            raise _pickle_refused() from None
        raise LoraRejected(f"This is not a valid .safetensors file: {exc.reason}. "
                           "Upload the LoRA as .safetensors.", code="not_safetensors") from None

    fmt, modules = _collect_modules(tensors)
    rank = max(_module_rank(name, module) for name, module in modules.items())
    denoisers = {module.component for module in modules.values()} & {"unet", "flux"}
    if len(denoisers) > 1:
        raise LoraRejected("This file has both Stable Diffusion UNet and Flux transformer LoRA "
                           "weights; a LoRA is for one model family.", code="not_a_lora")
    denoiser: Denoiser | None = "unet" if "unet" in denoisers else "flux" if denoisers else None
    if fmt == "kohya" and denoiser != "flux" and any(name.startswith(_KOHYA_SD_PREFIXES)
                                                     for name in tensors):
        _check_kohya_sd_names(tensors)
    denoiser_key = next((_quoted_name(module) for module in modules.values()
                         if module.component == denoiser), None)
    width_pattern = _FLUX_ATTN_IN if denoiser == "flux" else _SD_CROSS_KV
    dims = frozenset(module.shapes["down"][1] for name, module in modules.items()
                     if module.component == denoiser and width_pattern.search(name))
    marker = _sdxl_marker(modules, denoiser)
    widths: dict[str, set[int]] = {}
    for module in modules.values():
        component = _MODEL_COMPONENTS.get(module.component)
        down, up = module.shapes.get("down"), module.shapes.get("up")
        if component is not None and down is not None and up is not None:
            widths.setdefault(component, set()).update((down[1], up[0]))
    return LoraInfo(
        format=fmt,
        family_hint=_family_hint(denoiser, marker is not None, dims),
        rank=rank,
        targets=len(modules),
        has_text_encoder=any(module.component.startswith("text_encoder")
                             for module in modules.values()),
        metadata=metadata,
        dims=dims,
        sha256=_sha256(file),
        size=file.seek(0, io.SEEK_END),
        denoiser=denoiser,
        denoiser_key=denoiser_key,
        sdxl_marker=marker[0] if marker else None,
        sdxl_marker_reason=marker[1] if marker else None,
        widths={component: frozenset(found) for component, found in sorted(widths.items())},
    )


def _sha256(file: BinaryIO) -> str:
    file.seek(0)
    digest = hashlib.sha256()
    while chunk := file.read(1024 * 1024):
        digest.update(chunk)
    return digest.hexdigest()


def _pickle_refused() -> LoraRejected:
    return LoraRejected(
        "This file is a pickled PyTorch checkpoint (.ckpt/.pt/.bin). Loading a pickle can run "
        "arbitrary code, so only .safetensors LoRA files are accepted; convert it to safetensors "
        "first.",
        code="pickle_refused",
    )


def _looks_like_pickle(data: bytes) -> bool:
    # torch.save writes a zip (since 1.6) or, legacy, a protocol-2 pickle; other pickles
    # open with the PROTO opcode too.
    return data.startswith(_ZIP_MAGIC) or (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03",
                                                                                 b"\x04", b"\x05"))
