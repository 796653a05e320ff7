"""LoRA training for SD1.5-family diffusers models; the worker that runs jobs lives beside it."""

from services.trainer.train import (
    LoraTrainer,
    OptimizerUnavailable,
    SamplePrompt,
    TrainConfig,
    TrainExample,
    TrainResult,
)

__all__ = ["LoraTrainer", "OptimizerUnavailable", "SamplePrompt", "TrainConfig", "TrainExample",
           "TrainResult"]
