"""MotionEval: a programmatic reward for the moving-shapes video world, by plain image processing.

Clips ``[B, F, 3, H, W]`` in [0, 1] are read frame by frame with ShapeEval's detector
(:func:`alignkit.worlds.shapes.shapeeval.detect`: palette colour classification, 4-connected components, shape classes
from the fill ratio; thresholds in :class:`~alignkit.worlds.shapes.shapeeval.DetectorConfig`).

Tracking. In each frame the caption's objects (one or two) are matched to distinct detections: a detection
matches an object with score 2 for the same colour and shape, 1 for one of them, and only with score 1 or
more. The assignment maximises the total score, then the scores in caption order (A first), then the
total area; an object left without a match is absent from that frame. Its matched detections over the
frames are its track.

Credits, per caption object, each in [0, 1] (prefixed ``a/`` and ``b/`` for ``two_object`` captions), so
that a clip contradicting the caption in one attribute loses that credit only:

* ``presence``: fraction of the ``F`` frames in which the object is tracked;
* ``color`` / ``shape``: fraction of the tracked frames whose detection has the caption's colour / shape
  (0 when never tracked);
* ``direction``: 1 when the track's centroid moves at least ``min_displacement`` px (default 3) along the
  caption's direction from its first to its last tracked frame (left: x decreases; up: y decreases), else 0
  (also with fewer than 2 tracked frames). The world moves every object at least 6 px;
* ``consistency``: ``clip(1 - cv / max_area_cv, 0, 1)``, where ``cv`` is the coefficient of variation
  (std / mean) of the tracked areas and ``max_area_cv = 0.5``; 0 with fewer than 2 tracked frames. A
  rendered clip keeps its areas exactly (1.0); an object that grows, shrinks or flickers loses it.

Partial score: the mean credit. Strict score: 1.0 when ``presence``, ``color``, ``shape`` are at least
``strict_fraction`` (default 1.0: every frame), ``direction`` is 1 and ``consistency`` is at least
``strict_consistency`` (default 0.8) for every object, else 0.0.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from alignkit.rewards.video import check_videos
from alignkit.worlds.common import as_spec, score_by_spec, spec_of_sample
from alignkit.worlds.moving_shapes.world import DIRECTIONS, MotionSpec, MovingObject, parse_caption
from alignkit.worlds.shapes.shapeeval import (
    DEFAULT_DETECTOR,
    DetectedObject,
    DetectorConfig,
    detect,
    summarize,
)

__all__ = [
    "CREDITS", "DEFAULT_MOTION", "MODES", "MotionConfig", "MotionEval", "motioneval_details", "object_credits",
    "resolve_spec", "summarize", "track_objects",
]

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("partial", "strict")
CREDITS: tuple[str, ...] = ("presence", "color", "shape", "direction", "consistency")
"""The credit names of one caption object."""


@dataclass(frozen=True)
class MotionConfig:
    """Motion thresholds of MotionEval (see the module docstring)."""

    min_displacement: float = 3.0
    max_area_cv: float = 0.5
    strict_fraction: float = 1.0
    strict_consistency: float = 0.8

    def __post_init__(self) -> None:
        if self.min_displacement <= 0 or self.max_area_cv <= 0:
            raise ValueError(f"min_displacement={self.min_displacement} and max_area_cv={self.max_area_cv} "
                             "must be > 0")
        for name in ("strict_fraction", "strict_consistency"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1]")


DEFAULT_MOTION = MotionConfig()


def _match(det: DetectedObject, obj: MovingObject) -> int:
    """2 for same colour and shape, 1 for one of them, 0 otherwise."""
    return int(det.color == obj.color) + int(det.shape == obj.shape)


def _assign(detections: Sequence[DetectedObject], objects: Sequence[MovingObject]) -> list[DetectedObject | None]:
    """One frame's detection per caption object (distinct), or None where it has none (module docstring)."""
    options = [[i for i, d in enumerate(detections) if _match(d, o) >= 1] + [None] for o in objects]
    best: tuple[int | None, ...] = (None,) * len(objects)
    best_key: tuple[int, ...] | None = None
    for choice in itertools.product(*options):
        chosen = [i for i in choice if i is not None]
        if len(set(chosen)) < len(chosen):
            continue
        matches = [0 if i is None else _match(detections[i], o) for i, o in zip(choice, objects)]
        key = (sum(matches), *matches, sum(detections[i].area for i in chosen))
        if best_key is None or key > best_key:
            best, best_key = choice, key
    return [None if i is None else detections[i] for i in best]


def track_objects(
    frames: Sequence[Sequence[DetectedObject]], spec: MotionSpec
) -> list[list[DetectedObject | None]]:
    """Per caption object, its matched detection in each of the ``F`` frames (None where absent)."""
    per_frame = [_assign(dets, spec.objects) for dets in frames]  # [F][K]
    return [list(track) for track in zip(*per_frame)]  # [K][F]


