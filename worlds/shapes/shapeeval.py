"""ShapeEval: a GenEval-style programmatic reward for the shapes world, by plain image processing.

Detection (numpy only), on images ``[B, 3, H, W]`` in [0, 1] scaled to 0-255:

1. Pixel colours. The references are white and the four palette colours of
   :mod:`alignkit.worlds.shapes.world`. A pixel takes palette colour ``c`` when ``c`` is its nearest
   reference and clearly so: ``d(c) < color_margin * d(r)`` for every other reference ``r`` (white and the
   other three colours), Euclidean RGB distance, ``color_margin = 0.5``. Otherwise it is background. So a
   colour/white blend counts once it is at least 2/3 colour, a pixel between two palette colours (orange
   between red and yellow) or a grey/black pixel counts as nothing, and the rule tolerates colour drift of
   about 50 units (pure-noise std 0.03 is about 13).
2. Objects. Per colour, 4-connected components of at least ``min_area = 8`` px (rendered objects have
   41 px or more, so this only drops specks).
3. Shapes, from the fill ratio ``area / bbox area`` (ideal square 1.0, disc 0.785, triangle 0.5; the
   world's crisp renders give 1.0, 0.80-0.85 and 0.50-0.51): ``>= 0.90`` square, ``>= 0.65`` circle,
   else triangle, thresholds midway between neighbouring classes. Fallback: a component whose bbox has a
   side under ``min_side = 4`` px (rendered boxes are 9-13 px) or an aspect ratio above ``max_aspect = 2``
   is too small or thin to have a shape: it is an object of shape ``"blob"``, which matches no shape.

Scoring, per prompt (its :class:`~alignkit.worlds.shapes.world.PromptSpec`), with named 0/1 credits so
that an image contradicting the caption in exactly one attribute loses exactly that credit:

* ``single`` / ``count`` (``n`` objects of colour ``c``, shape ``s``): ``count`` (exactly ``n`` objects
  detected), ``color`` (at least one object and all of colour ``c``), ``shape`` (at least one and all of
  shape ``s``).
* ``two_object`` (A and B): ``object_a`` (some object has A's colour and shape), ``object_b`` (same for
  B), ``count`` (exactly 2 objects detected).
* ``position`` (A rel B): ``object_a``, ``object_b`` as above, and ``relation``, judged on the ordered pair
  of distinct objects ``(a, b)`` that best resembles (A, B): a match scores 2 for colour and shape, 1 for
  one of them, and the pair maximises ``match(a, A) + match(b, B)``, then ``match(a, A)``, then the total
  area. The pair needs a total match of at least 1. The relation holds when the centroids differ by more
  than ``relation_margin = 2`` px the right way (left of: ``x_a < x_b - 2``; above: ``y_a < y_b - 2``).
  B drawn in the wrong colour thus costs ``object_b`` only.

Strict score: 1.0 when every credit is 1, else 0.0. Partial score: the mean credit.

Soft score (``mode: soft``, a denser training signal; evaluate with ``partial`` / ``strict``): the mean of
graded versions of the same credits, each in [0, 1], equal to 1 exactly when the 0/1 credit is 1 and never
below it. ``count``: ``max(0, 1 - |k - n| / n)`` for ``k`` detected objects; ``color`` / ``shape``: the
fraction of the detected objects' area that has the caption's colour / shape (0 with no objects);
``object_a`` / ``object_b``: the best ``match / 2`` over the detections (0.5 for the right colour or shape
alone); ``relation``: as the 0/1 credit. So soft = 1 exactly when strict = 1.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

# the spec helpers are the worlds' shared ones (spec_of_sample re-exported)
from alignkit.worlds.common import as_spec, score_by_spec
from alignkit.worlds.common import spec_of_sample as spec_of_sample
from alignkit.worlds.shapes.world import (
    BACKGROUND,
    CATEGORIES,
    PALETTE,
    ObjectSpec,
    PromptSpec,
    parse_caption,
    relation_holds,
)

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("partial", "strict", "soft")
BLOB = "blob"
"""Shape of a component too small or too thin to classify; matches no caption shape."""

_COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)
_REFERENCES = np.array([*PALETTE.values(), BACKGROUND], dtype=np.float64)  # palette rows, then white


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of the detector (see the module docstring)."""

    color_margin: float = 0.5
    min_area: int = 8
    min_side: int = 4
    max_aspect: float = 2.0
    square_fill: float = 0.90
    circle_fill: float = 0.65
    relation_margin: float = 2.0


