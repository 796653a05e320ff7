"""Masks derived from a pose, and fitting a shot's assets onto a background.

A scene repaints only where the person goes. When an action's shot comes with keypoints but
no masks, the masks are drawn from the skeleton here; when it carries a placement, its pose
map, masks and keypoints are moved together by one map so they keep lining up.

Sizes are reckoned in the figure's standing height (crown to soles), estimated from its bone
lengths, because every margin that matters (limb thickness, clothes and hair, keypoint error)
grows with the person, not with the canvas: a fixed number of pixels is a halo bigger than a
distant figure and nothing at all around a close-up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageChops, ImageDraw, ImageFilter

from services.generator.poses import DEFAULT_MIN_CONFIDENCE
from shared.poses import NUM_KEYPOINTS, Keypoint, Person, PreprocessError

Point = tuple[float, float]
Size = tuple[int, int]
PersonLike = Sequence[Keypoint | None]

NOSE, NECK, R_SHOULDER, R_ELBOW, R_WRIST, L_SHOULDER, L_ELBOW, L_WRIST = range(8)
R_HIP, R_KNEE, R_ANKLE, L_HIP, L_KNEE, L_ANKLE, R_EYE, L_EYE, R_EAR, L_EAR = range(8, 18)
HEAD_POINTS = (NOSE, R_EYE, L_EYE, R_EAR, L_EAR)

# Bone lengths in 3-D as fractions of standing height (after Drillis & Contini's table; shoulders
# and hips measured between OpenPose's joint points; the nose sits in front of the neck, so that
# one is longest in profile). Foreshortening only shortens a bone in the picture, so the longest
# estimate is the least foreshortened one.
_BONES: tuple[tuple[int, int, float], ...] = (
    (NECK, R_HIP, 0.295), (NECK, L_HIP, 0.295),
    (R_HIP, R_KNEE, 0.245), (L_HIP, L_KNEE, 0.245),
    (R_KNEE, R_ANKLE, 0.246), (L_KNEE, L_ANKLE, 0.246),
    (R_SHOULDER, R_ELBOW, 0.186), (L_SHOULDER, L_ELBOW, 0.186),
    (R_ELBOW, R_WRIST, 0.146), (L_ELBOW, L_WRIST, 0.146),
    (R_SHOULDER, L_SHOULDER, 0.22), (NOSE, NECK, 0.108),
)
# Small and noisy, so only for a figure that shows nothing but its head.
_HEAD_BONES: tuple[tuple[int, int, float], ...] = ((R_EAR, L_EAR, 0.085), (R_EYE, L_EYE, 0.036))
# How far below each level the ankles are on a standing person, for shots that cut the legs off.
_ANKLES_BELOW = ((R_KNEE, L_KNEE, 0.245), (R_HIP, L_HIP, 0.49), (R_SHOULDER, L_SHOULDER, 0.778),
                 (NECK, NECK, 0.778), (NOSE, NOSE, 0.868))

# Half-thicknesses of the silhouette, as fractions of standing height: about an adult's limbs.
_LIMBS: tuple[tuple[int, int, float], ...] = (
    (R_SHOULDER, R_ELBOW, 0.032), (L_SHOULDER, L_ELBOW, 0.032),
    (R_ELBOW, R_WRIST, 0.026), (L_ELBOW, L_WRIST, 0.026),
    (R_HIP, R_KNEE, 0.05), (L_HIP, L_KNEE, 0.05),
    (R_KNEE, R_ANKLE, 0.036), (L_KNEE, L_ANKLE, 0.036),
    (NECK, NOSE, 0.035),
)
_TORSO = (R_SHOULDER, L_SHOULDER, L_HIP, R_HIP, NECK)
_TORSO_EDGE = 0.035  # deltoids and hips reach past the joint points
_HEAD_RADIUS = 0.072
_JOINT_RADIUS = 0.03  # a point whose neighbours are missing still gets covered
# Hands and feet reach past the wrist and ankle points along the forearm and shin.
_HANDS = ((R_ELBOW, R_WRIST), (L_ELBOW, L_WRIST))
_HAND_REACH, _HAND_RADIUS = 0.07, 0.03
_FEET = ((R_KNEE, R_ANKLE), (L_KNEE, L_ANKLE))
_FOOT_REACH, _FOOT_RADIUS = 0.035, 0.045

# Margin for clothes, hair and keypoint error, then a soft edge half as wide so the original
# silhouette sits two standard deviations inside it (still ~98% white after the blur).
DILATE_FRACTION = 0.03
FEATHER_FRACTION = 0.015
FACE_FEATHER_FRACTION = 0.08  # of the face ellipse's half-width: a light edge


def _points(person: PersonLike, min_confidence: float) -> list[Point | None]:
    if len(person) != NUM_KEYPOINTS:
        raise PreprocessError(f"a person has {len(person)} keypoints; expected {NUM_KEYPOINTS}")
    return [None if p is None or p[2] < min_confidence else (p[0], p[1]) for p in person]


def _dist(a: Point, b: Point) -> float:
    return math.hypot(b[0] - a[0], b[1] - a[1])


def _mean(points: Sequence[Point]) -> Point:
    return (sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points))


def _height_from(points: Sequence[Point | None]) -> float | None:
    for bones in (_BONES, _HEAD_BONES):
        estimates = [_dist(a, b) / fraction for i, j, fraction in bones
                     if (a := points[i]) is not None and (b := points[j]) is not None]
        if estimates and max(estimates) > 0:
            return max(estimates)
    return None


def standing_height(person: PersonLike, *, min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> float | None:
    """The person's height (crown to soles, pixels) were they standing up straight, or None
    when no two connected keypoints are present.

    It does not change with the pose or the crop, so a sitting figure and a close-up of the same
    person get the same scale: the longest bone over its share of a typical adult's height.
    """
    return _height_from(_points(person, min_confidence))


@dataclass(frozen=True)
class Figure:
    """Where a figure stands in its canvas: the centre between its ankles and its standing
    height, in pixels. Ankles cut off by the frame are placed where they would be on a standing
    person, below the lowest of knees, hips, shoulders or nose that is present."""

    feet: Point
    height: float


def figure_of(people: Sequence[PersonLike], *,
              min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> Figure:
    """The group's figure: the tallest person's height and the centre of everyone's feet.

    Of two ankles the lower one is the foot on the ground (walking lifts the other), so it
    gives the height of the feet and both give their centre.
    """
    heights: list[float] = []
    feet: list[Point] = []
    for person in people:
        points = _points(person, min_confidence)
        height = _height_from(points)
        if height is None:
            continue
        heights.append(height)
        ankles = [p for p in (points[R_ANKLE], points[L_ANKLE]) if p is not None]
        if ankles:
            feet.append((_mean(ankles)[0], max(p[1] for p in ankles)))
            continue
        for right, left, below in _ANKLES_BELOW:
            level = [p for p in (points[right], points[left]) if p is not None]
            if level:
                x, y = _mean(level)
                feet.append((x, y + below * height))
                break
    if not heights or not feet:
        raise PreprocessError("the keypoints show too little of a person to tell their size "
                              "(no two connected keypoints)")
    return Figure(feet=_mean(feet), height=max(heights))


def figure_of_mask(mask: Image.Image, *, threshold: int = 128) -> Figure:
    """A figure measured from a body mask when a shot has no keypoints: the bottom centre of
    the mask's box for the feet and its height for the figure's (as if standing)."""
    box = mask.convert("L").point(lambda value: 255 if value >= threshold else 0).getbbox()
    if box is None:
        raise PreprocessError("the body mask is empty")
    left, top, right, bottom = box
    return Figure(feet=((left + right) / 2, float(bottom)), height=float(bottom - top))


# --------------------------------------------------------------------------------------------
# Masks


def _draw_capsule(draw: ImageDraw.ImageDraw, a: Point, b: Point, radius: float) -> None:
    """A segment thickened by ``radius`` all round; a dilated capsule is a wider capsule, which
    is why the silhouette is built from these and dilation needs no pixel morphology."""
    draw.ellipse((a[0] - radius, a[1] - radius, a[0] + radius, a[1] + radius), fill=255)
    draw.ellipse((b[0] - radius, b[1] - radius, b[0] + radius, b[1] + radius), fill=255)
    length = _dist(a, b)
    if length == 0:
        return
    nx, ny = -(b[1] - a[1]) / length * radius, (b[0] - a[0]) / length * radius
    draw.polygon([(a[0] + nx, a[1] + ny), (b[0] + nx, b[1] + ny),
                  (b[0] - nx, b[1] - ny), (a[0] - nx, a[1] - ny)], fill=255)


def _convex_hull(points: Sequence[Point]) -> list[Point]:
    ordered = sorted(set(points))
    if len(ordered) <= 2:
        return ordered

    def half(seq: Sequence[Point]) -> list[Point]:
        out: list[Point] = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = half(ordered), half(ordered[::-1])
    return lower[:-1] + upper[:-1]


def _extend(a: Point, b: Point, reach: float) -> Point:
    length = _dist(a, b)
    if length == 0:
        return b
    return (b[0] + (b[0] - a[0]) / length * reach, b[1] + (b[1] - a[1]) / length * reach)


def _draw_silhouette(draw: ImageDraw.ImageDraw, points: Sequence[Point | None], height: float,
                     grow: float) -> None:
    """The body as capsules, discs and the torso polygon, each grown by ``grow`` pixels."""
    for i, j, radius in _LIMBS:
        a, b = points[i], points[j]
        if a is not None and b is not None:
            _draw_capsule(draw, a, b, radius * height + grow)
    for i, j in _HANDS:
        a, b = points[i], points[j]
        if a is not None and b is not None:
            _draw_capsule(draw, b, _extend(a, b, _HAND_REACH * height), _HAND_RADIUS * height + grow)
    for i, j in _FEET:
        a, b = points[i], points[j]
        if a is not None and b is not None:
            _draw_capsule(draw, b, _extend(a, b, _FOOT_REACH * height), _FOOT_RADIUS * height + grow)

    # A polygon grown by r is the polygon plus a capsule of radius r along each edge.
    hull = _convex_hull([p for i in _TORSO if (p := points[i]) is not None])
    if len(hull) >= 3:
        draw.polygon(hull, fill=255)
    for k in range(len(hull)):
        _draw_capsule(draw, hull[k - 1], hull[k], _TORSO_EDGE * height + grow)

    head = [p for i in (R_EYE, L_EYE, R_EAR, L_EAR) if (p := points[i]) is not None]
    nose = points[NOSE]
    if not head and nose is not None:
        head = [nose]
    if head:
        centre = _mean(head)
        reach = max(_dist(centre, p) for i in HEAD_POINTS if (p := points[i]) is not None)
        radius = max(_HEAD_RADIUS * height, reach + _JOINT_RADIUS * height) + grow
        draw.ellipse((centre[0] - radius, centre[1] - radius, centre[0] + radius, centre[1] + radius),
                     fill=255)

    for p in points:
        if p is not None:
            _draw_capsule(draw, p, p, _JOINT_RADIUS * height + grow)


def _check_size(size: Size) -> Size:
    width, height = size
    if width < 1 or height < 1:
        raise PreprocessError(f"mask size must be positive, got {width}x{height}")
    return width, height


def body_mask(people: Sequence[PersonLike], size: Size, *, dilate_px: float | None = None,
              feather_px: float | None = None,
              min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> Image.Image:
    """Where the figure is, white (repaint) on black (keep): the skeleton's silhouette, dilated
    by ``dilate_px`` and feathered by a gaussian of standard deviation ``feather_px``.

    Both default to a share of each person's standing height (3% and 1.5%; at least 2 px and
    1 px), see the module docstring. A person too incomplete to measure is sized from the
    canvas, as a figure filling a quarter of it.
    """
    width, height = _check_size(size)
    if dilate_px is not None and dilate_px < 0 or feather_px is not None and feather_px < 0:
        raise PreprocessError("dilate_px and feather_px must not be negative")
    mask = Image.new("L", (width, height), 0)
    for person in people:
        points = _points(person, min_confidence)
        if all(p is None for p in points):
            continue
        figure_height = _height_from(points) or min(width, height) / 4
        grow = dilate_px if dilate_px is not None else max(2.0, DILATE_FRACTION * figure_height)
        sigma = feather_px if feather_px is not None else max(1.0, FEATHER_FRACTION * figure_height)
        layer = Image.new("L", (width, height), 0)
        _draw_silhouette(ImageDraw.Draw(layer), points, figure_height, grow)
        if sigma > 0:
            layer = layer.filter(ImageFilter.GaussianBlur(sigma))
        mask = ImageChops.lighter(mask, layer)
    return mask


def _face_ellipse(points: Sequence[Point | None], figure_height: float | None) -> list[Point] | None:
    """The face as an outline: across the head points' spread (at least a typical face's width
    for the shoulders, as a profile brings eyes and ears together), from the chin (part way
    from nose to neck) to the forehead, turned with the head's neck-to-ears axis."""
    head = [p for i in HEAD_POINTS if (p := points[i]) is not None]
    if not head:
        return None
    eyes = [p for i in (R_EYE, L_EYE) if (p := points[i]) is not None]
    ears = [p for i in (R_EAR, L_EAR) if (p := points[i]) is not None]
    nose, neck = points[NOSE], points[NECK]
    # The ears sit above the neck whichever way the head faces; eyes and nose lean forward
    # of it in profile, so they tilt the axis only when no ear is seen.
    crown_side = _mean(ears or eyes or head)
    up = (0.0, -1.0)
    if neck is not None and _dist(neck, crown_side) > 0:
        d = _dist(neck, crown_side)
        up = ((crown_side[0] - neck[0]) / d, (crown_side[1] - neck[1]) / d)
    across = (-up[1], up[0])
    origin = _mean(head)

    def u(p: Point) -> float:
        return (p[0] - origin[0]) * across[0] + (p[1] - origin[1]) * across[1]

    def v(p: Point) -> float:
        return (p[0] - origin[0]) * up[0] + (p[1] - origin[1]) * up[1]

    spread = max(u(p) for p in head) - min(u(p) for p in head)
    shoulders = points[R_SHOULDER], points[L_SHOULDER]
    if shoulders[0] is not None and shoulders[1] is not None:
        floor = 0.18 * _dist(shoulders[0], shoulders[1])
    else:
        floor = 0.045 * figure_height if figure_height else 0.0
    half_width = max(0.6 * spread, floor)
    if half_width <= 0:
        return None

    eye_v = v(_mean(eyes)) if eyes else v(_mean(ears)) if ears else v(head[0]) + 0.5 * half_width
    if nose is not None and neck is not None and v(nose) > v(neck):
        chin_v = v(nose) - 0.45 * (v(nose) - v(neck))
    else:
        chin_v = min(v(p) for p in head) - 0.8 * half_width
    half_height = max(0.9 * (eye_v - chin_v), 1.1 * half_width)
    centre_u = (max(u(p) for p in head) + min(u(p) for p in head)) / 2
    centre_v = chin_v + half_height
    cx = origin[0] + across[0] * centre_u + up[0] * centre_v
    cy = origin[1] + across[1] * centre_u + up[1] * centre_v
    outline = []
    for k in range(64):
        t = 2 * math.pi * k / 64
        a, b = half_width * math.cos(t), half_height * math.sin(t)
        outline.append((cx + a * across[0] + b * up[0], cy + a * across[1] + b * up[1]))
    return outline


