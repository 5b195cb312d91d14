"""The shapes world: GenEval-style captions of coloured shapes and their procedural renders.

Images are ``IMAGE_SIZE`` px squares with a white background and crisp (not anti-aliased) filled shapes
in four saturated palette colours. Every shape of "radius" ``r`` (an integer in ``RADIUS_RANGE``) fills
part of a ``(2r + 1)``-px square box: a square fills it, a circle is the disc ``dx² + dy² <= r² + r`` and
a triangle is upward isosceles (apex pixel on the top row, full base on the bottom row). Objects never
overlap: their boxes are at least ``MIN_GAP`` empty pixels apart along x or y, and lie inside the image.

Caption categories (GenEval style):

* ``single``: "a red circle";
* ``count``: "two red circles", "three blue squares" (2 or 3 copies of one colour and shape);
* ``two_object``: "a red circle and a green square" (two distinct colour-shape objects);
* ``position``: "a red circle left of a green square" (object A, relation, object B); in the render the
  centroids differ by at least ``RELATION_MARGIN`` px along the relation's axis.

Held-out captions (the worlds' shared rule, :func:`alignkit.worlds.common.split_of`): a caption is held out when
the SHA-256 of its text, read as an integer, is 0 mod 5:
120 of the 696 distinct captions (17%; 3 single, 4 count, 22 two_object, 91 position). :func:`prompt_set`
draws from one split only, so held-out captions are never trained on.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# the split rule is the worlds' shared one, re-exported here for the shapes worlds
from alignkit.worlds.common import HELDOUT_MODULUS as HELDOUT_MODULUS
from alignkit.worlds.common import SPLITS as SPLITS
from alignkit.worlds.common import draw_split
from alignkit.worlds.common import split_of as split_of

IMAGE_SIZE = 32
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 190, 30),
}
"""Colour name -> RGB. Pairwise distances >= 150, distances to white >= 236 (0-255 units)."""
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single", "count", "two_object", "position")

RADIUS_RANGE: tuple[int, int] = (4, 6)
"""Inclusive range of object radii in px (box side ``2r + 1``: 9 to 13 px)."""
MIN_GAP = 2
"""Minimum number of empty pixels between the boxes of two objects."""
RELATION_MARGIN = 6
"""Minimum centroid difference (px) along the relation axis in a rendered ``position`` image."""

VOCAB_WORDS: tuple[str, ...] = (
    *dict.fromkeys(w for word in COUNT_WORDS.values() for w in word.split()),
    *COLORS,
    *SHAPES,
    *(s + "s" for s in SHAPES),
    "and",
    *dict.fromkeys(w for rel in RELATIONS for w in rel.split()),
)
"""Every word a caption can contain, in a fixed order."""

_MAX_LAYOUTS = 200
_MAX_OBJECT_TRIES = 60


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a caption: a palette colour and a shape."""

    color: str
    shape: str

    def __post_init__(self) -> None:
        if self.color not in PALETTE:
            raise ValueError(f"color={self.color!r} is not a palette colour; use one of {COLORS}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape={self.shape!r} is not a world shape; use one of {SHAPES}")

    def phrase(self, count: int = 1) -> str:
        """``"a red circle"`` or ``"two red circles"``."""
        noun = self.shape if count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[count]} {self.color} {noun}"


