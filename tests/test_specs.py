"""Spec rules that need the model registry, and settings that must refuse to start."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.generations.resolve import resolve_generation
from shared.errors import ValidationFailed
from shared.models import ModelRegistry, canonical_scheduler
from shared.settings import Settings
from shared.specs import EXAMPLE_POSE, GenerationSpec

REGISTRY = ModelRegistry.load()
POSE = {"people": [{"pose_keypoints_2d": EXAMPLE_POSE}]}


def resolve(**fields: object) -> GenerationSpec:
    return resolve_generation(GenerationSpec(prompt="p", **fields),  # type: ignore[arg-type]
                              registry=REGISTRY, default_model="tiny-sd15")


def test_family_defaults_fill_the_spec() -> None:
    flux = resolve(model="flux-schnell")
    assert (flux.width, flux.steps, flux.guidance_scale) == (1024, 4, 0.0)
    sd15 = resolve(model="sd15")
    assert (sd15.width, sd15.height, sd15.steps, sd15.guidance_scale) == (512, 512, 25, 7.5)
    assert sd15.seed is not None and 0 <= sd15.seed < 2**32


def test_scheduler_names_are_matched_like_people_type_them() -> None:
    assert canonical_scheduler("euler  A") == "Euler a"
    assert canonical_scheduler("dpm++ 2m karras") == "DPM++ 2M Karras"
    assert resolve(scheduler="ddim").scheduler == "DDIM"
    with pytest.raises(ValidationFailed) as info:
        resolve(model="flux-dev", scheduler="DDIM")  # flow-matching models have one sampler
    assert info.value.errors[0]["field"] == "scheduler"


def test_model_limits_are_checked_before_queueing() -> None:
    with pytest.raises(ValidationFailed) as info:
        resolve(model="flux-schnell", steps=20, width=128)
    assert {e["field"] for e in info.value.errors} == {"steps", "width"}
    with pytest.raises(ValidationError):
        GenerationSpec(prompt="p", height=100)  # not a multiple of 8


def test_models_file_adds_presets(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nname = "mine"\nfamily = "sdxl"\nsource = "/weights/mine"\n')
    registry = ModelRegistry.load(path)
    assert registry.get("mine") is not None and registry.get("tiny-sd15") is not None
    assert registry.get("mine").limits.default_size == 1024  # type: ignore[union-attr]


def test_production_refuses_the_development_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOOMIS_ENV", "production")
    with pytest.raises(ValidationError, match="SIGNING_SECRET"):
        Settings()
    monkeypatch.setenv("LOOMIS_GATEWAY__SIGNING_SECRET", "a-real-secret")
    assert Settings().env == "production"


def test_modes_require_their_inputs_and_nothing_else() -> None:
    with pytest.raises(ValidationError, match="needs `init_image`"):
        GenerationSpec(prompt="p", mode="img2img")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="needs `mask`"):
        GenerationSpec(prompt="p", mode="inpaint", init_image="upload:a")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="not used by mode 'txt2img'"):
        GenerationSpec(prompt="p", init_image="upload:a")
    with pytest.raises(ValidationError, match="exactly one of"):
        GenerationSpec(prompt="p", mode="inpaint", init_image="upload:a",  # type: ignore[arg-type]
                       mask={"image": "upload:b", "shapes": [{"type": "circle", "cx": 1,
                                                             "cy": 1, "r": 1}]})
    with pytest.raises(ValidationError, match="start"):
        GenerationSpec(prompt="p", controls=[{"type": "depth", "image": "upload:a",  # type: ignore[list-item]
                                              "start": 0.9, "end": 0.1}])
    with pytest.raises(ValidationError, match="keypoints"):  # checked at the gateway, not later
        GenerationSpec(prompt="p", controls=[{"type": "openpose",  # type: ignore[list-item]
                                              "keypoints": {"people": [{"pose_keypoints_2d": [1, 2]}]}}])
    with pytest.raises(ValidationError, match="only for type 'openpose'"):
        GenerationSpec(prompt="p", controls=[{"type": "canny", "keypoints": {}}])  # type: ignore[list-item]


def test_image_modes_default_to_the_input_size_and_strength() -> None:
    spec = GenerationSpec(prompt="p", mode="img2img", init_image="upload:a")  # type: ignore[arg-type]
    img2img = resolve_generation(spec, registry=REGISTRY, default_model="tiny-sd15",
                                 input_size=(3000, 1500))
    assert (img2img.width, img2img.height, img2img.strength) == (1024, 512, 0.75)
    out = GenerationSpec(prompt="p", mode="outpaint", init_image="upload:a",  # type: ignore[arg-type]
                         outpaint={"left": 16, "bottom": 8})
    resolved = resolve_generation(out, registry=REGISTRY, default_model="tiny-sd15",
                                  input_size=(75, 64))
    assert (resolved.width, resolved.height, resolved.strength) == (72 + 16, 64 + 8, 1.0)
    with pytest.raises(ValidationFailed) as few_steps:
        resolve(mode="img2img", init_image="upload:a", strength=0.1, steps=4)
    assert few_steps.value.errors[0]["field"] == "strength"
    with pytest.raises(ValidationFailed) as no_net:
        resolve(model="flux-schnell", controls=[{"type": "openpose", "keypoints": POSE}])
    assert no_net.value.errors[0]["field"] == "controls.0.type"


def test_masks_from_shapes_feather_and_partial_values() -> None:
    from services.gateway.images import mask_is_empty, render_mask

    mask = render_mask([{"type": "rect", "x": 2, "y": 2, "width": 4, "height": 4},
                        {"type": "polygon", "points": [(10, 10), (15, 10), (15, 15)],
                         "value": 0.5}], size=(16, 16))
    assert mask.getpixel((3, 3)) == 255 and mask.getpixel((0, 0)) == 0
    assert mask.getpixel((14, 11)) == 128  # grey: partial repaint
    soft = render_mask([{"type": "rect", "x": 4, "y": 4, "width": 8, "height": 8}],
                       size=(16, 16), feather=2)
    assert 0 < soft.getpixel((3, 8)) < 255  # the edge is blended
    assert mask_is_empty(render_mask([{"type": "circle", "cx": 5, "cy": 5, "r": 3, "value": 0}],
                                     size=(16, 16)))


@pytest.mark.parametrize("model", ["GenerationSpec", "SweepSpec", "PreprocessSpec"])
def test_openapi_examples_are_valid_requests(model: str) -> None:
    import shared.specs as specs

    cls = getattr(specs, model)
    examples = cls.model_config["json_schema_extra"]["examples"]
    assert examples
    for example in examples:
        cls.model_validate(example)


def test_sweep_errors_name_the_cell_that_fails() -> None:
    from services.gateway.sweeps.cells import sweep_cells
    from shared.specs import SweepSpec

    sweep = SweepSpec.model_validate({
        "base": {"prompt": "p", "mode": "img2img", "init_image": "upload:a", "strength": 0.3},
        "axes": [{"param": "steps", "values": [10, 2]}]})
    with pytest.raises(ValidationFailed) as failed:
        sweep_cells(sweep, resolve=lambda spec: resolve_generation(
            spec, registry=REGISTRY, default_model="tiny-sd15", input_size=(64, 64)))
    assert failed.value.errors[0]["field"] == "axes.0.values.1"
    assert "strength" in failed.value.errors[0]["message"]
    cells = sweep_cells(sweep.model_copy(update={"base": sweep.base.model_copy(
        update={"strength": 0.6})}), resolve=lambda spec: resolve_generation(
            spec, registry=REGISTRY, default_model="tiny-sd15", input_size=(64, 64)))
    assert [(c.col, c.spec.steps) for c in cells] == [(0, 10), (1, 2)]


def test_sweep_grid_errors_name_their_field() -> None:
    from pydantic import ValidationError

    from shared.specs import SweepSpec

    cases = [
        ({"base": {"prompt": "a"}, "axes": [{"param": "seed", "values": list(range(9))},
                                            {"param": "steps", "values": list(range(1, 9))}]},
         ("axes",)),
        ({"base": {"prompt": "a"}, "axes": [{"param": "seed", "values": [1]},
                                            {"param": "seed", "values": [2]}]},
         ("axes", 1, "param")),
        ({"base": {"prompt": "a", "num_images": 2}, "axes": [{"param": "seed", "values": [1]}]},
         ("base", "num_images")),
    ]
    for body, loc in cases:
        with pytest.raises(ValidationError) as caught:
            SweepSpec.model_validate(body)
        assert [e["loc"] for e in caught.value.errors()] == [loc]
