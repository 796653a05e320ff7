"""The outpainting canvas: the image on a larger canvas, and the mask of what to paint."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFilter


def outpaint_canvas(
    image: Image.Image, *, left: int, right: int, top: int, bottom: int, overlap: int = 8,
    feather: float = 8.0,
) -> tuple[Image.Image, Image.Image]:
    """Extend the canvas and return (canvas, mask) for an inpainting pass over the new area.

    The new area starts as the stretched edge pixels (not black), which gives the model
    colours to continue from; the mask reaches ``overlap`` px into the original so the seam
    is repainted too, and is feathered so it blends.
    """
    w, h = image.size
    canvas_size = (w + left + right, h + top + bottom)
    canvas = image.resize(canvas_size, Image.Resampling.BICUBIC).filter(
        ImageFilter.GaussianBlur(radius=max(canvas_size) / 32)
    )
    canvas.paste(image, (left, top))
    def inset(by: int) -> tuple[int, int, int, int]:
        return (left + (by if left else 0), top + (by if top else 0),
                left + w - (by if right else 0), top + h - (by if bottom else 0))

    mask = Image.new("L", canvas_size, 255)
    keep = inset(overlap)
    if keep[2] > keep[0] and keep[3] > keep[1]:  # a small image may be all seam
        ImageDraw.Draw(mask).rectangle((keep[0], keep[1], keep[2] - 1, keep[3] - 1), fill=0)
    if feather > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(radius=feather))
        # The blur must not reach deep into the original: past the seam it stays exactly as sent.
        untouched = inset(overlap + math.ceil(2 * feather))
        if untouched[2] > untouched[0] and untouched[3] > untouched[1]:
            ImageDraw.Draw(mask).rectangle(
                (untouched[0], untouched[1], untouched[2] - 1, untouched[3] - 1), fill=0)
    return canvas, mask
