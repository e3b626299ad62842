"""A procedural text-to-image world: one or two coloured shapes on a 3x3 grid, with template captions.

Small enough to train a teacher on in minutes, and fully labelled, so a judge can be trained on the
generator's own labels and the quality of a student measured without FID on natural images.

Every scene is a pure function of ``(seed, split, index)``. Some (shape, colour) pairs are held out of
training (:data:`HELD_OUT_PAIRS`) to test compositional generalisation: split ``"heldout"`` draws only
scenes that contain at least one of them; splits ``"train"``, ``"val"`` and ``"test"`` never do.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from cm_lightning.data.sources import CaptionedImage, SkipReport
from cm_lightning.errors import UserError

# Bump when a change alters any rendered pixel or caption: it is part of every cache key.
GENERATOR_VERSION = "shapes-v1"

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (145, 50, 190),
    "orange": (250, 135, 20),
}
# Disjoint from COLOURS by construction, so a background never equals an object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # row-major 3x3 grid
SPLITS: tuple[str, ...] = ("train", "val", "test", "heldout")

# 5 of the 30 (shape, colour) pairs (1/6): each shape once, each colour at most once, so every shape
# still appears in training with 5 colours and every colour with at least 4 shapes.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("circle", "blue"),
    ("square", "yellow"),
    ("triangle", "purple"),
    ("star", "orange"),
    ("cross", "red"),
})

# Sorted tuples, not sets: set order of strings changes with PYTHONHASHSEED and would break determinism.
_ALL_PAIRS = tuple((s, c) for s in SHAPES for c in COLOURS)
_HELD_OUT = tuple(sorted(HELD_OUT_PAIRS))
_TRAIN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in HELD_OUT_PAIRS)

_PREPOSITIONS = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
# Object "radius" as a fraction of a grid cell; every shape's extent is at most 1.1 radius.
_RADIUS = {"small": 0.24, "large": 0.40}
_SUPERSAMPLE = 4  # render at 4x then box-filter down: anti-aliased edges, exact interior colours


@dataclass(frozen=True)
class ObjectSpec:
    """One object. ``offset`` = (dx, dy) of its centre from its cell's centre, in cell units."""

    shape: str
    colour: str
    size: str
    position: str
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        for field, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, COLOURS),
                                      ("size", self.size, SIZES), ("position", self.position, POSITIONS)):
            if value not in allowed:
                raise UserError(f"ObjectSpec.{field}={value!r} is not one of {sorted(allowed)}")

    @property
    def pair(self) -> tuple[str, str]:
        return (self.shape, self.colour)


@dataclass(frozen=True)
class SceneSpec:
    """A scene: objects in distinct grid cells on a background whose colour no object uses."""

    objects: tuple[ObjectSpec, ...]
    background: str

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise UserError(f"SceneSpec.background={self.background!r} is not one of {sorted(BACKGROUNDS)}")
        if not self.objects:
            raise UserError("SceneSpec.objects is empty: a scene needs at least one object")
        cells = [o.position for o in self.objects]
        if len(set(cells)) != len(cells):
            raise UserError(f"SceneSpec.objects share a grid cell: positions {cells}")

    @property
    def pairs(self) -> set[tuple[str, str]]:
        return {o.pair for o in self.objects}


def split_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for scene ``index`` of ``split``: independent streams, stable across processes."""
    if split not in SPLITS:
        raise UserError(f"shapes split={split!r} is not one of {list(SPLITS)}")
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def sample_scene(rng: np.random.Generator, *, split: str = "train", max_objects: int = 2) -> SceneSpec:
    """Draw a scene of 1..max_objects objects. Split "heldout" puts a held-out pair in at least one
    (randomly chosen) object; other splits use only training pairs."""
    if split not in SPLITS:
        raise UserError(f"shapes split={split!r} is not one of {list(SPLITS)}")
    if not 1 <= max_objects <= len(POSITIONS):
        raise UserError(f"shapes max_objects={max_objects} must be between 1 and {len(POSITIONS)}")
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(len(POSITIONS), size=n, replace=False)
    forced = int(rng.integers(n)) if split == "heldout" else -1
    objects = []
    for k in range(n):
        if k == forced:
            shape, colour = _HELD_OUT[int(rng.integers(len(_HELD_OUT)))]
        else:
            pool = _ALL_PAIRS if split == "heldout" else _TRAIN_PAIRS
            shape, colour = pool[int(rng.integers(len(pool)))]
        size = SIZES[int(rng.integers(len(SIZES)))]
        jitter = max(0.0, 0.47 - 1.1 * _RADIUS[size])  # keep the object inside its cell
        dx, dy = (float(v) for v in rng.uniform(-jitter, jitter, size=2))
        offset = (round(dx, 4), round(dy, 4))
        objects.append(ObjectSpec(shape, colour, size, POSITIONS[int(cells[k])], offset))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    return SceneSpec(tuple(objects), background)


def scene_at(index: int, *, split: str = "train", seed: int = 0, max_objects: int = 2) -> SceneSpec:
    """Scene ``index`` of ``split`` (what :class:`ShapesSource` renders)."""
    return sample_scene(split_rng(seed, split, index), split=split, max_objects=max_objects)


def caption_of(spec: SceneSpec) -> str:
    """The template caption, e.g. "a small red circle at the top left and a large blue square on the right,
    on a white background"."""
    phrases = [f"a {o.size} {o.colour} {o.shape} {_PREPOSITIONS[o.position]}" for o in spec.objects]
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{body}, on a {spec.background} background"


