"""kohya sd-scripts rules the gateway and the trainer both apply, without torch.

The training options' bounds and how resolution and buckets must relate, which a request's
``data`` options (``shared.training``) and a dataset config TOML (the gateway's
``services/gateway/datasets/kohya.py``) are held to alike; and what a ``--sample_prompts``
file asks for, which the gateway refuses early and the trainer renders. Everything here
follows sd-scripts' own rules (``library/config_util.py`` and ``library/train_util.py``),
re-implemented from their documented behaviour; where Loomis is stricter than kohya (kohya
warns or silently ignores) the docstring says so.

* :func:`bucketing_problems` checks resolution against the bucket options.
* :func:`parse_sample_prompts` is kohya's prompt-file syntax (``--n --w --h --d --l --s --ss``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A kohya config or prompt file that kohya would reject or misread.

    ``field`` is the dotted path of the offending value (``datasets.0.subsets.1.num_repeats``),
    or the option (``--w``) for a prompt file, whose ``line`` (1-based) is then set too.
    """

    def __init__(self, message: str, *, field: str, line: int | None = None) -> None:
        where = f"line {line}: " if line is not None else (f"{field}: " if field else "")
        super().__init__(where + message)
        self.field = field
        self.message = message
        self.line = line


# What Loomis accepts for the training resolution and bucket options, in the request and in a
# TOML alike (:func:`bucketing_problems` adds how they must relate). Outside them a bucket has
# no pixels (a resolution below one bucket step), kohya trains at another size than the one
# asked for (above max_bucket_reso), or the VAE cannot encode it (not a multiple of 8).
MIN_RESOLUTION = 64  # 8 latent pixels a side
MAX_RESOLUTION = 4096
RESOLUTION_MULTIPLE = 8  # the VAE's downscale
MAX_BUCKET_RESO_STEPS = 1024


# ---------------------------------------------------------------------------------------------
# Buckets

def bucketing_problems(*, resolution: tuple[int, int] | None, enable_bucket: bool, min_bucket_reso: int,
                       max_bucket_reso: int, bucket_reso_steps: int,
                       bucket_no_upscale: bool = False) -> list[tuple[str, str]]:
    """What is wrong between resolution and bucket options, as ``(option, message)`` pairs.

    The relations kohya asserts at start-up (``adjust_min_max_bucket_reso_by_steps``: the
    resolution within ``[min_bucket_reso, max_bucket_reso]``), plus the ones it only warns
    about or rounds silently (multiples of ``bucket_reso_steps``, steps a multiple of 8), so
    that the buckets kohya would train at are the ones the job reports. Each value's own range
    is its caller's to check.
    """
    problems: list[tuple[str, str]] = []
    steps = bucket_reso_steps
    if steps % RESOLUTION_MULTIPLE:
        problems.append(("bucket_reso_steps", f"must be a multiple of {RESOLUTION_MULTIPLE} (the VAE's "
                         f"downscale), got {steps}"))
        return problems
    if min_bucket_reso > max_bucket_reso:
        problems.append(("min_bucket_reso", f"{min_bucket_reso} is above max_bucket_reso {max_bucket_reso}"))
    bucketing = enable_bucket and not bucket_no_upscale
    if bucketing:
        for key, value in (("min_bucket_reso", min_bucket_reso), ("max_bucket_reso", max_bucket_reso)):
            if value % steps:
                problems.append((key, f"must be a multiple of bucket_reso_steps ({steps}), got {value}"))
    if resolution is None:
        return problems
    width, height = resolution
    multiple = steps if enable_bucket else RESOLUTION_MULTIPLE
    if width % multiple or height % multiple:
        reason = f"bucket_reso_steps ({steps})" if enable_bucket else f"{RESOLUTION_MULTIPLE}"
        problems.append(("resolution", f"{width}x{height} is not a multiple of {reason}"))
    elif bucketing and min(width, height) < min_bucket_reso:
        problems.append(("resolution", f"{width}x{height} is below min_bucket_reso {min_bucket_reso}; "
                         "lower min_bucket_reso or raise the resolution"))
    elif bucketing and max(width, height) > max_bucket_reso:
        problems.append(("resolution", f"{width}x{height} is above max_bucket_reso {max_bucket_reso} "
                         "(kohya would train at smaller buckets); raise max_bucket_reso or lower "
                         "the resolution"))
    return problems


# ---------------------------------------------------------------------------------------------
# Sample prompts

# kohya's --sample_sampler choices, in its order.
KOHYA_SAMPLERS: tuple[str, ...] = (
    "ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsolver++",
    "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a",
)


