"""Typed job outcomes: the contract between a worker's ``succeeded`` event and the gateway."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from services.gateway.app import create_app
from services.gateway.jobs.schemas import OUTCOMES
from services.gateway.jobs.service import ON_SUCCEEDED, parse_succeeded
from shared.outcomes import (
    GenerationOutcome,
    GenerationSucceeded,
    TaggingSucceeded,
    TrainingSucceeded,
)
from shared.specs import ArtifactRef, JobKind

ARTIFACT: dict[str, Any] = {"key": "outputs/t/j/0.png", "kind": "image", "index": 0,
                            "content_type": "image/png", "size": 3, "sha256": "0" * 64}


def test_a_succeeded_event_is_its_kinds_outcome() -> None:
    training = parse_succeeded(JobKind.TRAINING, {
        "artifacts": [ARTIFACT], "result": {"steps": 4, "lora": {"id": "l", "name": "n"}},
        "register_lora": {"id": "l", "name": "n", "family": "sd15", "base_model": "tiny-sd15",
                          "key": "loras/t/l/1.safetensors", "sha256": "0" * 64, "size": 1,
                          "rank": 4}})
    assert isinstance(training, TrainingSucceeded) and training.register_lora is not None
    assert training.result.steps == 4 and training.result.lora is not None
    tagging = parse_succeeded(JobKind.TAGGING, {"dataset_items": {"i": {"caption": "a dog"}}})
    assert isinstance(tagging, TaggingSucceeded) and tagging.dataset_items["i"].caption == "a dog"
    # a report may say more than the model knows, and older ones say less
    assert parse_succeeded(JobKind.GENERATION, {"result": {"ok": True}}).event_data()["result"] == {
        "ok": True}
    with pytest.raises(ValidationError):  # what no worker may send: the consumer parks it
        parse_succeeded(JobKind.GENERATION, {"artifacts": [{"key": "out/0.png"}]})
    with pytest.raises(ValidationError):
        parse_succeeded(JobKind.TRAINING, {"register_lora": {"id": "l"}})


def test_event_data_is_what_the_worker_set_with_whole_artifacts() -> None:
    outcome = GenerationSucceeded(artifacts=[ArtifactRef.model_validate(ARTIFACT)],
                                result=GenerationOutcome(seeds=[1], scheduler="euler"))
    data = outcome.event_data()
    assert data["result"] == {"seeds": [1], "scheduler": "euler"}  # no invented nulls
    assert data["artifacts"][0]["width"] is None  # every artifact field, as clients read them
    assert "spec_filled" not in data


def test_succeeded_jobs_go_to_their_own_domain() -> None:
    assert set(ON_SUCCEEDED) == {JobKind.TRAINING, JobKind.TAGGING, JobKind.SCENE}
    assert ON_SUCCEEDED[JobKind.SCENE].__module__ == "services.gateway.scenes.outcome"
    assert ON_SUCCEEDED[JobKind.TRAINING].__module__ == "services.gateway.trainings.outcome"
    assert ON_SUCCEEDED[JobKind.TAGGING].__module__ == "services.gateway.taggings.outcome"


def test_openapi_documents_each_kinds_result() -> None:
    spec = create_app().openapi()
    schemas = spec["components"]["schemas"]
    refs = {ref["$ref"].rsplit("/", 1)[1] for ref in schemas["JobOut"]["properties"]["result"]["anyOf"]}
    assert refs == {model.__name__ for model in OUTCOMES.values()} == {
        "GenerationOutcome", "SweepOutcome", "TaggingOutcome", "TrainingOutcome", "SceneOutcome"}
    assert schemas["TrainingOutcome"]["properties"]["lora"]["anyOf"][0]["$ref"] == \
        "#/components/schemas/TrainedLora"
    assert "TrainedLora" in schemas and "steps" in schemas["TrainingOutcome"]["properties"]
