"""Labelled contact sheets for parameter sweeps.

A sweep's value is in comparing neighbours, so every cell shares one box size and every row
and column carries the parameter value that produced it. Only Pillow and its bundled font are
used, so sheets render the same on a bare worker with no system fonts and no network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

PAD = 8
LABEL_FONT_SIZE = 14
TITLE_FONT_SIZE = 18
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
WITHHELD_FILL = (128, 128, 128)
WITHHELD_INK = (235, 235, 235)
WITHHELD_TEXT = "withheld"

Cell = Image.Image | None


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """Decoding the bundled TTF on every label would dominate the render time, so it is cached."""
    font = ImageFont.load_default(size=size)
    if not isinstance(font, ImageFont.FreeTypeFont):  # only without FreeType, which wheels bundle
        raise RuntimeError("contact sheets need Pillow built with FreeType for sized labels")
    return font


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    """Rows are sized from the font's metrics, not the text, so every label line is equally tall."""
    ascent, descent = font.getmetrics()
    return ascent + descent


def _text_width(font: ImageFont.FreeTypeFont, text: str) -> int:
    return math.ceil(font.getbbox(text)[2]) if text else 0


def _axes_caption(row_axis: str, col_axis: str) -> str:
    """The corner reads like a table header: what varies down the rows \\ across the columns."""
    if row_axis and col_axis:
        return f"{row_axis} \\ {col_axis}"
    return row_axis or col_axis


def _thumbnail(image: Image.Image, max_cell: int) -> Image.Image:
    """Flattens transparency onto the sheet background so withheld-looking holes don't appear."""
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        flat.alpha_composite(rgba)
        thumb = flat.convert("RGB")
    else:
        thumb = image.convert("RGB")
    thumb.thumbnail((max_cell, max_cell), Image.Resampling.LANCZOS)
    return thumb


@dataclass(frozen=True)
class _Layout:
    rows: int
    cols: int
    cell_w: int
    cell_h: int
    col_w: int
    row_h: int
    label_w: int
    line_h: int
    title_h: int
    header_h: int
    width: int

    @property
    def header_y(self) -> int:
        return PAD + (self.title_h + PAD if self.title_h else 0)

    @property
    def grid_x(self) -> int:
        return PAD + (self.label_w + PAD if self.label_w else 0)

    @property
    def grid_y(self) -> int:
        return self.header_y + (self.header_h + PAD if self.header_h else 0)

    @property
    def height(self) -> int:
        return self.grid_y + self.rows * self.row_h + (self.rows - 1) * PAD + PAD

    def box(self, row: int, col: int) -> tuple[int, int]:
        return self.grid_x + col * (self.col_w + PAD), self.grid_y + row * (self.row_h + PAD)


def _validate(cells: list[list[Cell]], row_labels: list[str], col_labels: list[str], max_cell: int) -> None:
    if not cells or not col_labels:
        raise ValueError("a contact sheet needs at least one row and one column")
    if len(row_labels) != len(cells):
        raise ValueError(f"{len(cells)} rows but {len(row_labels)} row labels")
    for index, row in enumerate(cells):
        if len(row) != len(col_labels):
            raise ValueError(f"row {index} has {len(row)} cells for {len(col_labels)} column labels")
    if max_cell < 1:
        raise ValueError("max_cell must be at least 1")


def contact_sheet(
    cells: list[list[Image.Image | None]],
    *,
    row_labels: list[str],
    col_labels: list[str],
    title: str = "",
    row_axis: str = "",
    col_axis: str = "",
    max_cell: int = 256,
) -> Image.Image:
    """One image a person can scan to pick a sweep's best setting; ``None`` marks a withheld output.

    Every cell box is as large as the largest thumbnail (``max_cell`` when all are withheld), and
    columns widen to fit their labels. Images are only ever shrunk, never enlarged.
    """
    _validate(cells, row_labels, col_labels, max_cell)
    label_font, title_font = _font(LABEL_FONT_SIZE), _font(TITLE_FONT_SIZE)
    thumbs = [[None if image is None else _thumbnail(image, max_cell) for image in row] for row in cells]
    present = [thumb for row in thumbs for thumb in row if thumb is not None]
    cell_w = max((thumb.width for thumb in present), default=max_cell)
    cell_h = max((thumb.height for thumb in present), default=max_cell)

    caption = _axes_caption(row_axis, col_axis)
    line_h = _line_height(label_font)
    label_w = max(_text_width(label_font, text) for text in [*row_labels, caption])
    col_w = max(cell_w, *(_text_width(label_font, text) for text in col_labels))
    row_h = max(cell_h, line_h) if label_w else cell_h
    header_h = line_h if caption or any(col_labels) else 0
    title_h = _line_height(title_font) if title else 0
    rows, cols = len(cells), len(col_labels)
    grid_right = PAD + (label_w + PAD if label_w else 0) + cols * col_w + (cols - 1) * PAD + PAD
    width = max(grid_right, PAD + _text_width(title_font, title) + PAD)
    layout = _Layout(rows=rows, cols=cols, cell_w=cell_w, cell_h=cell_h, col_w=col_w, row_h=row_h,
                     label_w=label_w, line_h=line_h, title_h=title_h, header_h=header_h, width=width)

    sheet = Image.new("RGB", (layout.width, layout.height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PAD, PAD), title, font=title_font, fill=INK)
    if caption:
        draw.text((PAD, layout.header_y), caption, font=label_font, fill=INK)
    for col, text in enumerate(col_labels):
        x, _ = layout.box(0, col)
        draw.text((x + (col_w - _text_width(label_font, text)) // 2, layout.header_y), text,
                  font=label_font, fill=INK)
    for row, text in enumerate(row_labels):
        _, y = layout.box(row, 0)
        draw.text((PAD, y + (row_h - line_h) // 2), text, font=label_font, fill=INK)

    withheld = _withheld_box(cell_w, cell_h, label_font)
    for row, row_thumbs in enumerate(thumbs):
        for col, thumb in enumerate(row_thumbs):
            tile = withheld if thumb is None else thumb
            x, y = layout.box(row, col)
            sheet.paste(tile, (x + (col_w - tile.width) // 2, y + (row_h - tile.height) // 2))
    return sheet


def _withheld_box(width: int, height: int, font: ImageFont.FreeTypeFont) -> Image.Image:
    """Drawn as its own tile so the label is clipped to the box instead of spilling onto neighbours."""
    box = Image.new("RGB", (width, height), WITHHELD_FILL)
    text_x = (width - _text_width(font, WITHHELD_TEXT)) // 2
    text_y = (height - _line_height(font)) // 2
    ImageDraw.Draw(box).text((text_x, text_y), WITHHELD_TEXT, font=font, fill=WITHHELD_INK)
    return box