def kohya_sampler(value: str) -> str:
    """A kohya sampler name as kohya reads it (case-insensitive), or :class:`ConfigError`
    saying which ones there are."""
    name = value.strip().lower()
    if name not in KOHYA_SAMPLERS:
        close = difflib.get_close_matches(name, KOHYA_SAMPLERS, n=3)
        hint = (f"; did you mean {' or '.join(close)}?" if close
                else f"; kohya has {', '.join(KOHYA_SAMPLERS)}")
        raise ConfigError(f"unknown sampler {value!r}{hint}", field="")
    return name


# kohya's sample_images defaults for what a prompt line leaves out.
SAMPLE_DEFAULT_SIZE = 512
SAMPLE_DEFAULT_SCALE = 7.5
SAMPLE_DEFAULT_STEPS = 30
_UINT_RE = re.compile(r"\d+")
_UFLOAT_RE = re.compile(r"\d+(\.\d*)?|\.\d+")


@dataclass(frozen=True, kw_only=True)
class SamplePrompt:
    """One line of a kohya ``--sample_prompts`` file, with kohya's defaults filled in.

    ``seed`` None is a random seed; ``sampler`` None means the trainer's ``--sample_sampler``.
    ``ignored`` lists the options kohya does not know and skips (``--ar 16:9``).
    """

    prompt: str
    negative: str = ""
    width: int = SAMPLE_DEFAULT_SIZE
    height: int = SAMPLE_DEFAULT_SIZE
    seed: int | None = None
    scale: float = SAMPLE_DEFAULT_SCALE
    steps: int = SAMPLE_DEFAULT_STEPS
    sampler: str | None = None
    line: int = 0
    ignored: tuple[str, ...] = ()


def _sample_size(value: str, option: str, line: int) -> int:
    # kohya renders at a multiple of 8, at least 64
    return max(64, _sample_int(value, option, line) // 8 * 8)


def _sample_int(value: str, option: str, line: int) -> int:
    if not _UINT_RE.fullmatch(value):
        raise ConfigError(f"{option} expects a whole number, got {value!r}", field=option, line=line)
    return int(value)


def _sample_float(value: str, option: str, line: int) -> float:
    if not _UFLOAT_RE.fullmatch(value):
        raise ConfigError(f"{option} expects a number, got {value!r}", field=option, line=line)
    return float(value)


def _sample_sampler(value: str, option: str, line: int) -> str:
    try:
        return kohya_sampler(value)
    except ConfigError as exc:
        raise ConfigError(exc.message, field=option, line=line) from exc


_SAMPLE_OPTIONS: dict[str, tuple[str, Callable[[str, str, int], object]]] = {
    "n": ("negative", lambda value, _option, _line: value),
    "w": ("width", _sample_size),
    "h": ("height", _sample_size),
    "d": ("seed", _sample_int),
    "l": ("scale", _sample_float),
    "s": ("steps", lambda value, option, line: min(1000, max(1, _sample_int(value, option, line)))),
    "ss": ("sampler", _sample_sampler),
}


def parse_sample_prompts(text: str) -> list[SamplePrompt]:
    """Read kohya's ``.txt`` prompt file: one prompt per line, options after `` --``.

    As kohya does: a line is skipped when blank or when its very first character is ``#``; the
    line is split at every `` --``, the first piece is the prompt and each later piece is an
    option letter, a space and its value (``--n`` negative prompt, ``--w``/``--h`` size rounded
    down to a multiple of 8 and at least 64, ``--d`` seed, ``--l`` CFG scale, ``--s`` steps
    clamped to 1..1000, ``--ss`` sampler), option names case-insensitive, a later repeat
    winning. Unknown options are skipped like kohya skips them (listed in ``ignored``). Stricter
    than kohya, which logs and skips a value it cannot read: a bad number or an unknown sampler
    raises :class:`ConfigError` with the line number.
    """
    prompts: list[SamplePrompt] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or raw.startswith("#"):
            continue
        prompt, *options = line.split(" --")
        values: dict[str, Any] = {}
        ignored: list[str] = []
        for piece in options:
            name, _, value = piece.partition(" ")
            option = _SAMPLE_OPTIONS.get(name.lower())
            if option is None:
                ignored.append("--" + piece.strip())
                continue
            target, convert = option
            values[target] = convert(value.strip(), f"--{name.lower()}", number)
        prompts.append(SamplePrompt(prompt=prompt.strip(), line=number, ignored=tuple(ignored), **values))
    return prompts
