"""Contact sheet geometry, recomputed here from the documented layout rather than read back from the code.

Layout: PAD around everything; a title line (if any); a header line of column labels (if any);
a left column as wide as the widest row label or axes caption (if any); cols x rows boxes of
col_w x row_h separated by PAD, where the box is the largest thumbnail, widened to fit labels.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image, ImageFont

from services.generator import sheet
from services.generator.sheet import PAD, contact_sheet

WHITE = (255, 255, 255)


def font(size: int) -> ImageFont.FreeTypeFont:
    loaded = ImageFont.load_default(size=size)
    assert isinstance(loaded, ImageFont.FreeTypeFont)
    return loaded


LABEL = font(sheet.LABEL_FONT_SIZE)
TITLE = font(sheet.TITLE_FONT_SIZE)


def width_of(face: ImageFont.FreeTypeFont, text: str) -> int:
    return math.ceil(face.getbbox(text)[2]) if text else 0


def line_of(face: ImageFont.FreeTypeFont) -> int:
    ascent, descent = face.getmetrics()
    return ascent + descent


def solid(color: tuple[int, int, int], size: tuple[int, int] = (100, 60)) -> Image.Image:
    return Image.new("RGB", size, color)


def non_background(image: Image.Image, box: tuple[int, int, int, int]) -> int:
    region = np.asarray(image.crop(box).convert("RGB"))
    return int(np.any(region != 255, axis=-1).sum())


ROWS = ["seed=42", "seed=43"]
COLS = ["guidance_scale=3", "guidance_scale=7.5", "guidance_scale=12"]


def sweep_grid(missing: tuple[int, int] | None = None) -> list[list[Image.Image | None]]:
    colors = [[(200, 30, 30), (30, 200, 30), (30, 30, 200)], [(200, 200, 30), (30, 200, 200), (200, 30, 200)]]
    return [[None if (r, c) == missing else solid(colors[r][c]) for c in range(3)] for r in range(2)]


def expected_geometry(*, cell: tuple[int, int], title: str, caption: str) -> dict[str, int]:
    line_h = line_of(LABEL)
    label_w = max(width_of(LABEL, t) for t in [*ROWS, caption])
    col_w = max(cell[0], *(width_of(LABEL, t) for t in COLS))
    row_h = max(cell[1], line_h)
    header_y = PAD + (line_of(TITLE) + PAD if title else 0)
    grid_x = PAD + label_w + PAD
    grid_y = header_y + line_h + PAD
    width = max(grid_x + 3 * col_w + 2 * PAD + PAD, PAD + width_of(TITLE, title) + PAD)
    height = grid_y + 2 * row_h + PAD + PAD
    return {"width": width, "height": height, "grid_x": grid_x, "grid_y": grid_y, "col_w": col_w,
            "row_h": row_h, "header_y": header_y, "line_h": line_h, "label_w": label_w}


def box_centre(geo: dict[str, int], row: int, col: int) -> tuple[int, int]:
    x = geo["grid_x"] + col * (geo["col_w"] + PAD) + geo["col_w"] // 2
    y = geo["grid_y"] + row * (geo["row_h"] + PAD) + geo["row_h"] // 2
    return x, y


def test_size_and_cell_offsets_follow_the_layout() -> None:
    image = contact_sheet(sweep_grid(), row_labels=ROWS, col_labels=COLS, title="cat, 20 steps",
                          row_axis="seed", col_axis="guidance_scale")
    geo = expected_geometry(cell=(100, 60), title="cat, 20 steps", caption="seed \\ guidance_scale")

    assert image.mode == "RGB"
    assert image.size == (geo["width"], geo["height"])
    assert image.getpixel(box_centre(geo, 0, 0)) == (200, 30, 30)
    assert image.getpixel(box_centre(geo, 1, 2)) == (200, 30, 200)
    assert image.getpixel(box_centre(geo, 0, 1)) == (30, 200, 30)
    # the thumbnail is centred in its box, so the box's corner stays background when labels widen it
    assert geo["col_w"] > 100
    assert image.getpixel((geo["grid_x"], geo["grid_y"])) == WHITE


def test_labels_title_and_axes_are_drawn() -> None:
    image = contact_sheet(sweep_grid(), row_labels=ROWS, col_labels=COLS, title="cat, 20 steps",
                          row_axis="seed", col_axis="guidance_scale")
    geo = expected_geometry(cell=(100, 60), title="cat, 20 steps", caption="seed \\ guidance_scale")
    header_top, header_bottom = geo["header_y"], geo["header_y"] + geo["line_h"]

    assert non_background(image, (PAD, PAD, image.width, header_top - PAD)) > 20  # title
    for col in range(3):
        left = geo["grid_x"] + col * (geo["col_w"] + PAD)
        assert non_background(image, (left, header_top, left + geo["col_w"], header_bottom)) > 20
    assert non_background(image, (PAD, header_top, PAD + geo["label_w"], header_bottom)) > 20  # axes
    for row in range(2):
        top = geo["grid_y"] + row * (geo["row_h"] + PAD)
        assert non_background(image, (PAD, top, PAD + geo["label_w"], top + geo["row_h"])) > 20


def test_withheld_cell_is_a_labelled_grey_box() -> None:
    image = contact_sheet(sweep_grid(missing=(1, 1)), row_labels=ROWS, col_labels=COLS)
    geo = expected_geometry(cell=(100, 60), title="", caption="")
    cx, cy = box_centre(geo, 1, 1)
    grey_left, grey_top = cx - 50, cy - 30

    assert image.getpixel((grey_left + 2, grey_top + 2)) == sheet.WITHHELD_FILL
    assert image.getpixel((grey_left + 97, grey_top + 57)) == sheet.WITHHELD_FILL
    text_band = np.asarray(image.crop((grey_left, cy - 8, grey_left + 100, cy + 8)))
    assert (text_band.mean(axis=-1) > 180).sum() > 20  # the light "withheld" text
    assert image.getpixel(box_centre(geo, 1, 0)) == (200, 200, 30)


def test_large_images_are_shrunk_keeping_aspect() -> None:
    cells: list[list[Image.Image | None]] = [[solid((250, 0, 0), (512, 768)), solid((0, 0, 250), (768, 512))]]
    image = contact_sheet(cells, row_labels=["seed=1"], col_labels=["a", "b"], max_cell=96)
    # thumbnails are 64x96 and 96x64, so the shared box is 96x96
    line_h = line_of(LABEL)
    grid_x = PAD + width_of(LABEL, "seed=1") + PAD
    grid_y = PAD + line_h + PAD
    assert image.size == (grid_x + 2 * 96 + PAD + PAD, grid_y + 96 + PAD)

    red = np.all(np.asarray(image) == (250, 0, 0), axis=-1)
    ys, xs = np.nonzero(red)
    assert (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (64, 96)
    assert xs.min() == grid_x + (96 - 64) // 2 and ys.min() == grid_y


def test_one_axis_sweep_without_labels_has_no_margins() -> None:
    cells: list[list[Image.Image | None]] = [[solid((10, 10, 10), (32, 32)) for _ in range(4)]]
    image = contact_sheet(cells, row_labels=[""], col_labels=["", "", "", ""])
    assert image.size == (4 * 32 + 5 * PAD, 32 + 2 * PAD)
    assert image.getpixel((PAD + 16, PAD + 16)) == (10, 10, 10)


def test_all_withheld_uses_max_cell_and_alpha_is_flattened() -> None:
    withheld = contact_sheet([[None]], row_labels=[""], col_labels=[""], max_cell=40)
    assert withheld.size == (40 + 2 * PAD, 40 + 2 * PAD)
    assert withheld.getpixel((PAD + 1, PAD + 1)) == sheet.WITHHELD_FILL

    clear = Image.new("RGBA", (20, 20), (255, 0, 0, 0))
    flattened = contact_sheet([[clear, solid((0, 0, 0), (20, 20)).convert("L")]], row_labels=[""],
                              col_labels=["", ""])
    assert flattened.getpixel((PAD + 10, PAD + 10)) == WHITE
    assert flattened.getpixel((2 * PAD + 30, PAD + 10)) == (0, 0, 0)


@pytest.mark.parametrize(
    ("cells", "row_labels", "col_labels", "match"),
    [
        ([], [], ["a"], "at least one"),
        ([[None]], ["a", "b"], ["a"], "row labels"),
        ([[None, None]], ["a"], ["a"], "column labels"),
    ],
)
def test_mismatched_labels_are_refused(
    cells: list[list[Image.Image | None]], row_labels: list[str], col_labels: list[str], match: str,
) -> None:
    with pytest.raises(ValueError, match=match):
        contact_sheet(cells, row_labels=row_labels, col_labels=col_labels)
