"""The moving-shapes world: captions of coloured shapes moving in stated directions, and procedural clips.

A clip is ``num_frames`` (default :data:`NUM_FRAMES`) frames of ``IMAGE_SIZE`` px squares drawn exactly like
the image world (:mod:`alignkit.worlds.shapes.world`: white background, crisp palette shapes from
:func:`~alignkit.worlds.shapes.world.shape_mask`, radii in ``RADIUS_RANGE``). Each object keeps its
colour, shape and radius and moves at constant speed along its caption's direction: ``left`` / ``right``
(x) or ``up`` / ``down`` (y, image rows grow downwards). Its perpendicular coordinate is fixed.

Motion. An object's speed ``v`` is drawn from :data:`SPEED_RANGE` px per frame; its total travel
``v * (F - 1)`` is clamped to ``[MIN_TRAVEL, size - 1 - 2r]`` so that short clips still move visibly and long
ones stay inside the frame. Frame ``t`` is drawn at the start position plus ``round(t * travel / (F - 1))``
px along the direction (integer positions, so every frame has the same mask and area). Objects stay inside
every frame and never overlap: in every frame their boxes are at least ``MIN_GAP`` empty pixels apart along
x or y.

Caption categories:

* ``single``: "a red circle moving left" (48 captions);
* ``two_object``: "a blue square moving up and a green triangle moving right": two objects with distinct
  colour-shape pairs, any directions (2112 captions).

The category names match the image world's, so :class:`~alignkit.worlds.shapes.shapeeval.ShapeEval` applied per frame
(:class:`~alignkit.rewards.video.PerFrame`) reads this world's metadata as the corresponding still-image prompt.

Held-out captions: the image world's rule (:func:`~alignkit.worlds.shapes.world.split_of`: SHA-256 of the
caption text 0 mod 5), applied to the video captions: 446 of the 2160 (21%; 11 single, 435 two_object).
:func:`prompt_set` draws from one split only.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from alignkit.worlds.common import draw_split
from alignkit.worlds.shapes.world import (
    BACKGROUND,
    COLORS,
    IMAGE_SIZE,
    MIN_GAP,
    PALETTE,
    RADIUS_RANGE,
    SHAPES,
    SPLITS,
    ObjectSpec,
    shape_mask,
    split_of,
)
from alignkit.worlds.shapes.world import VOCAB_WORDS as IMAGE_VOCAB_WORDS
from alignkit.worlds.shapes.world import parse_caption as parse_image_caption

__all__ = [
    "CATEGORIES", "DIRECTIONS", "IMAGE_SIZE", "NUM_FRAMES", "SPLITS", "VOCAB_WORDS", "WORLD", "MotionPath",
    "MotionSpec", "MovingObject", "all_specs", "draw_clip", "layout_clip", "parse_caption", "prompt_set",
    "render_batch", "render_clip", "sample_spec", "split_of",
]

WORLD = "shapes_video"
"""The ``"world"`` value of this world's metadata (the image world writes ``"shapes"``)."""
NUM_FRAMES = 8
CATEGORIES: tuple[str, ...] = ("single", "two_object")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
"""Direction name -> unit step ``(dx, dy)`` in image coordinates (y grows downwards)."""
SPEED_RANGE: tuple[float, float] = (1.5, 2.5)
"""Range of object speeds in px per frame (uniform draw)."""
MIN_TRAVEL = 6
"""Minimum total displacement (px) of an object from the first to the last frame."""

VOCAB_WORDS: tuple[str, ...] = (*IMAGE_VOCAB_WORDS, "moving", *DIRECTIONS)
"""Every word a caption of either shapes world can contain, in a fixed order (the image world's first)."""

_MAX_LAYOUTS = 200


@dataclass(frozen=True)
class MovingObject:
    """One object of a caption: a palette colour, a shape and a direction of motion."""

    color: str
    shape: str
    direction: str

    def __post_init__(self) -> None:
        ObjectSpec(self.color, self.shape)  # validates colour and shape
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction={self.direction!r} is unknown; use one of {tuple(DIRECTIONS)}")

    @property
    def still(self) -> ObjectSpec:
        """The object without its motion (an image-world object)."""
        return ObjectSpec(self.color, self.shape)

    def phrase(self) -> str:
        """``"a red circle moving left"``."""
        return f"{self.still.phrase()} moving {self.direction}"


