"""The demo catalog's places, drawn with Pillow so installing the demo downloads nothing.

Flat shapes are enough for a scene to have somewhere to stand the figure and something for
the inpainting to blend into. Drawing is seeded per image, so an image is the same bytes on
every install; each is drawn in proportion to its size, so sizes can change freely. The
descriptions are what an embedding model matches a user's free text against.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageDraw

RGB = tuple[int, int, int]
Size = tuple[int, int]


@dataclass(frozen=True)
class DemoPlaceImage:
    name: str
    description: str
    size: Size
    draw: Callable[[Size, random.Random], Image.Image]
    seed: int

    def render(self) -> Image.Image:
        """The image as an RGB picture of ``size``; the same pixels every time."""
        return self.draw(self.size, random.Random(self.seed))


@dataclass(frozen=True)
class DemoPlace:
    name: str
    description: str
    images: tuple[DemoPlaceImage, ...]


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (round(a[0] + (b[0] - a[0]) * t), round(a[1] + (b[1] - a[1]) * t),
            round(a[2] + (b[2] - a[2]) * t))


def _vertical_gradient(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], top: RGB,
                       bottom: RGB) -> None:
    left, y0, right, y1 = box
    for y in range(y0, y1):
        draw.line((left, y, right, y), fill=_mix(top, bottom, (y - y0) / max(1, y1 - y0 - 1)))


def _cloud(draw: ImageDraw.ImageDraw, x: float, y: float, r: float, color: RGB) -> None:
    for dx, dy, k in ((-1.1, 0.2, 0.8), (0.0, 0.0, 1.0), (1.1, 0.25, 0.75), (0.5, -0.4, 0.7)):
        rr = r * k
        draw.ellipse((x + dx * r - rr, y + dy * r - rr, x + dx * r + rr, y + dy * r + rr), fill=color)


def _tree(draw: ImageDraw.ImageDraw, x: float, ground: float, height: float, leaves: RGB,
          rng: random.Random) -> None:
    trunk = height * 0.07
    draw.rectangle((x - trunk, ground - height * 0.45, x + trunk, ground), fill=(92, 64, 42))
    crown_y, r = ground - height * 0.65, height * 0.28
    for _ in range(6):
        cx, cy = x + rng.uniform(-0.5, 0.5) * r, crown_y + rng.uniform(-0.5, 0.4) * r
        rr = r * rng.uniform(0.6, 0.9)
        shade = _mix(leaves, (0, 0, 0), rng.uniform(0.0, 0.25))
        draw.ellipse((cx - rr, cy - rr, cx + rr, cy + rr), fill=shade)


def _park(sky: tuple[RGB, RGB], grass: RGB, leaves: tuple[RGB, ...]
          ) -> Callable[[Size, random.Random], Image.Image]:
    def draw_park(size: Size, rng: random.Random) -> Image.Image:
        w, h = size
        image = Image.new("RGB", size)
        draw = ImageDraw.Draw(image)
        horizon = round(h * 0.48)
        _vertical_gradient(draw, (0, 0, w, horizon), *sky)
        for _ in range(3):
            _cloud(draw, rng.uniform(0.1, 0.9) * w, rng.uniform(0.08, 0.25) * h, h * 0.04,
                   _mix(sky[1], (255, 255, 255), 0.8))
        draw.polygon([(0, horizon), (w * 0.3, horizon - h * 0.08), (w * 0.65, horizon - h * 0.03),
                      (w, horizon - h * 0.1), (w, horizon), (0, horizon)],
                     fill=_mix(grass, sky[1], 0.45))
        _vertical_gradient(draw, (0, horizon, w, h), _mix(grass, (0, 0, 0), 0.15), grass)
        # A gravel path narrowing towards the horizon, where a figure can stand.
        draw.polygon([(w * 0.47, horizon), (w * 0.53, horizon), (w * 0.78, h), (w * 0.22, h)],
                     fill=(196, 178, 140))
        for depth in (0.0, 0.35, 0.7):
            ground = horizon + (h - horizon) * depth * 0.5 + h * 0.02
            height = h * (0.22 + depth * 0.35)
            for x in (rng.uniform(0.02, 0.3), rng.uniform(0.7, 0.98)):
                _tree(draw, x * w, ground, height, rng.choice(leaves), rng)
        # A bench beside the path.
        bx, by, bw = w * 0.66, h * 0.78, w * 0.12
        draw.rectangle((bx, by - h * 0.05, bx + bw, by - h * 0.035), fill=(120, 80, 50))
        draw.rectangle((bx, by - h * 0.02, bx + bw, by - h * 0.005), fill=(120, 80, 50))
        for leg in (bx + bw * 0.08, bx + bw * 0.9):
            draw.rectangle((leg, by - h * 0.005, leg + w * 0.006, by + h * 0.03), fill=(50, 50, 50))
        return image
    return draw_park


def _beach(sky: tuple[RGB, RGB], sea: RGB, sand: RGB, sun: RGB, sun_height: float
           ) -> Callable[[Size, random.Random], Image.Image]:
    def draw_beach(size: Size, rng: random.Random) -> Image.Image:
        w, h = size
        image = Image.new("RGB", size)
        draw = ImageDraw.Draw(image)
        horizon, shore = round(h * 0.45), round(h * 0.6)
        _vertical_gradient(draw, (0, 0, w, horizon), *sky)
        sx, sy, sr = w * 0.72, horizon * sun_height, h * 0.06
        draw.ellipse((sx - sr, sy - sr, sx + sr, sy + sr), fill=sun)
        _vertical_gradient(draw, (0, horizon, w, shore), _mix(sea, (0, 0, 0), 0.25), sea)
        for _ in range(40):
            y = rng.uniform(horizon + 2, shore - 2)
            x = rng.uniform(0, w)
            length = w * 0.02 * (1 + 3 * (y - horizon) / (shore - horizon))
            draw.line((x, y, x + length, y), fill=_mix(sea, sun, 0.35), width=1)
        draw.polygon([(0, shore), (w, shore - h * 0.02), (w, shore + h * 0.02), (0, shore + h * 0.035)],
                     fill=_mix(sand, (90, 80, 70), 0.3))
        _vertical_gradient(draw, (0, shore + round(h * 0.03), w, h), _mix(sand, sea, 0.08), sand)
        # A parasol and a towel on the sand.
        px, py = w * 0.2, h * 0.86
        draw.line((px, py, px + w * 0.01, py - h * 0.25), fill=(80, 70, 60), width=max(1, w // 200))
        top = (px + w * 0.01, py - h * 0.25)
        draw.pieslice((top[0] - w * 0.1, top[1] - h * 0.06, top[0] + w * 0.1, top[1] + h * 0.1),
                      180, 360, fill=(220, 60, 60))
        draw.polygon([(w * 0.28, h * 0.9), (w * 0.4, h * 0.88), (w * 0.43, h * 0.95), (w * 0.3, h * 0.97)],
                     fill=(60, 120, 200))
        return image
    return draw_beach


def _square(sky: tuple[RGB, RGB], night: bool) -> Callable[[Size, random.Random], Image.Image]:
    def draw_square(size: Size, rng: random.Random) -> Image.Image:
        w, h = size
        image = Image.new("RGB", size)
        draw = ImageDraw.Draw(image)
        ground = round(h * 0.55)
        _vertical_gradient(draw, (0, 0, w, ground), *sky)
        x = 0.0
        while x < w:
            bw = w * rng.uniform(0.12, 0.2)
            top = ground - h * rng.uniform(0.25, 0.45)
            wall = rng.choice([(200, 170, 140), (180, 150, 130), (215, 200, 170), (160, 120, 100)])
            if night:
                wall = _mix(wall, (10, 10, 30), 0.7)
            draw.rectangle((x, top, x + bw, ground), fill=wall)
            draw.rectangle((x, top - h * 0.015, x + bw, top), fill=_mix(wall, (0, 0, 0), 0.3))
            for wy in range(int(top + h * 0.04), ground - int(h * 0.08), max(2, int(h * 0.06))):
                for k in range(3):
                    wx = x + bw * (0.15 + 0.27 * k)
                    lit = night and rng.random() < 0.5
                    glass = (255, 214, 120) if lit else (40, 50, 70) if night else (120, 150, 180)
                    draw.rectangle((wx, wy, wx + bw * 0.16, wy + h * 0.035), fill=glass)
            x += bw
        paving = (70, 70, 80) if night else (170, 165, 155)
        _vertical_gradient(draw, (0, ground, w, h), _mix(paving, (0, 0, 0), 0.2), paving)
        # Paving joints converging on a vanishing point above the square's middle.
        for k in range(-8, 9):
            draw.line((w / 2 + k * w * 0.02, ground, w / 2 + k * w * 0.18, h),
                      fill=_mix(paving, (0, 0, 0), 0.25), width=1)
        for k in range(1, 8):
            y = ground + (h - ground) * (k / 8) ** 1.6
            draw.line((0, y, w, y), fill=_mix(paving, (0, 0, 0), 0.25), width=1)
        # A fountain on the far side, lamp posts to the sides.
        fx, fy = w * 0.5, ground + (h - ground) * 0.25
        draw.ellipse((fx - w * 0.12, fy - h * 0.03, fx + w * 0.12, fy + h * 0.03), fill=(120, 120, 125))
        draw.ellipse((fx - w * 0.1, fy - h * 0.022, fx + w * 0.1, fy + h * 0.018), fill=(90, 140, 190))
        draw.rectangle((fx - w * 0.01, fy - h * 0.12, fx + w * 0.01, fy), fill=(130, 130, 135))
        for lx in (w * 0.12, w * 0.88):
            draw.rectangle((lx - w * 0.005, h * 0.45, lx + w * 0.005, h * 0.9), fill=(40, 40, 45))
            glow = (255, 230, 150) if night else (230, 230, 220)
            draw.ellipse((lx - w * 0.018, h * 0.43, lx + w * 0.018, h * 0.47), fill=glow)
        return image
    return draw_square


DEMO_PLACES: tuple[DemoPlace, ...] = (
    DemoPlace(
        name="park",
        description="a green city park with trees, a lawn, a gravel path and a wooden bench",
        images=(
            DemoPlaceImage(
                name="park-summer",
                description="the park on a sunny summer day, blue sky, bright green trees and grass",
                size=(768, 512), seed=1,
                draw=_park(((90, 150, 230), (190, 220, 250)), (80, 160, 70),
                           ((50, 130, 50), (70, 150, 60))),
            ),
            DemoPlaceImage(
                name="park-autumn",
                description="the park in autumn, pale sky, orange and yellow leaves on the trees",
                size=(768, 512), seed=2,
                draw=_park(((160, 180, 200), (225, 220, 205)), (120, 150, 70),
                           ((210, 120, 40), (230, 180, 50), (180, 80, 40))),
            ),
        ),
    ),
    DemoPlace(
        name="beach",
        description="a sandy beach by the sea with a parasol and a towel on the sand",
        images=(
            DemoPlaceImage(
                name="beach-noon",
                description="the beach at noon, clear blue sky, turquoise sea and bright sand",
                size=(768, 512), seed=3,
                draw=_beach(((70, 140, 230), (170, 210, 245)), (40, 160, 190), (235, 215, 165),
                            (255, 250, 210), 0.3),
            ),
            DemoPlaceImage(
                name="beach-sunset",
                description="the beach at sunset, orange and pink sky, the sun low over a dark sea",
                size=(768, 512), seed=4,
                draw=_beach(((90, 60, 130), (250, 150, 80)), (60, 60, 110), (200, 160, 120),
                            (255, 200, 90), 0.8),
            ),
        ),
    ),
    DemoPlace(
        name="city-square",
        description="a paved city square surrounded by old town houses, with a fountain and street lamps",
        images=(
            DemoPlaceImage(
                name="city-square-day",
                description="the city square by day, sunlit facades and grey paving stones",
                size=(768, 512), seed=5,
                draw=_square(((100, 160, 230), (200, 225, 245)), night=False),
            ),
            DemoPlaceImage(
                name="city-square-night",
                description="the city square at night, dark blue sky, lit windows and glowing street "
                            "lamps, in portrait format",
                size=(512, 768), seed=6,
                draw=_square(((10, 15, 40), (40, 50, 90)), night=True),
            ),
        ),
    ),
)
