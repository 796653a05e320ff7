"""ControlNet inputs: what the gateway can refuse before a worker is involved."""

from __future__ import annotations

from shared.errors import ValidationFailed


def check_openpose_photo(state_openpose_detector: bool, field: str) -> None:
    if not state_openpose_detector:
        raise ValidationFailed([{"field": field, "message": (
            "openpose from a photo needs the controlnet-aux extra and its detector weights on "
            "the workers (LOOMIS_GENERATOR__OPENPOSE_DETECTOR=true); send `keypoints` "
            "(OpenPose JSON) or a ready pose image with `preprocess: false`")}])
