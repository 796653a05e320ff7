"""Training requests checked before a job exists, and kohya's regularisation balancing."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.trainings.service import _balance_regularisation, check_optimizer
from shared.training import TrainingExample, TrainingSpec


def examples(train: int, train_repeats: int, reg: int) -> list[TrainingExample]:
    out = [TrainingExample(key=f"t{i}", caption="sks dog", repeats=train_repeats,
                           subset=f"{train_repeats}_sks dog", bucket=(512, 512))
           for i in range(train)]
    out += [TrainingExample(key=f"r{i}", caption="dog", repeats=1, is_reg=True, subset="1_dog",
                            bucket=(512, 512)) for i in range(reg)]
    return out


@pytest.mark.parametrize(("reg", "used", "reg_items"), [(200, 50, 50), (20, 20, 50), (0, 0, 0)])
def test_regularisation_is_balanced_like_kohya(reg: int, used: int, reg_items: int) -> None:
    balanced = _balance_regularisation(examples(5, 10, reg), batch_size=1)
    regs = [e for e in balanced if e.is_reg]
    assert len(regs) == used  # surplus regularisation images are not used
    assert sum(e.repeats for e in regs) == reg_items  # as many as the repeated training images
    assert sum(e.repeats for e in balanced if not e.is_reg) == 50


def test_training_spec_refuses_what_kohya_refuses() -> None:
    base = {"name": "x", "dataset_id": "d", "optim": {"max_train_steps": 10}}
    with pytest.raises(ValidationError, match="cache_latents"):
        TrainingSpec.model_validate({**base, "diffusion": {"cache_latents": True},
                                     "data": {"color_aug": True}})
    with pytest.raises(ValidationError, match="max_train_steps"):
        TrainingSpec.model_validate({"name": "x", "dataset_id": "d"})
    with pytest.raises(ValidationError):
        TrainingSpec.model_validate({**base, "network": {"rank": 0}})
    spec = TrainingSpec.model_validate({**base, "optim": {"max_train_steps": 1,
                                                          "optimizer": "Prodigy"}})
    error = check_optimizer(spec, set())
    assert error is not None and "prodigyopt" in error["message"]
    assert check_optimizer(spec, {"Prodigy"}) is None


def test_random_crop_and_long_captions_are_accepted_and_kept_apart_from_cached_latents() -> None:
    base = {"name": "x", "dataset_id": "d", "optim": {"max_train_steps": 10}}
    spec = TrainingSpec.model_validate({**base, "data": {"random_crop": True},
                                        "diffusion": {"max_token_length": 225}})
    assert spec.data.random_crop and spec.diffusion.max_token_length == 225
    with pytest.raises(ValidationError, match="max_token_length"):
        TrainingSpec.model_validate({**base, "diffusion": {"max_token_length": 100}})
    with pytest.raises(ValidationError, match="random_crop"):
        TrainingSpec.model_validate({**base, "data": {"random_crop": True},
                                     "diffusion": {"cache_latents": True}})


def _error_fields(body: dict) -> dict[str, str]:  # type: ignore[type-arg]
    with pytest.raises(ValidationError) as info:
        TrainingSpec.model_validate(body)
    return {".".join(map(str, e["loc"])): e["msg"] for e in info.value.errors()}


BASE = {"name": "x", "dataset_id": "d", "optim": {"max_train_steps": 10}}


@pytest.mark.parametrize(("data", "field", "words"), [
    ({"resolution": 8}, "data.resolution", "greater than or equal to 64"),
    ({"resolution": 0}, "data.resolution", "greater than or equal to 64"),
    ({"resolution": -64}, "data.resolution", "greater than or equal to 64"),
    ({"resolution": 63}, "data.resolution", "multiple of 8"),
    ({"resolution": 100000}, "data.resolution", "less than or equal to 4096"),
    ({"resolution": [64, 0]}, "data.resolution.1", "greater than or equal to 64"),
    ({"resolution": 8, "enable_bucket": False}, "data.resolution", "greater than or equal"),
    ({"resolution": 64}, "data.resolution", "below min_bucket_reso 256"),
    ({"resolution": 2048}, "data.resolution", "above max_bucket_reso 1024"),
    ({"resolution": 520}, "data.resolution", "multiple of bucket_reso_steps (64)"),
    ({"bucket_reso_steps": 100000}, "data.bucket_reso_steps", "less than or equal to 1024"),
    ({"bucket_reso_steps": 12}, "data.bucket_reso_steps", "multiple of 8"),
    ({"bucket_reso_steps": 512}, "data.min_bucket_reso", "multiple of bucket_reso_steps"),
    ({"min_bucket_reso": 1024, "max_bucket_reso": 512}, "data.min_bucket_reso", "above"),
])
def test_resolution_and_buckets_are_bounded_at_their_field(data: dict, field: str,  # type: ignore[type-arg]
                                                           words: str) -> None:
    errors = _error_fields({**BASE, "data": data})
    assert field in errors and words in errors[field], errors


def test_in_bounds_resolutions_are_accepted() -> None:
    spec = TrainingSpec.model_validate({**BASE, "data": {"resolution": 64, "min_bucket_reso": 64,
                                                         "max_bucket_reso": 128}})
    assert spec.data.size == (64, 64)
    spec = TrainingSpec.model_validate({**BASE, "data": {"resolution": [512, 768]}})
    assert spec.data.size == (512, 768)
    spec = TrainingSpec.model_validate({**BASE, "data": {"resolution": 72, "enable_bucket": False}})
    assert spec.data.size == (72, 72)


def test_every_error_is_reported_at_its_own_path() -> None:
    errors = _error_fields({"name": "x", "network": {"rank": 0},
                            "diffusion": {"max_token_length": 100}, "data": {"resolution": 63}})
    assert {"dataset_id", "network.rank", "optim.max_train_steps", "diffusion.max_token_length",
            "data.resolution"} <= set(errors)
    assert "body" not in errors and "" not in errors
    assert _error_fields({**BASE, "diffusion": {"cache_latents": True},
                          "data": {"flip_aug": True}}).keys() == {"diffusion.cache_latents"}


def test_sample_prompts_are_checked_before_a_job_exists() -> None:
    errors = _error_fields({**BASE, "samples": {"prompts": "a dog\na cat --ss eulr"}})
    assert "line 2" in errors["samples.prompts"] and "euler" in errors["samples.prompts"]
    assert "4096" in _error_fields({**BASE, "samples": {"prompts": "a --w 9000"}})["samples.prompts"]


@pytest.mark.parametrize("name", ["../../etc/passwd", "sks dog", ".hidden", "x" * 65, "a\u0007"])
def test_the_lora_a_training_makes_follows_the_lora_name_rule(name: str) -> None:
    assert set(_error_fields({**BASE, "name": name})) == {"name"}
    assert TrainingSpec.model_validate({**BASE, "name": "sks-dog_v1.0"}).name == "sks-dog_v1.0"