def object_credits(
    track: Sequence[DetectedObject | None], obj: MovingObject, cfg: MotionConfig = DEFAULT_MOTION
) -> dict[str, float]:
    """The credits (:data:`CREDITS`) of one caption object from its track over ``F`` frames."""
    seen = [d for d in track if d is not None]
    credits = dict.fromkeys(CREDITS, 0.0)
    credits["presence"] = len(seen) / len(track)
    if not seen:
        return credits
    credits["color"] = sum(d.color == obj.color for d in seen) / len(seen)
    credits["shape"] = sum(d.shape == obj.shape for d in seen) / len(seen)
    if len(seen) >= 2:
        dx, dy = DIRECTIONS[obj.direction]
        axis, sign = (0, dx) if dx else (1, dy)
        moved = sign * (seen[-1].centroid[axis] - seen[0].centroid[axis])
        credits["direction"] = float(moved >= cfg.min_displacement)
        areas = np.array([d.area for d in seen], dtype=np.float64)  # [T]
        cv = float(areas.std() / areas.mean())
        credits["consistency"] = float(np.clip(1.0 - cv / cfg.max_area_cv, 0.0, 1.0))
    return credits


def _strict(credits: Mapping[str, float], cfg: MotionConfig) -> float:
    """1.0 when every credit meets its strict threshold, else 0.0."""
    floors = {"presence": cfg.strict_fraction, "color": cfg.strict_fraction, "shape": cfg.strict_fraction,
              "direction": 1.0, "consistency": cfg.strict_consistency}
    return float(all(v >= floors[name.rsplit("/", 1)[-1]] for name, v in credits.items()))


def _as_videos(videos: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Validated float clips ``[B, F, 3, H, W]`` with at least 2 frames."""
    out = check_videos(torch.as_tensor(videos) if isinstance(videos, np.ndarray) else videos)
    if out.shape[1] < 2:
        raise ValueError(f"MotionEval needs clips of at least 2 frames, got F={out.shape[1]} ({tuple(out.shape)})")
    return out


def motioneval_details(
    videos: torch.Tensor | np.ndarray,
    metadata: Sequence[MotionSpec | Mapping[str, Any]],
    detector: DetectorConfig = DEFAULT_DETECTOR,
    motion: MotionConfig = DEFAULT_MOTION,
) -> list[dict[str, Any]]:
    """Per-clip evaluation: category, caption, credits, strict and partial scores, object tracks.

    Args:
        videos: ``[B, F, 3, H, W]`` in [0, 1], ``F >= 2``.
        metadata: ``B`` specs, as :class:`MotionSpec` or :meth:`MotionSpec.to_metadata` dicts.
        detector: per-frame detector thresholds (ShapeEval's).
        motion: motion thresholds.

    Returns:
        One dict per clip; ``"tracks"`` holds, per caption object, ``F`` entries: the matched detection as a
        dict (colour, shape, area, bbox, centroid, fill) or None.

    Raises:
        ValueError: on a length mismatch or a row that is not a valid spec.
    """
    specs = [as_spec(m, i, MotionSpec, "moving-shapes") for i, m in enumerate(metadata)]
    clips = _as_videos(videos)
    b, f = clips.shape[:2]
    if b != len(specs):
        raise ValueError(f"{b} clips but {len(specs)} metadata rows; give one per clip")
    detections = detect(clips.reshape(b * f, *clips.shape[2:]), detector)  # B*F frames
    out = []
    for k, spec in enumerate(specs):
        tracks = track_objects(detections[k * f : (k + 1) * f], spec)
        credits: dict[str, float] = {}
        for prefix, track, obj in zip(("a/", "b/"), tracks, spec.objects):
            prefix = prefix if len(spec.objects) > 1 else ""
            credits |= {prefix + name: v for name, v in object_credits(track, obj, motion).items()}
        out.append({
            "category": spec.category,
            "caption": spec.caption(),
            "credits": credits,
            "strict": _strict(credits, motion),
            "partial": sum(credits.values()) / len(credits),
            "tracks": [[None if d is None else asdict(d) for d in track] for track in tracks],
        })
    return out


def resolve_spec(prompt: str, metadata: Mapping[str, Any] | None) -> MotionSpec | None:
    """The moving-shapes spec of one sample (:func:`alignkit.worlds.common.spec_of_sample`); None for a
    caption of no moving-shapes world.

    Raises:
        ValueError: when the metadata carries a malformed spec (or one of another world).
    """
    return spec_of_sample(prompt, metadata, MotionSpec, parse_caption)


class MotionEval:
    """MotionEval reward: the strict or partial score of each clip (see the module docstring).

    A sample gets None (masked, not trained on) when neither its metadata nor its prompt gives a
    moving-shapes spec.

    Args:
        mode: ``"partial"`` (mean credit, in [0, 1]) or ``"strict"`` (1.0 when every credit meets its threshold).
        detector: per-frame detector thresholds (a :class:`~alignkit.worlds.shapes.shapeeval.DetectorConfig` or a dict
            of its fields).
        motion: motion thresholds (a :class:`MotionConfig` or a dict of its fields).
    """

    def __init__(
        self,
        mode: str = "partial",
        detector: DetectorConfig | Mapping[str, Any] | None = None,
        motion: MotionConfig | Mapping[str, Any] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not a MotionEval mode; use one of {MODES}")
        self.mode = mode
        self.detector = detector if isinstance(detector, DetectorConfig) else DetectorConfig(**(detector or {}))
        self.motion = motion if isinstance(motion, MotionConfig) else MotionConfig(**(motion or {}))

    def __call__(
        self,
        samples: torch.Tensor | np.ndarray,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]],
    ) -> list[float | None]:
        clips = _as_videos(samples)  # [B, F, 3, H, W]
        return score_by_spec(clips, prompts, metadata, resolve_spec,
                             lambda x, specs: motioneval_details(x, specs, self.detector, self.motion), self.mode,
                             "moving-shapes")