def object_center(obj: ObjectSpec, image_size: int) -> tuple[float, float]:
    """Centre (x, y) of an object in pixels of an ``image_size`` render."""
    row, col = divmod(POSITIONS.index(obj.position), 3)
    cell = image_size / 3
    return ((col + 0.5 + obj.offset[0]) * cell, (row + 0.5 + obj.offset[1]) * cell)


def object_radius(obj: ObjectSpec, image_size: int) -> float:
    """Nominal radius of an object in pixels (shapes extend at most 1.1x this from the centre)."""
    return _RADIUS[obj.size] * image_size / 3


def _draw_object(draw: ImageDraw.ImageDraw, obj: ObjectSpec, image_size: int) -> None:
    cx, cy = object_center(obj, image_size)
    r = object_radius(obj, image_size)
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif obj.shape == "square":
        h = 0.85 * r  # similar area to the circle
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif obj.shape == "triangle":  # apex up, centroid at the centre
        R = 1.1 * r
        draw.polygon([(cx + R * math.cos(a), cy - R * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6,
                                                                             11 * math.pi / 6)], fill=fill)
    elif obj.shape == "star":  # 5 points, fat enough to stay a star at small sizes
        R, inner = 1.1 * r, 0.5 * 1.1 * r
        points = []
        for k in range(10):
            a = math.pi / 2 + k * math.pi / 5
            rad = R if k % 2 == 0 else inner
            points.append((cx + rad * math.cos(a), cy - rad * math.sin(a)))
        draw.polygon(points, fill=fill)
    elif obj.shape == "cross":
        w = 0.35 * r
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # ObjectSpec validates shapes; this guards a new shape added without a renderer
        raise ValueError(f"no renderer for shape {obj.shape!r}")


def render_scene(spec: SceneSpec, image_size: int = 64) -> Image.Image:
    """Render a scene as an RGB image of ``image_size`` x ``image_size`` pixels."""
    big = image_size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(image)
    for obj in spec.objects:
        _draw_object(draw, obj, big)
    return image.resize((image_size, image_size), Image.Resampling.BOX)


def prompts(n: int, split: str = "val", seed: int = 0, *, max_objects: int = 2) -> list[str]:
    """Captions of scenes 0..n-1 of ``split``: a fixed evaluation prompt set."""
    return [caption_of(scene_at(i, split=split, seed=seed, max_objects=max_objects)) for i in range(n)]


class ShapesSource:
    """``num_images`` rendered scenes of one split; implements :class:`CaptionedImageSource`.

    Item ``i`` is scene ``i`` of the split (key ``shapes/<split>/<i>``), rendered on demand.
    """

    name = "shapes"

    def __init__(self, num_images: int, *, split: str = "train", image_size: int = 64, seed: int = 0,
                 max_objects: int = 2):
        if num_images < 0:
            raise UserError(f"shapes num_images={num_images} must be >= 0")
        if split not in SPLITS:
            raise UserError(f"shapes split={split!r} is not one of {list(SPLITS)}")
        if image_size < 8:
            raise UserError(f"shapes image_size={image_size} is too small (minimum 8)")
        if seed < 0:
            raise UserError(f"shapes seed={seed} must be >= 0")
        if not 1 <= max_objects <= len(POSITIONS):
            raise UserError(f"shapes max_objects={max_objects} must be between 1 and {len(POSITIONS)}")
        self.num_images, self.split, self.image_size = num_images, split, image_size
        self.seed, self.max_objects = seed, max_objects
        self.skipped = SkipReport()  # nothing is ever dropped: every index is a valid scene

    def __len__(self) -> int:
        return self.num_images

    def labels(self, index: int) -> SceneSpec:
        """The generator's ground truth for item ``index``."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"shapes index {index} out of range [0, {self.num_images})")
        return scene_at(index, split=self.split, seed=self.seed, max_objects=self.max_objects)

    def __getitem__(self, index: int) -> CaptionedImage:
        spec = self.labels(index)
        return CaptionedImage(render_scene(spec, self.image_size), caption_of(spec),
                              f"shapes/{self.split}/{index}")

    def fingerprint(self) -> dict:
        return {"generator": GENERATOR_VERSION, "num_images": self.num_images, "split": self.split,
                "image_size": self.image_size, "seed": self.seed, "max_objects": self.max_objects}