@dataclass
class PromptSpec:
    """What a caption asks for.

    Attributes:
        category: one of :data:`CATEGORIES`.
        objects: one object for ``single``/``count``, two distinct objects (A, B) otherwise.
        count: copies of the object (1 for ``single``, 2 or 3 for ``count``, 1 otherwise).
        relation: the relation of A to B (``position`` only).
    """

    category: str
    objects: list[ObjectSpec] = field(default_factory=list)
    count: int = 1
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"category={self.category!r} is unknown; use one of {CATEGORIES}")
        self.objects = [o if isinstance(o, ObjectSpec) else ObjectSpec(**o) for o in self.objects]
        want = 1 if self.category in ("single", "count") else 2
        if len(self.objects) != want:
            raise ValueError(f"a {self.category!r} prompt has {want} object(s), got {len(self.objects)}")
        if want == 2 and self.objects[0] == self.objects[1]:
            raise ValueError(f"a {self.category!r} prompt needs two distinct objects, got {self.objects[0]} twice")
        counts = (2, 3) if self.category == "count" else (1,)
        if self.count not in counts:
            raise ValueError(f"count={self.count} is invalid for a {self.category!r} prompt; use one of {counts}")
        if (self.category == "position") != (self.relation is not None):
            raise ValueError(f"relation={self.relation!r}: a relation is required for 'position' prompts only")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation={self.relation!r} is unknown; use one of {RELATIONS}")

    def caption(self) -> str:
        """The caption text, e.g. ``"a red circle left of a green square"``."""
        if self.category in ("single", "count"):
            return self.objects[0].phrase(self.count)
        a, b = (o.phrase() for o in self.objects)
        return f"{a} and {b}" if self.category == "two_object" else f"{a} {self.relation} {b}"

    def instances(self) -> list[ObjectSpec]:
        """The objects a faithful image contains, one entry per instance."""
        return [self.objects[0]] * self.count if self.category in ("single", "count") else list(self.objects)

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able metadata (the per-prompt row a reward receives)."""
        return {
            "world": "shapes",
            "category": self.category,
            "objects": [{"color": o.color, "shape": o.shape} for o in self.objects],
            "count": self.count,
            "relation": self.relation,
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> PromptSpec:
        """Inverse of :meth:`to_metadata`.

        Raises:
            ValueError: when ``meta`` is not a valid spec.
        """
        try:
            return cls(
                category=meta["category"],
                objects=[ObjectSpec(color=o["color"], shape=o["shape"]) for o in meta["objects"]],
                count=int(meta.get("count", 1)),
                relation=meta.get("relation"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid shapes-world metadata {meta!r}: {type(exc).__name__}: {exc}") from exc


def parse_caption(text: str) -> PromptSpec | None:
    """Parse a caption of the world's grammar back into a spec; None when it does not parse.

    Case, surrounding whitespace and a final period are ignored; ``"an"``/``"one"`` read as ``"a"``.
    """
    words = text.strip().lower().rstrip(".").split()
    words = ["a" if w in ("an", "one") else w for w in words]
    numbers = {w: n for n, w in COUNT_WORDS.items()}

    def noun_phrase(ws: list[str]) -> tuple[ObjectSpec, int] | None:
        if len(ws) != 3 or ws[0] not in numbers or ws[1] not in PALETTE:
            return None
        count = numbers[ws[0]]
        shape = ws[2] if count == 1 else ws[2][:-1] if ws[2].endswith("s") else ""
        return (ObjectSpec(ws[1], shape), count) if shape in SHAPES else None

    try:
        if len(words) == 3:
            one = noun_phrase(words)
            if one is None:
                return None
            return PromptSpec("single" if one[1] == 1 else "count", [one[0]], count=one[1])
        a, b = noun_phrase(words[:3]), noun_phrase(words[-3:])
        if a is None or b is None or a[1] != 1 or b[1] != 1:
            return None
        middle = " ".join(words[3:-3])
        if middle == "and":
            return PromptSpec("two_object", [a[0], b[0]])
        if middle in RELATIONS:
            return PromptSpec("position", [a[0], b[0]], relation=middle)
    except ValueError:  # e.g. two identical objects
        return None
    return None


def all_specs(categories: Sequence[str] | None = None) -> list[PromptSpec]:
    """Every distinct prompt of the world (696 over all categories), in a fixed order."""
    cats = tuple(categories) if categories is not None else CATEGORIES
    objects = [ObjectSpec(c, s) for c in COLORS for s in SHAPES]
    pairs = [(a, b) for a in objects for b in objects if a != b]
    out: list[PromptSpec] = []
    for cat in cats:
        if cat == "single":
            out += [PromptSpec("single", [o]) for o in objects]
        elif cat == "count":
            out += [PromptSpec("count", [o], count=n) for n in (2, 3) for o in objects]
        elif cat == "two_object":
            out += [PromptSpec("two_object", [a, b]) for a, b in pairs]
        elif cat == "position":
            out += [PromptSpec("position", [a, b], relation=r) for r in RELATIONS for a, b in pairs]
        else:
            raise ValueError(f"category {cat!r} is unknown; use one of {CATEGORIES}")
    return out


def sample_spec(rng: random.Random, categories: Sequence[str] | None = None) -> PromptSpec:
    """A random prompt: category uniform over ``categories`` (all by default), then uniform attributes."""
    cats = tuple(categories) if categories is not None else CATEGORIES
    category = rng.choice(cats)
    if category not in CATEGORIES:
        raise ValueError(f"category {category!r} is unknown; use one of {CATEGORIES}")
    a = ObjectSpec(rng.choice(COLORS), rng.choice(SHAPES))
    if category == "single":
        return PromptSpec("single", [a])
    if category == "count":
        return PromptSpec("count", [a], count=rng.choice((2, 3)))
    b = a
    while b == a:
        b = ObjectSpec(rng.choice(COLORS), rng.choice(SHAPES))
    if category == "two_object":
        return PromptSpec("two_object", [a, b])
    return PromptSpec("position", [a, b], relation=rng.choice(RELATIONS))


def prompt_set(
    n: int, seed: int, split: str = "train", categories: Sequence[str] | None = None,
    exclude: Collection[str] = frozenset(),
) -> list[PromptSpec]:
    """``n`` prompts drawn with :func:`sample_spec` from ``random.Random(seed)``, keeping one split.

    Args:
        n: number of prompts (repeats allowed).
        seed: seed of the draw; the same arguments give the same list.
        split: ``"train"`` or ``"heldout"`` (see :func:`split_of`), or ``"all"``.
        categories: categories to draw from (all by default).
        exclude: captions never drawn (:func:`draw_split`).
    """
    return draw_split(n, seed, split, lambda rng: sample_spec(rng, categories), exclude)


@functools.cache
def shape_mask(shape: str, radius: int) -> np.ndarray:
    """Boolean ``[2r + 1, 2r + 1]`` mask of a shape centred in its box (read-only)."""
    d = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    if shape == "square":
        mask = np.ones((2 * radius + 1,) * 2, dtype=bool)
    elif shape == "circle":
        mask = dx**2 + dy**2 <= radius * radius + radius
    elif shape == "triangle":
        mask = np.abs(dx) <= (dy + radius) // 2
    else:
        raise ValueError(f"shape={shape!r} is not a world shape; use one of {SHAPES}")
    mask.setflags(write=False)
    return mask


@functools.cache
def _centroid_offset(shape: str, radius: int) -> tuple[float, float]:
    """``(dx, dy)`` of the mask centroid from the box centre."""
    ys, xs = np.nonzero(shape_mask(shape, radius))
    return float(xs.mean()) - radius, float(ys.mean()) - radius


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], margin: float) -> bool:
    """Whether centroid ``a = (x, y)`` is ``relation`` of centroid ``b`` by more than ``margin`` px."""
    if relation == "left of":
        return a[0] < b[0] - margin
    if relation == "right of":
        return a[0] > b[0] + margin
    if relation == "above":
        return a[1] < b[1] - margin
    if relation == "below":
        return a[1] > b[1] + margin
    raise ValueError(f"relation={relation!r} is unknown; use one of {RELATIONS}")


def _layout(
    shapes: list[str], radii: list[int], size: int, relation: str | None, rng: random.Random
) -> list[tuple[int, int]] | None:
    """Box centres for ``radii`` (non-overlapping, inside, relation respected) or None if none found."""
    centres: list[tuple[int, int]] = []
    for i, r in enumerate(radii):
        for _ in range(_MAX_OBJECT_TRIES):
            c = (rng.randint(r, size - 1 - r), rng.randint(r, size - 1 - r))
            apart = all(
                abs(c[0] - p[0]) > r + q + MIN_GAP or abs(c[1] - p[1]) > r + q + MIN_GAP
                for p, q in zip(centres, radii)
            )
            if apart and relation is not None and i == 1:
                off_a, off_b = _centroid_offset(shapes[0], radii[0]), _centroid_offset(shapes[1], r)
                ca = (centres[0][0] + off_a[0], centres[0][1] + off_a[1])
                cb = (c[0] + off_b[0], c[1] + off_b[1])
                apart = relation_holds(relation, ca, cb, RELATION_MARGIN - 1e-6)
            if apart:
                centres.append(c)
                break
        else:
            return None
    return centres


def render_objects(
    objects: Sequence[ObjectSpec], rng: random.Random, size: int = IMAGE_SIZE, relation: str | None = None
) -> np.ndarray:
    """``[size, size, 3]`` uint8 image of ``objects`` (one entry per instance), deterministic given ``rng``.

    Args:
        objects: the instances to draw, in any number that fits.
        rng: source of radii and positions.
        size: image side in px.
        relation: when given, ``objects[0]`` is placed ``relation`` of ``objects[1]`` (centroids at least
            :data:`RELATION_MARGIN` px apart along the relation's axis).

    Raises:
        RuntimeError: when no layout fits (``size`` too small for the objects).
    """
    if relation is not None and len(objects) < 2:
        raise ValueError(f"relation={relation!r} needs at least two objects, got {len(objects)}")
    shapes = [o.shape for o in objects]
    for _ in range(_MAX_LAYOUTS):
        radii = [rng.randint(*RADIUS_RANGE) for _ in objects]
        centres = _layout(shapes, radii, size, relation, rng)
        if centres is not None:
            break
    else:
        raise RuntimeError(f"no layout of {len(objects)} objects fits a {size} px image")
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj, r, (cx, cy) in zip(objects, radii, centres):
        box = image[cy - r : cy + r + 1, cx - r : cx + r + 1]
        box[shape_mask(obj.shape, r)] = PALETTE[obj.color]
    return image


def render(spec: PromptSpec, rng: random.Random, size: int = IMAGE_SIZE) -> np.ndarray:
    """A faithful image of ``spec``: ``[size, size, 3]`` uint8, deterministic given the state of ``rng``."""
    return render_objects(spec.instances(), rng, size, spec.relation)


def render_batch(specs: Sequence[PromptSpec], seed: int, size: int = IMAGE_SIZE) -> torch.Tensor:
    """``[B, 3, H, W]`` float images in [0, 1] of ``specs``, deterministic from ``seed``."""
    rng = random.Random(seed)
    arr = np.stack([render(s, rng, size) for s in specs]) if specs else np.zeros((0, size, size, 3), np.uint8)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