def face_mask(people: Sequence[PersonLike], size: Size, *,
              min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> Image.Image:
    """Each face as a lightly feathered ellipse, white on black; people without head points
    add nothing, so a figure seen from behind leaves the mask black."""
    width, height = _check_size(size)
    mask = Image.new("L", (width, height), 0)
    for person in people:
        points = _points(person, min_confidence)
        outline = _face_ellipse(points, _height_from(points))
        if outline is None:
            continue
        layer = Image.new("L", (width, height), 0)
        ImageDraw.Draw(layer).polygon(outline, fill=255)
        half_width = max(_dist(outline[0], outline[32]), 2.0) / 2
        layer = layer.filter(ImageFilter.GaussianBlur(max(1.0, FACE_FEATHER_FRACTION * half_width)))
        mask = ImageChops.lighter(mask, layer)
    return mask


# --------------------------------------------------------------------------------------------
# Placement


def _require_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PreprocessError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Placement:
    """Where the figure goes in a background, as fractions of it: ``x``, ``y`` locate the
    centre between its ankles (``y`` from the top) and ``height`` is its standing height over
    the background's height. A figure may reach past the edges (a close-up's feet are below
    the frame), so ``x`` and ``y`` are not held to 0..1."""

    x: float
    y: float
    height: float

    def __post_init__(self) -> None:
        for name in ("x", "y", "height"):
            _require_number(f"placement.{name}", getattr(self, name))
        if not -10 <= self.x <= 10 or not -10 <= self.y <= 10:
            raise PreprocessError("placement.x and placement.y must be between -10 and 10")
        if not 0 < self.height <= 10:
            raise PreprocessError(f"placement.height must be above 0 and at most 10, got {self.height}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> Placement:
        unknown = sorted(set(data) - {"x", "y", "height"})
        if unknown:
            raise PreprocessError(f"placement has unknown fields: {', '.join(unknown)}")
        missing = [name for name in ("x", "y", "height") if name not in data]
        if missing:
            raise PreprocessError(f"placement needs {', '.join(missing)}")
        return cls(x=_require_number("placement.x", data["x"]),
                   y=_require_number("placement.y", data["y"]),
                   height=_require_number("placement.height", data["height"]))


@dataclass(frozen=True)
class ShotAssets:
    """A shot as stored: images drawn on its canvas (pose map, mannequin, masks; any mode)
    and/or its keypoints in canvas pixels. ``figure`` measures the figure when there are no
    keypoints (e.g. from a body mask's bounding box); keypoints win when both are given."""

    canvas_size: Size
    images: Mapping[str, Image.Image] = field(default_factory=dict)
    people: Sequence[PersonLike] | None = None
    figure: Figure | None = None


@dataclass(frozen=True)
class FittedShot:
    """A shot mapped onto a background: every image background-sized, keypoints moved by the
    same map ``(x, y) -> (x * scale[0] + offset[0], y * scale[1] + offset[1])``."""

    size: Size
    images: dict[str, Image.Image]
    people: list[Person] | None
    scale: tuple[float, float]
    offset: tuple[float, float]

    def map_point(self, point: Point) -> Point:
        return (point[0] * self.scale[0] + self.offset[0], point[1] * self.scale[1] + self.offset[1])


def _warp(image: Image.Image, size: Size, scale: float, offset: Point) -> Image.Image:
    """Scale and shift onto a ``size`` canvas of black. ``resize`` with a source box is exact
    to the sub-pixel and filters when shrinking (an affine ``transform`` aliases a far figure's
    thin limbs); padding the source keeps the box inside it where the figure meets an edge."""
    width, height = size
    out = Image.new(image.mode, size, 0)
    x0, y0 = max(0, math.floor(offset[0])), max(0, math.floor(offset[1]))
    x1 = min(width, math.ceil(offset[0] + scale * image.width))
    y1 = min(height, math.ceil(offset[1] + scale * image.height))
    if x1 <= x0 or y1 <= y0:
        return out
    pad = math.ceil(1 / scale) + 2
    padded = Image.new(image.mode, (image.width + 2 * pad, image.height + 2 * pad), 0)
    padded.paste(image, (pad, pad))
    box = ((x0 - offset[0]) / scale + pad, (y0 - offset[1]) / scale + pad,
           (x1 - offset[0]) / scale + pad, (y1 - offset[1]) / scale + pad)
    out.paste(padded.resize((x1 - x0, y1 - y0), Image.Resampling.BICUBIC, box=box), (x0, y0))
    return out


def _map_people(people: Sequence[PersonLike], scale: tuple[float, float],
                offset: Point) -> list[Person]:
    return [[None if p is None else (p[0] * scale[0] + offset[0], p[1] * scale[1] + offset[1], p[2])
             for p in person] for person in people]


def place_figure(assets: ShotAssets, background_size: Size,
                 placement: Placement | Mapping[str, object] | None = None) -> FittedShot:
    """Map a shot's images and keypoints onto a background of ``background_size``.

    Without a placement the canvas is stretched to the background, as the old application
    resized its shot images (a square pose on a wide photo comes out wide). With one, the figure
    keeps its proportions: scaled so its standing height is ``height`` of the background's, and
    moved so its feet land at ``(x, y)``; what the canvas did not cover is black.
    """
    bg_width, bg_height = _check_size(background_size)
    canvas_width, canvas_height = _check_size(assets.canvas_size)
    for name, image in assets.images.items():
        if image.size != (canvas_width, canvas_height):
            raise PreprocessError(f"shot image {name!r} is {image.width}x{image.height}, "
                                  f"not the shot's {canvas_width}x{canvas_height} canvas")

    if placement is None:
        scale = (bg_width / canvas_width, bg_height / canvas_height)
        offset = (0.0, 0.0)
        images = {name: image.resize((bg_width, bg_height), Image.Resampling.BICUBIC)
                  for name, image in assets.images.items()}
    else:
        if not isinstance(placement, Placement):
            placement = Placement.from_mapping(placement)
        if assets.people is not None:
            figure = figure_of(assets.people)
        elif assets.figure is not None:
            figure = assets.figure
        else:
            raise PreprocessError("a placement needs the shot's keypoints or its figure")
        factor = placement.height * bg_height / figure.height
        scale = (factor, factor)
        offset = (placement.x * bg_width - figure.feet[0] * factor,
                  placement.y * bg_height - figure.feet[1] * factor)
        images = {name: _warp(image, (bg_width, bg_height), factor, offset)
                  for name, image in assets.images.items()}

    people = None if assets.people is None else _map_people(assets.people, scale, offset)
    return FittedShot(size=(bg_width, bg_height), images=images, people=people, scale=scale,
                      offset=offset)
