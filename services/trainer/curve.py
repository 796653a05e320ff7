"""A training run's per-step metrics as a JSON document and a loss-curve PNG.

Both are written next to the checkpoints as the run goes, so a run that dies still leaves
its curve, and a resumed run continues the same document. PIL draws the chart: the image
stack already ships it, and a plotting library would be a large dependency for one line.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw

_SIZE = (800, 400)
_MARGIN = (60, 20, 20, 40)  # left, top, right, bottom


def metrics_json(points: Sequence[dict[str, Any]]) -> bytes:
    return json.dumps({"steps": list(points)}, separators=(",", ":")).encode()


def read_metrics(data: bytes) -> list[dict[str, Any]]:
    """The steps of a stored document; one that does not parse is an empty history, since
    the curve is a convenience and must never stop a resumed run."""
    try:
        steps = json.loads(data).get("steps", [])
    except (ValueError, AttributeError):
        return []
    return [p for p in steps if isinstance(p, dict) and isinstance(p.get("step"), int)]


def loss_curve_png(points: Sequence[dict[str, Any]]) -> bytes:
    """Per-step loss (light) and its running average (dark) against the step."""
    image = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = _MARGIN
    width, height = _SIZE[0] - left - right, _SIZE[1] - top - bottom
    draw.rectangle((left, top, left + width, top + height), outline="black")
    series = {key: [(int(p["step"]), float(p[key])) for p in points
                    if isinstance(p.get(key), int | float) and math.isfinite(p[key])]
              for key in ("loss", "avr_loss")}
    values = [v for line in series.values() for _, v in line]
    steps = [s for line in series.values() for s, _ in line]
    if values:
        low, high = min(values), max(values)
        if high - low < 1e-12:
            low, high = low - 0.5, high + 0.5
        first, last = min(steps), max(steps)
        span = max(last - first, 1)

        def at(step: int, value: float) -> tuple[float, float]:
            return (left + (step - first) / span * width,
                    top + (high - value) / (high - low) * height)

        for key, colour in (("loss", (150, 180, 230)), ("avr_loss", (20, 60, 160))):
            line = [at(s, v) for s, v in series[key]]
            if len(line) > 1:
                draw.line(line, fill=colour, width=2)
            elif line:
                x, y = line[0]
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((4, top), f"{high:.4g}", fill="black")
        draw.text((4, top + height - 10), f"{low:.4g}", fill="black")
        draw.text((left, top + height + 6), f"step {first}", fill="black")
        draw.text((left + width - 70, top + height + 6), f"step {last}", fill="black")
    draw.text((left + width // 2 - 40, top + height + 20), "loss / step", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