DEFAULT_DETECTOR = DetectorConfig()


@dataclass(frozen=True)
class DetectedObject:
    """One detected component.

    Attributes:
        color: palette colour name.
        shape: ``"circle"``, ``"square"``, ``"triangle"`` or ``"blob"``.
        area: pixels.
        bbox: ``(x0, y0, x1, y1)``, inclusive pixel indices.
        centroid: ``(x, y)`` mean pixel index.
        fill: ``area`` over the bbox area.
    """

    color: str
    shape: str
    area: int
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]
    fill: float


def _to_hwc255(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[B, 3, H, W]`` in [0, 1] to float32 ``[B, H, W, 3]`` in [0, 255]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy()
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W] in [0, 1], got {tuple(arr.shape)}")
    return np.clip(np.nan_to_num(arr), 0.0, 1.0).transpose(0, 2, 3, 1) * 255.0


def color_labels(images: np.ndarray, cfg: DetectorConfig = DEFAULT_DETECTOR) -> np.ndarray:
    """Per-pixel palette index (``-1`` for background) of float ``[..., 3]`` images in [0, 255]."""
    px = np.asarray(images, dtype=np.float64)
    sq = (px * px).sum(-1, keepdims=True) - 2.0 * px @ _REFERENCES.T + (_REFERENCES**2).sum(-1)  # [..., 5]
    two = np.partition(sq, 1, axis=-1)[..., :2]
    nearest = sq.argmin(axis=-1)
    fg = (nearest < len(_COLOR_NAMES)) & (two[..., 0] < cfg.color_margin**2 * two[..., 1])
    return np.where(fg, nearest, -1)


def _components(labels: np.ndarray) -> list[tuple[int, list[tuple[int, int]]]]:
    """4-connected components of equal non-negative labels: ``(label, [(y, x), ...])`` each."""
    h, w = labels.shape
    lab = labels.tolist()
    seen = [[False] * w for _ in range(h)]
    out = []
    for y0, x0 in np.argwhere(labels >= 0).tolist():
        if seen[y0][x0]:
            continue
        c = lab[y0][x0]
        seen[y0][x0] = True
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and not seen[ny][nx] and lab[ny][nx] == c:
                    seen[ny][nx] = True
                    stack.append((ny, nx))
        out.append((c, pixels))
    return out


def classify_shape(area: int, width: int, height: int, cfg: DetectorConfig = DEFAULT_DETECTOR) -> str:
    """Shape class of a component from its area and bbox size."""
    if min(width, height) < cfg.min_side or max(width, height) > cfg.max_aspect * min(width, height):
        return BLOB
    fill = area / (width * height)
    if fill >= cfg.square_fill:
        return "square"
    return "circle" if fill >= cfg.circle_fill else "triangle"


def detect_labels(labels: np.ndarray, cfg: DetectorConfig = DEFAULT_DETECTOR) -> list[DetectedObject]:
    """Objects of one ``[H, W]`` colour-label map (see :func:`color_labels`), largest first."""
    objects = []
    for c, pixels in _components(labels):
        if len(pixels) < cfg.min_area:
            continue
        ys, xs = np.array(pixels).T
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())
        w, h = x1 - x0 + 1, y1 - y0 + 1
        objects.append(DetectedObject(
            color=_COLOR_NAMES[c], shape=classify_shape(len(pixels), w, h, cfg), area=len(pixels),
            bbox=(x0, y0, x1, y1), centroid=(float(xs.mean()), float(ys.mean())), fill=len(pixels) / (w * h),
        ))
    return sorted(objects, key=lambda o: (-o.area, o.bbox[1], o.bbox[0]))