@dataclass
class MotionSpec:
    """What a caption asks for.

    Attributes:
        category: one of :data:`CATEGORIES`.
        objects: one object for ``single``, two objects (A, B) with distinct colour-shape pairs for
            ``two_object``.
    """

    category: str
    objects: list[MovingObject] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.category not in CATEGORIES:
            raise ValueError(f"category={self.category!r} is unknown; use one of {CATEGORIES}")
        self.objects = [o if isinstance(o, MovingObject) else MovingObject(**o) for o in self.objects]
        want = 1 if self.category == "single" else 2
        if len(self.objects) != want:
            raise ValueError(f"a {self.category!r} prompt has {want} object(s), got {len(self.objects)}")
        if want == 2 and self.objects[0].still == self.objects[1].still:
            raise ValueError(f"a 'two_object' prompt needs two distinct colour-shape pairs, got "
                             f"{self.objects[0].still} twice")

    def caption(self) -> str:
        """The caption text, e.g. ``"a red circle moving left and a blue square moving up"``."""
        return " and ".join(o.phrase() for o in self.objects)

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able metadata (the per-prompt row a reward receives)."""
        return {
            "world": WORLD,
            "category": self.category,
            "objects": [{"color": o.color, "shape": o.shape, "direction": o.direction} for o in self.objects],
        }

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> MotionSpec:
        """Inverse of :meth:`to_metadata`.

        Raises:
            ValueError: when ``meta`` is not a valid spec (image-world metadata included: it has no directions).
        """
        world = meta.get("world", WORLD)
        if world != WORLD:
            raise ValueError(f"metadata of world {world!r} is not {WORLD!r} metadata: {meta!r}")
        try:
            return cls(
                category=meta["category"],
                objects=[MovingObject(o["color"], o["shape"], o["direction"]) for o in meta["objects"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid {WORLD} metadata {meta!r}: {type(exc).__name__}: {exc}") from exc


def parse_caption(text: str) -> MotionSpec | None:
    """Parse a caption of the world's grammar back into a spec; None when it does not parse.

    Case, surrounding whitespace and a final period are ignored; ``"an"``/``"one"`` read as ``"a"`` (the
    image world's noun-phrase rules).
    """
    words = text.strip().lower().rstrip(".").split()

    def moving(ws: list[str]) -> MovingObject | None:
        if len(ws) != 5 or ws[3] != "moving" or ws[4] not in DIRECTIONS:
            return None
        still = parse_image_caption(" ".join(ws[:3]))
        if still is None or still.category != "single":
            return None
        return MovingObject(still.objects[0].color, still.objects[0].shape, ws[4])

    if len(words) == 5:
        one = moving(words)
        return None if one is None else MotionSpec("single", [one])
    if len(words) == 11 and words[5] == "and":
        a, b = moving(words[:5]), moving(words[6:])
        if a is None or b is None or a.still == b.still:
            return None
        return MotionSpec("two_object", [a, b])
    return None


def all_specs(categories: Sequence[str] | None = None) -> list[MotionSpec]:
    """Every distinct prompt of the world (2160 over both categories), in a fixed order."""
    cats = tuple(categories) if categories is not None else CATEGORIES
    movers = [MovingObject(c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS]
    out: list[MotionSpec] = []
    for cat in cats:
        if cat == "single":
            out += [MotionSpec("single", [o]) for o in movers]
        elif cat == "two_object":
            out += [MotionSpec("two_object", [a, b]) for a in movers for b in movers if a.still != b.still]
        else:
            raise ValueError(f"category {cat!r} is unknown; use one of {CATEGORIES}")
    return out


def sample_spec(rng: random.Random, categories: Sequence[str] | None = None) -> MotionSpec:
    """A random prompt: category uniform over ``categories`` (all by default), then uniform attributes."""
    cats = tuple(categories) if categories is not None else CATEGORIES
    category = rng.choice(cats)
    if category not in CATEGORIES:
        raise ValueError(f"category {category!r} is unknown; use one of {CATEGORIES}")
    directions = tuple(DIRECTIONS)
    a = MovingObject(rng.choice(COLORS), rng.choice(SHAPES), rng.choice(directions))
    if category == "single":
        return MotionSpec("single", [a])
    b = a
    while b.still == a.still:
        b = MovingObject(rng.choice(COLORS), rng.choice(SHAPES), rng.choice(directions))
    return MotionSpec("two_object", [a, b])


def prompt_set(
    n: int, seed: int, split: str = "train", categories: Sequence[str] | None = None,
    exclude: Collection[str] = frozenset(),
) -> list[MotionSpec]:
    """``n`` prompts drawn with :func:`sample_spec` from ``random.Random(seed)``, keeping one split.

    Args:
        n: number of prompts (repeats allowed).
        seed: seed of the draw; the same arguments give the same list.
        split: ``"train"`` or ``"heldout"`` (see :func:`split_of`), or ``"all"``.
        categories: categories to draw from (all by default).
        exclude: captions never drawn (:func:`~alignkit.worlds.common.draw_split`).
    """
    return draw_split(n, seed, split, lambda rng: sample_spec(rng, categories), exclude)


@dataclass(frozen=True)
class MotionPath:
    """Where one object is drawn in each frame.

    Attributes:
        radius: box half-side in px (box side ``2r + 1``).
        centres: ``F`` box centres ``(x, y)`` in px, one per frame.
    """

    radius: int
    centres: tuple[tuple[int, int], ...]


def _candidates(direction: str, radius: int, num_frames: int, size: int, rng: random.Random) -> np.ndarray:
    """Every in-frame path ``[N, F, 2]`` (box centres ``(x, y)`` per frame) of one object at a random speed."""
    room = size - 1 - 2 * radius  # how far a box centre can move along one axis
    if room < MIN_TRAVEL:
        raise ValueError(f"a {size} px frame leaves {room} px of room to a radius-{radius} object, less than "
                         f"MIN_TRAVEL={MIN_TRAVEL}; use a frame of at least {MIN_TRAVEL + 1 + 2 * radius} px")
    travel = min(max(rng.uniform(*SPEED_RANGE) * (num_frames - 1), MIN_TRAVEL), room)
    offsets = np.floor(np.arange(num_frames) * travel / (num_frames - 1) + 0.5).astype(np.int64)  # [F]
    dx, dy = DIRECTIONS[direction]
    lo, hi = radius, size - 1 - radius
    starts = np.arange(lo, hi - offsets[-1] + 1) if dx + dy > 0 else np.arange(lo + offsets[-1], hi + 1)
    across = np.arange(lo, hi + 1)
    along = starts[:, None, None] + (dx + dy) * offsets[None, None, :]  # [S, 1, F]
    along, fixed = np.broadcast_arrays(along, across[None, :, None])  # [S, A, F] each
    xy = (along, fixed) if dx else (fixed, along)
    return np.stack(xy, axis=-1).reshape(-1, num_frames, 2)  # [S*A, F, 2]


def layout_clip(
    spec: MotionSpec, rng: random.Random, num_frames: int = NUM_FRAMES, size: int = IMAGE_SIZE
) -> list[MotionPath]:
    """One path per object of ``spec``: inside the frame, never overlapping, deterministic given ``rng``.

    Objects are placed in order: each draws a radius and a speed, then a path uniformly among those of that
    radius and speed that keep clear of the objects already placed (all of them for the first object); when
    there is none, the layout starts over. Two objects moving towards each other or across each other's
    path only fit when small and slow, so such clips have smaller, slower objects on average.

    Raises:
        ValueError: when ``num_frames < 2`` or the frame is too small for the motion.
        RuntimeError: when no non-overlapping layout is found.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames={num_frames}: a moving-shapes clip needs at least 2 frames")
    for _ in range(_MAX_LAYOUTS):
        paths: list[MotionPath] = []
        for obj in spec.objects:
            radius = rng.randint(*RADIUS_RANGE)
            cands = _candidates(obj.direction, radius, num_frames, size, rng)  # [N, F, 2]
            ok = np.ones(len(cands), dtype=bool)
            for p in paths:
                gap = radius + p.radius + MIN_GAP
                far = (np.abs(cands - np.asarray(p.centres)[None]) > gap).any(axis=-1)  # [N, F]
                ok &= far.all(axis=-1)
            valid = np.flatnonzero(ok)
            if not len(valid):
                break
            chosen = cands[valid[rng.randrange(len(valid))]]  # [F, 2]
            paths.append(MotionPath(radius, tuple((int(x), int(y)) for x, y in chosen)))
        else:
            return paths
    raise RuntimeError(f"no non-overlapping layout of {spec.caption()!r} found in {_MAX_LAYOUTS} tries "
                       f"({num_frames} frames of {size} px)")


def draw_clip(objects: Sequence[MovingObject | ObjectSpec], paths: Sequence[MotionPath], size: int) -> np.ndarray:
    """``[F, size, size, 3]`` uint8 frames with each object drawn along its path, as the image world draws."""
    if len(objects) != len(paths) or not paths:
        raise ValueError(f"give one path per object, got {len(objects)} objects and {len(paths)} paths")
    frames = np.empty((len(paths[0].centres), size, size, 3), dtype=np.uint8)  # [F, H, W, 3]
    frames[:] = BACKGROUND
    for obj, path in zip(objects, paths):
        r, mask, rgb = path.radius, shape_mask(obj.shape, path.radius), PALETTE[obj.color]
        for frame, (cx, cy) in zip(frames, path.centres):
            frame[cy - r : cy + r + 1, cx - r : cx + r + 1][mask] = rgb
    return frames


def render_clip(
    spec: MotionSpec, rng: random.Random, num_frames: int = NUM_FRAMES, size: int = IMAGE_SIZE
) -> np.ndarray:
    """A faithful clip of ``spec``: ``[F, size, size, 3]`` uint8, deterministic given the state of ``rng``."""
    return draw_clip(spec.objects, layout_clip(spec, rng, num_frames, size), size)


def render_batch(
    specs: Sequence[MotionSpec], seed: int, num_frames: int = NUM_FRAMES, size: int = IMAGE_SIZE
) -> torch.Tensor:
    """``[B, F, 3, H, W]`` float clips in [0, 1] of ``specs``, deterministic from ``seed``."""
    rng = random.Random(seed)
    if specs:
        arr = np.stack([render_clip(s, rng, num_frames, size) for s in specs])  # [B, F, H, W, 3]
    else:
        arr = np.zeros((0, num_frames, size, size, 3), np.uint8)
    return torch.from_numpy(arr).permute(0, 1, 4, 2, 3).float().div_(255.0)
