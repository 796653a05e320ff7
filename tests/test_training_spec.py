"""Training requests checked before a job exists, and kohya's regularisation balancing."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.gateway.trainings.service import _balance_regularisation
from shared.training import TrainingExample, TrainingSpec, check_optimizer


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


def test_options_not_built_yet_are_refused_not_ignored() -> None:
    base = {"name": "x", "dataset_id": "d", "optim": {"max_train_steps": 10}}
    with pytest.raises(ValidationError, match="random_crop"):
        TrainingSpec.model_validate({**base, "data": {"random_crop": True}})
    with pytest.raises(ValidationError, match="max_token_length"):
        TrainingSpec.model_validate({**base, "diffusion": {"max_token_length": 150}})