def detect(images: torch.Tensor | np.ndarray, cfg: DetectorConfig = DEFAULT_DETECTOR) -> list[list[DetectedObject]]:
    """Detected objects of each image of ``[B, 3, H, W]`` in [0, 1]."""
    labels = color_labels(_to_hwc255(images), cfg)
    return [detect_labels(lab, cfg) for lab in labels]


def _match(obj: DetectedObject, spec: ObjectSpec) -> int:
    """2 for same colour and shape, 1 for one of them, 0 otherwise."""
    return int(obj.color == spec.color) + int(obj.shape == spec.shape)


def _relation_pair(objects: list[DetectedObject], a: ObjectSpec, b: ObjectSpec) -> tuple[int, int] | None:
    """Indices of the distinct objects that best stand for (A, B), or None (see the module docstring)."""
    best, best_key = None, None
    for i, oa in enumerate(objects):
        ma = _match(oa, a)
        for j, ob in enumerate(objects):
            if i == j:
                continue
            total = ma + _match(ob, b)
            key = (total, ma, oa.area + ob.area)
            if total >= 1 and (best_key is None or key > best_key):
                best, best_key = (i, j), key
    return best


def score_objects(
    objects: list[DetectedObject], spec: PromptSpec, cfg: DetectorConfig = DEFAULT_DETECTOR
) -> dict[str, float]:
    """The named 0/1 attribute credits of one image's detections against ``spec``."""
    if spec.category in ("single", "count"):
        want = spec.objects[0]
        return {
            "count": float(len(objects) == spec.count),
            "color": float(bool(objects) and all(o.color == want.color for o in objects)),
            "shape": float(bool(objects) and all(o.shape == want.shape for o in objects)),
        }
    a, b = spec.objects
    credits = {
        "object_a": float(any(_match(o, a) == 2 for o in objects)),
        "object_b": float(any(_match(o, b) == 2 for o in objects)),
    }
    if spec.category == "two_object":
        credits["count"] = float(len(objects) == 2)
        return credits
    pair = _relation_pair(objects, a, b)
    assert spec.relation is not None
    credits["relation"] = float(
        pair is not None
        and relation_holds(spec.relation, objects[pair[0]].centroid, objects[pair[1]].centroid, cfg.relation_margin)
    )
    return credits


def soft_credits(
    objects: list[DetectedObject], spec: PromptSpec, cfg: DetectorConfig = DEFAULT_DETECTOR
) -> dict[str, float]:
    """Graded credits in [0, 1] of one image's detections (see the module docstring), keyed like
    :func:`score_objects`, each 1 exactly when its 0/1 credit is 1."""
    hard = score_objects(objects, spec, cfg)
    if spec.category in ("single", "count"):
        want = spec.objects[0]
        area = sum(o.area for o in objects)
        return {
            "count": max(0.0, 1.0 - abs(len(objects) - spec.count) / spec.count),
            "color": sum(o.area for o in objects if o.color == want.color) / area if area else 0.0,
            "shape": sum(o.area for o in objects if o.shape == want.shape) / area if area else 0.0,
        }
    a, b = spec.objects
    credits = {
        "object_a": max((_match(o, a) / 2 for o in objects), default=0.0),
        "object_b": max((_match(o, b) / 2 for o in objects), default=0.0),
    }
    if spec.category == "two_object":
        credits["count"] = max(0.0, 1.0 - abs(len(objects) - 2) / 2)
    else:
        credits["relation"] = hard["relation"]
    return credits


