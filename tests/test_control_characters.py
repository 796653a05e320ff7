"""NUL and other control characters are refused at the edge, naming the field or the file.

PostgreSQL cannot store NUL in text: before this, a caption edit was a 500 and a training
named ``x\\u0000y`` was accepted, then its result could never be recorded and the job stayed
``running`` for good. Each case runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from services.gateway.datasets.schemas import ItemPatch
from shared.specs import GenerationSpec, SweepSpec, TaggingSpec
from shared.text import RequestModel
from shared.training import TrainingSpec
from tests.conftest import RunningStack
from tests.test_datasets_e2e import image_bytes


def _errors(model: type[BaseModel], body: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        model.model_validate(body)
    except ValidationError as exc:
        return [(".".join(map(str, e["loc"])), e["type"]) for e in exc.errors()]
    return []


TRAINING = {"name": "x", "dataset_id": "d", "optim": {"max_train_steps": 1}}


@pytest.mark.parametrize(("model", "body", "field"), [
    (GenerationSpec, {"prompt": "a \x00 b"}, "prompt"),
    (GenerationSpec, {"prompt": "a", "negative_prompt": "\x1b[31m"}, "negative_prompt"),
    (GenerationSpec, {"prompt": "a", "model": "tiny\nsd15"}, "model"),
    (GenerationSpec, {"prompt": "a", "scheduler": "Euler\ta"}, "scheduler"),
    (GenerationSpec, {"prompt": "a", "loras": [{"id": "a\x7f"}]}, "loras.0.id"),
    (GenerationSpec, {"prompt": "a", "controls": [{"type": "openpose", "keypoints": {
        "people": [{"pose_keypoints_2d": [], "name\x00": 1}]}}]}, "controls.0.keypoints.people.0.name?"),
    (SweepSpec, {"base": {"prompt": "a"}, "title": "t\x00",
                 "axes": [{"param": "seed", "values": [1]}]}, "title"),
    (SweepSpec, {"base": {"prompt": "a"}, "axes": [{"param": "prompt", "values": ["a", "\x00"]}]},
     "axes.0.values.1"),
    (TrainingSpec, {**TRAINING, "samples": {"prompts": "a\x00"}}, "samples.prompts"),
    (TrainingSpec, {**TRAINING, "dataset_config": "[general]\x00"}, "dataset_config"),
    (TrainingSpec, {**TRAINING, "optim": {"max_train_steps": 1, "optimizer_args": {"k": "\x00"}}},
     "optim.optimizer_args.k"),
    (TrainingSpec, {**TRAINING, "network": {"target_modules": ["to_q", "to_k\n"]}},
     "network.target_modules.1"),
    (TaggingSpec, {"dataset_id": "d", "tags": {"undesired": ["ok", "b\x85"]}}, "tags.undesired.1"),
    (TaggingSpec, {"dataset_id": "d", "clean": {"replacements": [["a", "\x00"]]}},
     "clean.replacements.0.1"),
    (ItemPatch, {"caption": "a \x00 b"}, "caption"),
    (ItemPatch, {"tags": ["dog", "\x00"]}, "tags.1"),
])
def test_control_characters_are_refused_in_every_request_model(
    model: type[BaseModel], body: dict[str, Any], field: str,
) -> None:
    assert _errors(model, body) == [(field, "control_character")]


def test_multiline_fields_keep_tabs_and_line_breaks() -> None:
    assert not _errors(GenerationSpec, {"prompt": "a fox\nin snow", "negative_prompt": "a\r\n\tb"})
    assert not _errors(TrainingSpec, {**TRAINING, "samples": {"prompts": "a dog\n# note\n"},
                                      "dataset_config": "[general]\n\tshuffle_caption = true\r\n"
                                                        "[[datasets]]\n\t[[datasets.subsets]]\n"
                                                        "\timage_dir = 'img/1_dog'\n"})
    assert not _errors(ItemPatch, {"caption": "line one\nline two"})
    assert not _errors(SweepSpec, {"base": {"prompt": "a"},
                                   "axes": [{"param": "prompt", "values": ["a\nb", "c"]}]})


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def test_every_request_body_model_refuses_control_characters() -> None:
    """New request models are covered only if they derive from RequestModel: check them all."""
    from services.gateway.app import create_app

    routes: list[Any] = list(create_app().routes)
    api_routes: list[APIRoute] = []
    while routes:
        route = routes.pop()
        if isinstance(route, APIRoute):
            api_routes.append(route)
        routes += getattr(getattr(route, "original_router", None), "routes", [])
    seen: set[type[BaseModel]] = set()
    pending = [m for route in api_routes if route.body_field is not None
               for m in _models_in(route.body_field.field_info.annotation)]
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        if model.__name__.startswith("Body_"):  # FastAPI's model of a route's form fields
            for name, field in model.model_fields.items():
                if field.annotation is str or str in getattr(field.annotation, "__args__", ()):
                    refused = {kind for loc, kind in _errors(model, {name: "a\x00"}) if loc == name}
                    assert refused & {"control_character", "string_pattern_mismatch"}, name
        else:
            assert issubclass(model, RequestModel), f"{model.__name__} does not check its text"
        for field in model.model_fields.values():
            pending += _models_in(field.annotation)
    assert {GenerationSpec, TrainingSpec, TaggingSpec, SweepSpec, ItemPatch} <= seen


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _problem(response: Any, status: int = 422) -> list[dict[str, Any]]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    return response.json()["errors"]  # type: ignore[no-any-return]


def test_nul_is_a_422_naming_the_field_on_every_database(stack: RunningStack) -> None:
    png = image_bytes((200, 10, 10))
    with stack.client() as client:
        created = client.post("/v1/datasets", data={"name": "nul"},
                              files=[("files", ("a.png", png, "image/png"))])
        assert created.status_code == 201, created.text
        dataset_id = created.json()["id"]
        item_id = client.get(f"/v1/datasets/{dataset_id}/items").json()["items"][0]["id"]
        item_url = f"/v1/datasets/{dataset_id}/items/{item_id}"

        errors = _problem(client.patch(item_url, json={"caption": "a \u0000 b"}))
        assert errors[0]["field"] == "caption" and errors[0]["type"] == "control_character"
        assert "U+0000" in errors[0]["message"]
        kept = client.patch(item_url, json={"caption": "two\nlines"})
        assert kept.status_code == 200 and kept.json()["caption"] == "two lines"

        errors = _problem(client.post("/v1/trainings", json={
            "name": "x\u0000y", "dataset_id": dataset_id, "optim": {"max_train_steps": 1}}))
        assert [e["field"] for e in errors] == ["name"]
        errors = _problem(client.post("/v1/generations", json={"prompt": "a\u0000"}))
        assert [e["field"] for e in errors] == ["prompt"]

        # Form fields, path and query values reach SQL as text too.
        errors = _problem(client.post("/v1/datasets", data={"name": "a\x00b"},
                                      files=[("files", ("a.png", png, "image/png"))]))
        assert [e["field"] for e in errors] == ["name"]
        errors = _problem(client.post("/v1/loras", data={"base_model": "sd15", "name": "l\x00"},
                                      files=[("file", ("l.safetensors", b"x", "application/x"))]))
        assert [e["field"] for e in errors] == ["name"]
        errors = _problem(client.post("/v1/loras", data={"base_model": "sd\x0015"},
                                      files=[("file", ("l.safetensors", b"x", "application/x"))]))
        assert [e["field"] for e in errors] == ["base_model"]
        errors = _problem(client.get("/v1/datasets/a%00b"))
        assert [e["field"] for e in errors] == ["path.dataset_id"]
        errors = _problem(client.get(f"/v1/datasets/{dataset_id}/items", params={"cursor": "\x00"}))
        assert [e["field"] for e in errors] == ["query.cursor"]
        errors = _problem(client.get("/v1/jobs/x%00y"))
        assert [e["field"] for e in errors] == ["path.job_id"]


def test_text_files_with_control_characters_are_refused_naming_the_file(
    stack: RunningStack,
) -> None:
    png = image_bytes((10, 200, 10))
    with stack.client() as client:
        loose = client.post("/v1/datasets", data={"name": "c"}, files=[
            ("files", ("a.png", png, "image/png")),
            ("files", ("a.caption", b"a photo\x00 of a dog", "text/plain"))])
        errors = _problem(loose)
        assert errors[0]["field"] == "files[1]" and "U+0000" in errors[0]["message"]

        cases = {
            "caption": {"img/1_dog/a.caption": b"a \x00 dog"},
            "metadata": {"meta_cap.json": json.dumps({"1_dog/a": {"caption": "a \u0000 dog"}})
                         .encode()},
            "config": {"dataset_config.toml": b'[general]\ncaption_prefix = "a\\u0000"\n'},
        }
        for name, extra in cases.items():
            archive = _zip({"img/1_dog/a.png": png, **extra})
            errors = _problem(client.post("/v1/datasets", data={"name": name},
                                          files=[("zip", ("d.zip", archive, "application/zip"))]))
            assert errors[0]["field"] == f"zip:{next(iter(extra))}", (name, errors)

        # Tabs and CRLF line ends are ordinary in caption files.
        fine = client.post("/v1/datasets", data={"name": "ok"}, files=[
            ("files", ("a.png", png, "image/png")),
            ("files", ("a.caption", b"a photo\tof a dog\r\n", "text/plain"))])
        assert fine.status_code == 201, fine.text
