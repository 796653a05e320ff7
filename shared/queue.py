"""Queue names and task names: one arq queue per service, so each worker pool scales alone."""

from __future__ import annotations

GENERATOR_QUEUE = "loomis:queue:generator"
TRAINER_QUEUE = "loomis:queue:trainer"
TAGGER_QUEUE = "loomis:queue:tagger"

GENERATE_TASK = "generate"
PREPROCESS_TASK = "preprocess_control"
SWEEP_TASK = "sweep"
TAG_TASK = "tag_dataset"
TRAIN_TASK = "train_lora"
SCENE_TASK = "scene"
MATCH_ACTIONS_TASK = "match_actions"
