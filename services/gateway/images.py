"""Image inputs: decoding untrusted bytes safely, and masks from shapes.

Pillow only (no numpy, no torch) so the gateway can check every uploaded image before a job
exists; the worker reads the checked PNGs the gateway stored and never decodes client bytes.
The outpainting canvas is the generator's (``services/generator/outpaint.py``).
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFilter, ImageOps, UnidentifiedImageError

from shared.errors import ValidationFailed

# Pillow's own bomb guard warns above this many pixels and raises above twice as many; we
# raise at our own limit instead, before decoding pixel data.
MAX_INPUT_PIXELS = 4096 * 4096
MAX_INPUT_BYTES = 32 * 1024 * 1024
ALLOWED_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF", "TIFF"})  # MPO: phone JPEGs


@dataclass(frozen=True)
class CheckedImage:
    """A decoded, size-checked image, re-encoded as PNG for storage."""

    image: Image.Image
    png: bytes
    source_format: str

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


def _fail(field: str, message: str, *, status: int = 422) -> ValidationFailed:
    error = ValidationFailed([{"field": field, "message": message}])
    error.status = status
    return error


def decode_image(data: bytes, *, field: str, mode: str = "RGB") -> CheckedImage:
    """Open untrusted bytes as an image, refusing non-images and decompression bombs.

    The pixel count is checked from the header before any pixel data is decoded, so a tiny
    file that claims to be 100k x 100k costs nothing. EXIF orientation is applied so a phone
    photo's mask lines up with what the user saw.
    """
    if not data:
        raise _fail(field, "the image is empty")
    if len(data) > MAX_INPUT_BYTES:
        raise _fail(field, f"the image is {len(data)} bytes; the limit is {MAX_INPUT_BYTES}",
                    status=413)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            width, height = probe.size
            if width * height > MAX_INPUT_PIXELS:
                raise _fail(field, f"the image is {width}x{height}; at most {MAX_INPUT_PIXELS} "
                            "pixels are accepted", status=413)
            if probe.format not in ALLOWED_FORMATS:
                raise _fail(field, f"{probe.format} images are not accepted; send PNG, JPEG or WebP")
            probe.load()
            image = ImageOps.exif_transpose(probe) or probe
            image = image.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _fail(field, "the image is too large to decode (decompression bomb guard)",
                    status=413) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _fail(field, "not a readable image (PNG, JPEG or WebP expected)") from exc
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return CheckedImage(image=image, png=buffer.getvalue(), source_format=str(probe.format))


def decode_data_url(value: str, *, field: str) -> bytes:
    """``data:image/png;base64,...`` (or bare base64) to bytes, with the field named on error."""
    if value.startswith("data:"):
        head, sep, payload = value.partition(",")
        if not sep or ";base64" not in head:
            raise _fail(field, "a data: URL must look like data:image/png;base64,<data>")
    else:
        payload = value
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _fail(field, "not valid base64 image data") from exc


def render_mask(
    shapes: list[dict[str, object]], *, size: tuple[int, int], feather: float = 0.0,
    invert: bool = False,
) -> Image.Image:
    """Draw white-means-repaint shapes on black; ``value`` < 1 gives a grey (partial) repaint.

    Feathering blurs the edges so the repainted region blends into the original instead of
    leaving a seam.
    """
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for shape in shapes:
        fill = round(255 * float(shape.get("value", 1.0)))  # type: ignore[arg-type]
        kind = shape["type"]
        if kind == "rect":
            x, y = float(shape["x"]), float(shape["y"])  # type: ignore[arg-type]
            w, h = float(shape["width"]), float(shape["height"])  # type: ignore[arg-type]
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=fill)
        elif kind in ("ellipse", "circle"):
            cx, cy = float(shape["cx"]), float(shape["cy"])  # type: ignore[arg-type]
            if kind == "circle":
                rx = ry = float(shape["r"])  # type: ignore[arg-type]
            else:
                rx, ry = float(shape["rx"]), float(shape["ry"])  # type: ignore[arg-type]
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)
        elif kind == "polygon":
            points = [(float(p[0]), float(p[1])) for p in shape["points"]]  # type: ignore[attr-defined]
            draw.polygon(points, fill=fill)
        else:  # the spec's discriminated union makes this unreachable for validated input
            raise ValueError(f"unknown shape {kind!r}")
    if feather > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(radius=feather))
    if invert:
        mask = ImageOps.invert(mask)
    return mask


def mask_is_empty(mask: Image.Image) -> bool:
    """A mask that repaints nothing would silently return the input image: refuse it."""
    return mask.convert("L").getbbox() is None


def fit_mask(mask: Image.Image, *, size: tuple[int, int], field: str) -> Image.Image:
    """Resize a mask to its image; a different aspect ratio means it was made for another image."""
    mw, mh = mask.size
    w, h = size
    if abs(mw / mh - w / h) > 0.01:
        raise _fail(field, f"the mask is {mw}x{mh} but the image is {w}x{h}; the mask must have "
                    "the image's size (or at least its aspect ratio)")
    return mask if mask.size == size else mask.resize(size, Image.Resampling.BILINEAR)