def shapeeval_details(
    images: torch.Tensor | np.ndarray,
    metadata: Sequence[PromptSpec | Mapping[str, Any]],
    cfg: DetectorConfig = DEFAULT_DETECTOR,
) -> list[dict[str, Any]]:
    """Per-image evaluation: category, caption, credits, strict / partial / soft scores, detected objects.

    Args:
        images: ``[B, 3, H, W]`` in [0, 1].
        metadata: ``B`` specs, as :class:`PromptSpec` or :meth:`PromptSpec.to_metadata` dicts.

    Raises:
        ValueError: on a length mismatch or a row that is not a valid spec.
    """
    specs = [as_spec(m, i, PromptSpec, "shapes-world") for i, m in enumerate(metadata)]
    detections = detect(images, cfg)
    if len(detections) != len(specs):
        raise ValueError(f"{len(detections)} images but {len(specs)} metadata rows; give one per image")
    out = []
    for spec, objects in zip(specs, detections):
        credits = score_objects(objects, spec, cfg)
        soft = soft_credits(objects, spec, cfg)
        values = list(credits.values())
        out.append({
            "category": spec.category,
            "caption": spec.caption(),
            "credits": credits,
            "soft_credits": soft,
            "strict": float(all(v == 1.0 for v in values)),
            "partial": sum(values) / len(values),
            "soft": sum(soft.values()) / len(soft),
            "objects": [asdict(o) for o in objects],
        })
    return out


def summarize(details: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """GenEval-style summary of :func:`shapeeval_details` rows.

    Keys: ``{category}/strict``, ``{category}/partial``, ``{category}/n`` and ``{category}/{credit}`` (mean
    credit) for each category present, and ``strict`` / ``partial``: the unweighted mean over those
    categories, ``n``: the number of rows. Empty input gives ``{"n": 0.0}``.
    """
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for d in details:
        groups[d["category"]].append(d)
    out: dict[str, float] = {}
    cats = [c for c in CATEGORIES if c in groups] + sorted(set(groups) - set(CATEGORIES))
    for cat in cats:
        rows = groups[cat]
        out[f"{cat}/strict"] = float(np.mean([r["strict"] for r in rows]))
        out[f"{cat}/partial"] = float(np.mean([r["partial"] for r in rows]))
        out[f"{cat}/n"] = float(len(rows))
        for name in rows[0]["credits"]:
            out[f"{cat}/{name}"] = float(np.mean([r["credits"][name] for r in rows]))
    if cats:
        out["strict"] = float(np.mean([out[f"{c}/strict"] for c in cats]))
        out["partial"] = float(np.mean([out[f"{c}/partial"] for c in cats]))
    out["n"] = float(len(details))
    return out


def resolve_spec(prompt: str, metadata: Mapping[str, Any] | None) -> PromptSpec | None:
    """The shapes-world spec of one sample (:func:`alignkit.worlds.common.spec_of_sample`); None for a caption of
    no shapes-world.

    Raises:
        ValueError: when the metadata carries a malformed spec.
    """
    return spec_of_sample(prompt, metadata, PromptSpec, parse_caption)


class ShapeEval:
    """ShapeEval reward: the strict or partial score of each sample (see the module docstring).

    A sample gets None (masked, not trained on) when neither its metadata nor its prompt gives a
    shapes-world spec.

    Args:
        mode: ``"partial"`` (mean attribute credit, in [0, 1]), ``"strict"`` (1.0 when every credit holds) or
            ``"soft"`` (mean graded credit, in [0, 1]; a denser training reward).
        detector: detector thresholds (a :class:`DetectorConfig` or a dict of its fields).
    """

    def __init__(self, mode: str = "partial", detector: DetectorConfig | Mapping[str, Any] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not a ShapeEval mode; use one of {MODES}")
        self.mode = mode
        self.cfg = detector if isinstance(detector, DetectorConfig) else DetectorConfig(**(detector or {}))

    def __call__(
        self,
        samples: torch.Tensor | np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]],
    ) -> list[float | None]:
        return score_by_spec(samples, prompts, metadata, resolve_spec,
                             lambda x, specs: shapeeval_details(x, specs, self.cfg), self.mode, "shapes-world")
