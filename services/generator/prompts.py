"""AUTOMATIC1111-style prompt weighting and prompts longer than CLIP's 77 tokens (SD1.5, SDXL).

diffusers cuts CLIP prompts at 77 tokens and reads ``(word:1.3)`` as literal text, while the
prompts people bring from webui rely on both. Webui's answer, followed here, is to encode the
prompt in chunks of 75 tokens (plus BOS/EOS) that the UNet's cross-attention reads as one long
sequence, and to scale each token's embedding by its weight. Flux is out of scope: its T5
encoder already reads long prompts, and scaling T5 embeddings is a different method.

Plain prompts should not come here at all (see ``needs_custom_encoding``): diffusers' own
encoding is what every existing output was made with, and it must stay bit-identical.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

import torch

ROUND_FACTOR: Final = 1.1
SQUARE_FACTOR: Final = 1 / 1.1
BREAK_KEYWORD: Final = "BREAK"
# Webui's marker in the public fragment list. Encoding does not rely on it: weighted text can
# spell it ("(BRE:-1)(AK:-1)"), so the parser flags real breaks separately.
BREAK: Final[tuple[str, float]] = (BREAK_KEYWORD, -1.0)

_TOKEN = re.compile(
    r"""
      (?P<escape>\\[()\[\]\\])
    | (?P<weight>:\s*(?P<number>[+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\))
    | (?P<open_round>\()
    | (?P<open_square>\[)
    | (?P<close_round>\))
    | (?P<close_square>\])
    | (?P<text>[^\\()\[\]:]+|[\\:])
    """,
    re.VERBOSE,
)
_BREAK_SPLIT = re.compile(rf"\s*\b{BREAK_KEYWORD}\b\s*")


@dataclass(frozen=True)
class _Fragment:
    text: str
    weight: float
    is_break: bool = False


def parse_prompt_weights(text: str) -> list[tuple[str, float]]:
    """Split webui prompt syntax into (text, weight) fragments; ``BREAK`` marks a forced chunk end.

    Malformed input never raises, because prompts are user text and webui accepts anything:
    unclosed brackets apply to the end, stray closers and bad weights (``(a:x)``) stay text.
    """
    return [BREAK if f.is_break else (f.text, f.weight) for f in _parse(text)]


def _parse(text: str) -> list[_Fragment]:
    """The parser proper; breaks are flagged, so no weighted text can pass for one."""
    fragments: list[list[Any]] = []  # [text, weight, is_break], weights grow as groups close
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            if not fragment[2]:
                fragment[1] *= factor

    def add_text(chunk: str) -> None:
        for i, part in enumerate(_BREAK_SPLIT.split(chunk)):
            if i:
                fragments.append([BREAK_KEYWORD, BREAK[1], True])
            if part:
                fragments.append([part, 1.0, False])

    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind == "escape":
            fragments.append([match.group()[1], 1.0, False])
        elif kind == "open_round":
            open_round.append(len(fragments))
        elif kind == "open_square":
            open_square.append(len(fragments))
        elif kind == "weight" and open_round:
            scale_from(open_round.pop(), float(match.group("number")))
        elif kind == "close_round" and open_round:
            scale_from(open_round.pop(), ROUND_FACTOR)
        elif kind == "close_square" and open_square:
            scale_from(open_square.pop(), SQUARE_FACTOR)
        else:  # plain text, or a closer with nothing open
            add_text(match.group())
    for start in open_round:
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_FACTOR)

    merged: list[_Fragment] = []
    for fragment_text, weight, is_break in fragments:
        last = merged[-1] if merged else None
        if last is not None and not is_break and not last.is_break and last.weight == weight:
            merged[-1] = _Fragment(last.text + fragment_text, weight)
        else:
            merged.append(_Fragment(fragment_text, weight, is_break))
    return merged or [_Fragment("", 1.0)]


def _token_ids(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: these lengths are meant to exceed model_max_length, no warning wanted.
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    return [int(i) for i in ids]


def needs_custom_encoding(prompt: str, negative: str, tokenizer: Any) -> bool:
    """Whether diffusers' plain-string path would lose something (weights, BREAK, escapes, tail).

    Everything else keeps diffusers' own encoding so existing seeds reproduce exactly.
    """
    limit = int(tokenizer.model_max_length) - 2
    for text in (prompt, negative):
        if _parse(text) != [_Fragment(text, 1.0)]:
            return True
        if len(_token_ids(tokenizer, text)) > limit:
            return True
    return False


@dataclass
class _Chunk:
    token_ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)


def _mentions_added_token(tokenizer: Any, text: str) -> bool:
    """Cheap pre-check: diffusers' conversion tokenizes again and warns about long text."""
    added: dict[str, int] = getattr(tokenizer, "added_tokens_encoder", {})
    return any(token in text for token in added)


def _chunk_fragments(
    pipe: Any, tokenizer: Any, fragments: list[_Fragment], size: int,
) -> list[_Chunk]:
    """Weighted tokens cut into chunks, cut early at BREAK; webui's chunking without comma backtrack."""
    chunks: list[_Chunk] = []
    current = _Chunk()
    for fragment in fragments:
        if fragment.is_break:
            chunks.append(current)  # an empty chunk here is deliberate: "BREAK BREAK" spaces out
            current = _Chunk()
            continue
        text = fragment.text
        if hasattr(pipe, "maybe_convert_prompt") and _mentions_added_token(tokenizer, text):
            text = pipe.maybe_convert_prompt(text, tokenizer)  # textual inversion's multi-vector tokens
        for token_id in _token_ids(tokenizer, text):
            if len(current.token_ids) == size:
                chunks.append(current)
                current = _Chunk()
            current.token_ids.append(token_id)
            current.weights.append(fragment.weight)
    if current.token_ids or not chunks:
        chunks.append(current)
    return chunks


def _execution_device(pipe: Any, module: Any) -> torch.device:
    """Where the encoder's inputs must go; with CPU offload that is not where its weights sit."""
    try:
        from diffusers.utils.torch_utils import get_module_execution_device
    except ImportError:  # older diffusers: one device for the whole pipeline
        return torch.device(pipe._execution_device)
    return torch.device(get_module_execution_device(module))


def _rescaled(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scale tokens by weight, then restore each chunk's mean: webui's emphasis.

    Without the rescale, raising one word's weight shifts the whole conditioning's magnitude
    and the image degrades; with it, weights only redistribute emphasis between tokens.
    """
    if bool((weights == 1.0).all()):
        return hidden  # untouched, so unweighted chunks equal diffusers' encoding exactly
    work = hidden.float()
    original_mean = work.mean(dim=(1, 2), keepdim=True)
    work = work * weights.to(work.device, torch.float32).unsqueeze(-1)
    new_mean = work.mean(dim=(1, 2), keepdim=True)
    safe = torch.where(new_mean == 0, torch.ones_like(new_mean), new_mean)
    ratio = torch.where(new_mean == 0, torch.ones_like(new_mean), original_mean / safe)
    return (work * ratio).to(hidden.dtype)


@dataclass
class _Encoded:
    hidden: torch.Tensor  # (chunks, 77, width)
    pooled: torch.Tensor | None  # (chunks, projection) from a projection model, else None


def _encode_chunks(
    tokenizer: Any, text_encoder: Any, chunks: list[_Chunk], *, device: torch.device, penultimate: bool,
) -> _Encoded:
    length = int(tokenizer.model_max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows: list[list[int]] = []
    mask_rows: list[list[int]] = []
    weight_rows: list[list[float]] = []
    for chunk in chunks:
        ids = [tokenizer.bos_token_id, *chunk.token_ids, tokenizer.eos_token_id]
        rows.append(ids + [pad_id] * (length - len(ids)))
        mask_rows.append([1] * len(ids) + [0] * (length - len(ids)))
        weight_rows.append([1.0, *chunk.weights] + [1.0] * (length - 1 - len(chunk.weights)))
    input_ids = torch.tensor(rows, dtype=torch.long, device=device)
    if penultimate:
        output = text_encoder(input_ids, output_hidden_states=True)
        hidden: torch.Tensor = output.hidden_states[-2]
        first: torch.Tensor = output[0]
        pooled = first if first.ndim == 2 else None
    else:
        # Like diffusers: only encoders configured for it get the padding mask.
        mask = None
        if getattr(text_encoder.config, "use_attention_mask", False):
            mask = torch.tensor(mask_rows, dtype=torch.long, device=device)
        hidden = text_encoder(input_ids, attention_mask=mask)[0]
        pooled = None
    return _Encoded(hidden=_rescaled(hidden, torch.tensor(weight_rows)), pooled=pooled)


def _text_encoders(pipe: Any) -> list[tuple[Any, Any]]:
    pairs = [(getattr(pipe, "tokenizer", None), getattr(pipe, "text_encoder", None)),
             (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    return [(tok, enc) for tok, enc in pairs if tok is not None and enc is not None]


def _is_sdxl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def supports_prompt_weighting(pipe: Any) -> bool:
    """SD1.5/SDXL UNet pipelines with CLIP encoders; Flux and SD3 also carry a text_encoder_2."""
    components: dict[str, Any] = getattr(pipe, "components", {})
    if components.get("unet") is None or components.get("text_encoder_3") is not None:
        return False
    encoders = _text_encoders(pipe)
    return bool(encoders) and all(type(enc).__name__.startswith("CLIPTextModel") for _, enc in encoders)


def _pad_chunks(chunks: list[_Chunk], count: int) -> list[_Chunk]:
    return chunks + [_Chunk() for _ in range(count - len(chunks))]


def encode_prompts(
    pipe: Any, *, prompt: str, negative_prompt: str, num_images: int,
) -> dict[str, torch.Tensor]:
    """Pipeline kwargs that replace ``prompt``/``negative_prompt`` for weighted or long prompts.

    Prompt and negative get the same number of chunks, padded with empty ones, because CFG
    concatenates them into one batch; the negative is always encoded so any guidance works.
    """
    if not supports_prompt_weighting(pipe):
        raise TypeError(f"prompt weighting supports SD1.5 and SDXL pipelines, not {type(pipe).__name__}")
    sdxl = _is_sdxl(pipe)
    texts = (_parse(prompt), _parse(negative_prompt))
    encoders = _text_encoders(pipe)
    per_encoder = []
    for tokenizer, _ in encoders:
        size = int(tokenizer.model_max_length) - 2
        per_encoder.append([_chunk_fragments(pipe, tokenizer, fragments, size) for fragments in texts])
    # Every encoder and both texts must end with the same sequence length to concatenate.
    count = max(len(chunks) for both in per_encoder for chunks in both)

    hidden_parts: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    pooled: list[torch.Tensor | None] = [None, None]
    with torch.no_grad():
        for (tokenizer, text_encoder), (positive, negative) in zip(encoders, per_encoder, strict=True):
            batch = _pad_chunks(positive, count) + _pad_chunks(negative, count)
            encoded = _encode_chunks(tokenizer, text_encoder, batch,
                                     device=_execution_device(pipe, text_encoder), penultimate=sdxl)
            width = encoded.hidden.shape[-1]
            for side in (0, 1):
                rows = encoded.hidden[side * count:(side + 1) * count]
                hidden_parts[side].append(rows.reshape(1, count * rows.shape[1], width))
                if encoded.pooled is not None:
                    # The pooled vector summarises one 77-token window; webui uses the first.
                    pooled[side] = encoded.pooled[side * count:side * count + 1]

    reference = encoders[-1][1] if sdxl else encoders[0][1]
    dtype = reference.dtype
    device = torch.device(pipe._execution_device)

    def batched(tensor: torch.Tensor) -> torch.Tensor:
        repeats = (num_images,) + (1,) * (tensor.ndim - 1)
        return tensor.to(device=device, dtype=dtype).repeat(*repeats)

    kwargs = {
        "prompt_embeds": batched(torch.cat(hidden_parts[0], dim=-1)),
        "negative_prompt_embeds": batched(torch.cat(hidden_parts[1], dim=-1)),
    }
    if sdxl:
        if pooled[0] is None or pooled[1] is None:
            raise TypeError("SDXL pipeline without a projection text encoder: no pooled embeddings")
        kwargs["pooled_prompt_embeds"] = batched(pooled[0])
        kwargs["negative_pooled_prompt_embeds"] = batched(pooled[1])
    return kwargs
