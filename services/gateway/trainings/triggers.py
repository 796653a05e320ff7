"""Which trigger words a training will really teach, checked against its captions at planning."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shared.tagging import has_trigger
from shared.training import TrainingExample


@dataclass(frozen=True)
class TriggerGap:
    """A subset whose training captions lack every trigger word, for a warning."""

    subset: str
    lacking: int
    captions: int
    candidates: tuple[str, ...]

    @property
    def message(self) -> str:
        return (f"{self.lacking} of {self.captions} captions of subset {self.subset!r} lack the "
                f"trigger ({' or '.join(repr(w) for w in self.candidates)}): in kohya a caption "
                "replaces the class tokens, so training does not see it there; tag the dataset "
                "again (prefix_trigger puts it first) or write it into the captions")


def trained_triggers(examples: Sequence[TrainingExample],
                     candidates: Sequence[str]) -> tuple[list[str], list[TriggerGap]]:
    """The trigger words training will actually see, and each subset whose captions lack them.

    ``candidates`` are the DreamBooth class tokens (``sks dog``). kohya trains on a caption
    file as it is, so a subset whose images have captions without the tokens never shows them
    to the model: reporting them would promise a trigger that does nothing. A word counts when
    it is in at least one training (not regularisation) caption, with the subset's
    ``caption_prefix``/``caption_suffix`` around it as kohya adds them. The gateway's job
    submission and its plan share this, so the plan shows what the job will report.
    """
    fed: dict[str, list[str]] = {}
    for example in examples:
        if example.is_reg:
            continue
        options = example.options
        parts = (options.caption_prefix if options else None, example.caption,
                 options.caption_suffix if options else None)
        fed.setdefault(example.subset, []).append(" ".join(p for p in parts if p))
    seen = [word for word in candidates
            if any(has_trigger(caption, word) for captions in fed.values() for caption in captions)]
    gaps = []
    for subset, captions in fed.items():
        lacking = sum(not any(has_trigger(c, word) for word in candidates) for c in captions)
        if candidates and lacking:
            gaps.append(TriggerGap(subset=subset, lacking=lacking, captions=len(captions),
                                   candidates=tuple(candidates)))
    return seen, gaps
