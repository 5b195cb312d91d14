"""GenEval's rules as a pure function of detections: per-image correctness, the reward server's strict verdict
and its partial credit (the value Flow-GRPO trains on).

Everything here follows ``geneval.md`` (GenEval ``evaluation/evaluate_images.py`` and ``summary_scores.py``;
the flow_grpo reward server ``reward_server/gen_eval.py``); no model runs in this module.

Metadata (one row per prompt, GenEval's ``evaluation_metadata.jsonl`` format, parsed by
:meth:`GenEvalRow.from_metadata`)::

    {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                    {"class": "cat", "count": 1, "position": ["above", 0]}]}

``tag`` is one of :data:`TAGS`; each ``include`` clause has ``class`` (one of :data:`OBJECT_NAMES`), ``count``
(>= 1), optional ``color`` (one of :data:`COLORS`) and optional ``position`` ``[relation, index]`` (the clause's
objects must stand in ``relation`` to those of the earlier clause ``index``); ``exclude`` clauses
``{class, count}`` fail the image when the class has ``count`` or more detections.

Filtering (:func:`kept_indices`): a detection is kept when its score is **above** ``threshold`` (0.3), or above
``counting_threshold`` (0.9) for every class of a ``counting`` row; per class, best first, at most
``max_per_class`` (16); then, only when ``max_overlap < 1``, greedy suppression of boxes whose inclusive-pixel
IoU with a better box of the class is ``>= max_overlap`` (GenEval's default 1.0 turns it off). Score ties keep
the detector's order (GenEval leaves it unspecified).

Verdicts (:func:`judge`):

* ``correct`` (GenEval): each include clause takes the ``count`` best detections of its class (fewer fails); all
  must have the clause's colour; a position clause (checked only when the clause passed so far) needs its
  target clause to have passed and every (object, target object) pair to stand in the relation; a failed
  clause cannot be a position target. Exclude clauses fail the image at ``count`` or more detections.
* ``strict`` (the reward server): every include clause needs **exactly** ``count`` detections; colours and
  positions as above on all of them; exclude clauses are not consulted.
* ``score`` (the reward server's ``scores``, Flow-GRPO's training reward): the mean of the terms each include
  clause appends with ``n`` kept detections and required count ``c``: ``1 - |c - n| / c`` (not clipped; ``n = 3``
  for ``c = 1`` gives ``-1``); if ``n != c`` and the clause has a colour or a position, ``0`` and nothing more;
  with a colour, ``k / c`` for ``k`` detections of that colour; with a position, ``0`` when the target failed,
  else ``0`` at the first pair without the relation and then always ``1``. No terms gives 0.

Positions (:func:`relations`): A's box against B's, y downwards. The centre offset ``(ox, oy)`` is shrunk per
axis by ``position_threshold`` (0.1) times the summed extents, divided by the *unshrunk* offset length;
``left of``/``right of`` when that x part is below -0.5 / above 0.5, ``above``/``below`` likewise for y (strict),
nothing when both shrunk parts are under 1e-3. A diagonal placement can hold two relations.

Summary (:func:`summarize`): GenEval's Overall is the unweighted mean of the per-task fractions of correct
images, not the mean over images.
"""

from __future__ import annotations

import difflib
import math
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

COCO_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip
"""COCO's 80 thing categories in COCO's contiguous order (the order of 80-class detectors' labels)."""

COCO_RENAMES: dict[str, str] = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
"""The three COCO names GenEval changes."""

OBJECT_NAMES: tuple[str, ...] = tuple(COCO_RENAMES.get(name, name) for name in COCO_NAMES)
"""GenEval's 80 object names, in COCO order."""

COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

Box = tuple[float, float, float, float]

_CLAUSE_KEYS = ("class", "count", "color", "position")
_METADATA_FIX = ("give each prompt GenEval metadata ({'tag': ..., 'include': [{'class': ..., 'count': ...}], "
                 "'exclude': [...]}): use prompts.source=geneval or a .jsonl prompt file with those fields")


class GenEvalMetadataError(ValueError):
    """A metadata row GenEval cannot score; the message names the field, the value and the fix."""


@dataclass(frozen=True, eq=False)
class Detection:
    """One detected object instance.

    Attributes:
        label: its GenEval object name (one of :data:`OBJECT_NAMES` for COCO detectors).
        score: detector confidence in [0, 1].
        box: ``(x1, y1, x2, y2)`` in pixels, y downwards (a mask's box is ``[min x, min y, max x + 1, max y + 1]``).
        mask: ``[H, W]`` bool array over the whole image, or ``None`` for box-only detectors.
        color: one of :data:`COLORS` once classified, else ``None``.
    """

    label: str
    score: float
    box: Box
    mask: np.ndarray | None = None
    color: str | None = None


@dataclass(frozen=True)
class Clause:
    """An include clause: ``count`` objects of ``cls``, optionally of ``color`` and in ``position``
    ``(relation, index of an earlier clause)``."""

    cls: str
    count: int
    color: str | None = None
    position: tuple[str, int] | None = None


@dataclass(frozen=True)
class ExcludeClause:
    """The image fails when ``cls`` has ``count`` or more kept detections."""

    cls: str
    count: int


@dataclass(frozen=True)
class GenEvalRow:
    """One prompt's GenEval metadata, validated."""

    tag: str
    include: tuple[Clause, ...]
    exclude: tuple[ExcludeClause, ...] = ()

    @classmethod
    def from_metadata(cls, meta: Any, where: str = "metadata", classes: Collection[str] = OBJECT_NAMES
                      ) -> GenEvalRow:
        """Parse a GenEval metadata row.

        Args:
            meta: the row (``tag``, ``include``, optional ``exclude``; other keys such as ``prompt`` are ignored).
            where: how error messages name the row, e.g. ``metadata[3]``.
            classes: the object names the detector knows.

        Raises:
            GenEvalMetadataError: naming the bad field, its value and the fix.
        """
        if not isinstance(meta, Mapping):
            raise GenEvalMetadataError(f"{where}={meta!r} is not a mapping; {_METADATA_FIX}")
        for key in ("tag", "include"):
            if key not in meta:
                raise GenEvalMetadataError(f"{where} has no {key!r} (keys: {sorted(meta)}); {_METADATA_FIX}")
        tag = meta["tag"]
        if tag not in TAGS:
            raise GenEvalMetadataError(f"{where}.tag={tag!r} is not a GenEval task; use one of {', '.join(TAGS)}")
        include = meta["include"]
        if not isinstance(include, Sequence) or isinstance(include, str) or not include:
            raise GenEvalMetadataError(f"{where}.include={include!r}: give a non-empty list of clauses "
                                       "{'class': ..., 'count': ...}")
        clauses = tuple(_clause(c, f"{where}.include[{i}]", i, classes) for i, c in enumerate(include))
        exclude = meta.get("exclude") or []
        if not isinstance(exclude, Sequence) or isinstance(exclude, str):
            raise GenEvalMetadataError(f"{where}.exclude={exclude!r}: give a list of clauses {{'class': ..., "
                                       "'count': ...}")
        excludes = tuple(_exclude(c, f"{where}.exclude[{i}]", classes) for i, c in enumerate(exclude))
        return cls(tag, clauses, excludes)

    def to_metadata(self) -> dict[str, Any]:
        """The row in GenEval's format (``prompt`` not included)."""
        include = []
        for c in self.include:
            clause: dict[str, Any] = {"class": c.cls, "count": c.count}
            if c.color is not None:
                clause["color"] = c.color
            if c.position is not None:
                clause["position"] = list(c.position)
            include.append(clause)
        row: dict[str, Any] = {"tag": self.tag, "include": include}
        if self.exclude:
            row["exclude"] = [{"class": e.cls, "count": e.count} for e in self.exclude]
        return row


def _class_name(value: Any, where: str, classes: Collection[str]) -> str:
    if isinstance(value, str) and value in classes:
        return value
    if isinstance(value, str) and COCO_RENAMES.get(value) in classes:
        hint = f" GenEval calls it {COCO_RENAMES[value]!r}."
    else:
        close = difflib.get_close_matches(str(value), list(classes), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    known = "GenEval's 80 object names" if set(classes) == set(OBJECT_NAMES) else f"the {len(classes)} classes " \
        "the detector knows"
    raise GenEvalMetadataError(f"{where}.class={value!r} is not one of {known}.{hint} Use a name from "
                               "alignkit.rewards.geneval_rules.OBJECT_NAMES (or a detector that knows the class)")


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GenEvalMetadataError(f"{where}.count={value!r}: give a whole number >= 1")
    return value


def _clause(raw: Any, where: str, index: int, classes: Collection[str]) -> Clause:
    if not isinstance(raw, Mapping):
        raise GenEvalMetadataError(f"{where}={raw!r} is not a mapping; write {{'class': ..., 'count': ...}}")
    unknown = sorted(set(raw) - set(_CLAUSE_KEYS))
    if unknown:
        raise GenEvalMetadataError(f"{where} has unknown keys {unknown}; a clause has {', '.join(_CLAUSE_KEYS)}")
    for key in ("class", "count"):
        if key not in raw:
            raise GenEvalMetadataError(f"{where} has no {key!r}; every clause names a class and a count")
    color = raw.get("color")
    if color is not None and color not in COLORS:
        raise GenEvalMetadataError(f"{where}.color={color!r}: use one of {', '.join(COLORS)}")
    position = raw.get("position")
    if position is not None:
        if isinstance(position, str) or not isinstance(position, Sequence) or len(position) != 2:
            raise GenEvalMetadataError(f"{where}.position={position!r}: write [relation, index], e.g. ['above', 0]")
        relation, target = position
        if relation not in RELATIONS:
            raise GenEvalMetadataError(f"{where}.position[0]={relation!r}: use one of {', '.join(RELATIONS)}")
        if index == 0:
            raise GenEvalMetadataError(f"{where}.position={list(position)!r}: the first clause has no earlier clause "
                                       "to stand against; list the reference object first (GenEval's order)")
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < index:
            raise GenEvalMetadataError(f"{where}.position[1]={target!r}: give the index of an earlier include "
                                       f"clause (0..{index - 1})")
        position = (relation, target)
    return Clause(_class_name(raw["class"], where, classes), _count(raw["count"], where), color, position)


def _exclude(raw: Any, where: str, classes: Collection[str]) -> ExcludeClause:
    if not isinstance(raw, Mapping) or "class" not in raw or "count" not in raw:
        raise GenEvalMetadataError(f"{where}={raw!r}: write {{'class': ..., 'count': ...}}")
    unknown = sorted(set(raw) - {"class", "count"})
    if unknown:
        raise GenEvalMetadataError(f"{where} has unknown keys {unknown}; an exclude clause has class and count")
    return ExcludeClause(_class_name(raw["class"], where, classes), _count(raw["count"], where))


def parse_rows(metadata: Sequence[Any] | None, n: int, classes: Collection[str] = OBJECT_NAMES) -> list[GenEvalRow]:
    """Validate ``n`` metadata rows (``metadata[i]``) at once, before any model runs.

    Raises:
        GenEvalMetadataError: the first bad row, named.
    """
    if metadata is None or len(metadata) != n:
        got = "no metadata" if metadata is None else f"{len(metadata)} metadata rows"
        raise GenEvalMetadataError(f"GenEval got {n} samples and {got}; {_METADATA_FIX}")
    return [GenEvalRow.from_metadata(m, f"metadata[{i}]", classes) for i, m in enumerate(metadata)]


@dataclass(frozen=True)
class GenEvalConfig:
    """GenEval's settings (its defaults; the reward server hard-codes the same values)."""

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_per_class: int = 16
    max_overlap: float = 1.0
    position_threshold: float = 0.1

    def __post_init__(self) -> None:
        for name in ("threshold", "counting_threshold"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name}={value}: a detection score threshold in [0, 1) (GenEval: 0.3, counting 0.9)")
        if isinstance(self.max_per_class, bool) or not isinstance(self.max_per_class, int) or self.max_per_class < 1:
            raise ValueError(f"max_per_class={self.max_per_class!r}: a whole number >= 1 (GenEval: 16)")
        if not 0 < self.max_overlap <= 1:
            raise ValueError(f"max_overlap={self.max_overlap}: an IoU in (0, 1]; 1 turns suppression off (GenEval)")
        if not 0 <= self.position_threshold < 0.5:
            raise ValueError(f"position_threshold={self.position_threshold}: in [0, 0.5) (GenEval: 0.1)")

    def threshold_for(self, tag: str) -> float:
        """The score a detection must exceed in a row with ``tag``."""
        return self.counting_threshold if tag == "counting" else self.threshold


def box_iou(a: Box, b: Box) -> float:
    """IoU with inclusive pixel extents (side ``x2 - x1 + 1``), as GenEval's suppression computes it."""

    def area(x1: float, y1: float, x2: float, y2: float) -> float:
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)

    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a) + area(*b) - inter
    return inter / union if union else 0.0


def kept_indices(detections: Sequence[Detection], tag: str, config: GenEvalConfig) -> dict[str, list[int]]:
    """Per class, the indices into ``detections`` GenEval keeps, best first (see the module docstring)."""
    threshold = config.threshold_for(tag)
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(detections):
        if d.score > threshold:
            by_class[d.label].append(i)
    kept = {}
    for label, idx in by_class.items():
        order = sorted(idx, key=lambda i: -detections[i].score)[: config.max_per_class]
        chosen: list[int] = []
        while order:
            best = order.pop(0)
            chosen.append(best)
            if config.max_overlap < 1:
                order = [i for i in order if box_iou(detections[best].box, detections[i].box) < config.max_overlap]
        kept[label] = chosen
    return kept


def colors_needed(detections: Sequence[Detection], row: GenEvalRow, config: GenEvalConfig) -> list[int]:
    """Indices of the detections whose colour the verdicts read: the ``count`` best kept detections of each
    clause with a colour (GenEval reads those; the server reads all ``n`` only when ``n == count``, the same ones)."""
    kept = kept_indices(detections, row.tag, config)
    needed: set[int] = set()
    for clause in row.include:
        found = kept.get(clause.cls, [])
        if clause.color is not None and len(found) >= clause.count:
            needed.update(found[: clause.count])
    return sorted(needed)


def relations(a: Box, b: Box, threshold: float = 0.1) -> frozenset[str]:
    """The relations of box ``a`` to box ``b`` (``"left of"``: a is left of b), GenEval's rule."""
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    extent_a = np.abs([a[2] - a[0], a[3] - a[1]])
    extent_b = np.abs([b[2] - b[0], b[3] - b[1]])
    offset = ca - cb
    shrunk = np.maximum(np.abs(offset) - threshold * (extent_a + extent_b), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return frozenset()
    dx, dy = shrunk / np.linalg.norm(offset)
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return frozenset(out)


@dataclass(frozen=True)
class Verdict:
    """GenEval's verdicts on one image.

    Attributes:
        correct: GenEval's per-image correctness (the benchmark number).
        strict: the reward server's ``strict_rewards`` (exact counts).
        score: the reward server's partial credit ``scores``, Flow-GRPO's training reward (at most 1).
        terms: the partial-credit terms whose mean is ``score``.
        reasons: why ``correct`` is false (empty when it is true).
    """

    correct: bool
    strict: bool
    score: float
    terms: tuple[float, ...]
    reasons: tuple[str, ...]


def _color_of(detections: Sequence[Detection], i: int) -> str:
    color = detections[i].color
    if color is None:
        d = detections[i]
        raise ValueError(f"detection {i} ({d.label} {d.score:.3f}) has no colour; classify the detections listed "
                         "by colors_needed() before judging")
    return color


def _pairs_hold(found: Sequence[int], targets: Sequence[int], relation: str, detections: Sequence[Detection],
                threshold: float) -> tuple[bool, str]:
    for a in found:
        for b in targets:
            held = relations(detections[a].box, detections[b].box, threshold)
            if relation not in held:
                return False, f"expected {detections[a].label} {relation} {detections[b].label}, found " \
                              f"{' and '.join(sorted(held)) or 'no relation'}"
    return True, ""


def _geneval_correct(detections: Sequence[Detection], kept: Mapping[str, list[int]], row: GenEvalRow,
                     threshold: float) -> tuple[bool, list[str]]:
    reasons: list[str] = []
    groups: list[list[int] | None] = []
    for clause in row.include:
        found = kept.get(clause.cls, [])[: clause.count]
        ok = True
        if len(found) < clause.count:
            ok = False
            reasons.append(f"expected {clause.cls}>={clause.count}, found {len(found)}")
        else:
            if clause.color is not None:
                colors = [_color_of(detections, i) for i in found]
                if colors.count(clause.color) < clause.count:
                    ok = False
                    reasons.append(f"expected {clause.color} {clause.cls}>={clause.count}, found "
                                   f"{colors.count(clause.color)} {clause.color}; and {', '.join(colors)}")
            if clause.position is not None and ok:
                relation, target = clause.position
                if groups[target] is None:
                    ok = False
                    reasons.append(f"no target for {clause.cls} to be {relation}")
                else:
                    ok, why = _pairs_hold(found, groups[target], relation, detections, threshold)
                    if not ok:
                        reasons.append(why)
        groups.append(found if ok else None)
    for ex in row.exclude:
        n = len(kept.get(ex.cls, []))
        if n >= ex.count:
            reasons.append(f"expected {ex.cls}<{ex.count}, found {n}")
    return not reasons, reasons


def _server_score(detections: Sequence[Detection], kept: Mapping[str, list[int]], row: GenEvalRow,
                  threshold: float) -> tuple[bool, list[float]]:
    terms: list[float] = []
    strict = True
    groups: list[list[int] | None] = []
    for clause in row.include:
        found = kept.get(clause.cls, [])
        n, c = len(found), clause.count
        terms.append(1 - abs(c - n) / c)
        ok = True
        if n != c:
            ok = False
            if clause.color is not None or clause.position is not None:
                terms.append(0.0)
        else:
            if clause.color is not None:
                k = sum(_color_of(detections, i) == clause.color for i in found)
                terms.append(k / c)
                ok = k == c
            if clause.position is not None and ok:
                relation, target = clause.position
                if groups[target] is None:
                    ok = False
                    terms.append(0.0)
                else:
                    ok, _ = _pairs_hold(found, groups[target], relation, detections, threshold)
                    if not ok:
                        terms.append(0.0)
                    terms.append(1.0)  # the server appends 1 after the pair check, passed or not
        groups.append(found if ok else None)
        strict = strict and ok
    return strict, terms


def judge(detections: Sequence[Detection], row: GenEvalRow, config: GenEvalConfig | None = None) -> Verdict:
    """GenEval's verdicts on one image from its detections (colours set on :func:`colors_needed`'s detections).

    Pure and deterministic: the same detections give the same verdict.

    Raises:
        ValueError: a detection whose colour the verdict needs has ``color=None``.
    """
    config = config or GenEvalConfig()
    kept = kept_indices(detections, row.tag, config)
    correct, reasons = _geneval_correct(detections, kept, row, config.position_threshold)
    strict, terms = _server_score(detections, kept, row, config.position_threshold)
    score = sum(terms) / len(terms) if terms else 0.0
    return Verdict(correct, strict, score, tuple(terms), tuple(reasons))


@dataclass(frozen=True)
class Summary:
    """GenEval's summary of per-image verdicts.

    Attributes:
        tasks: tag -> fraction of that task's images that are correct.
        overall: the unweighted mean of ``tasks`` (GenEval's headline "Overall").
        images: fraction of all images that are correct.
        prompts: fraction of prompts with at least one correct image (``None`` without prompts).
    """

    tasks: dict[str, float]
    overall: float
    images: float
    prompts: float | None


def summarize(tags: Sequence[str], correct: Sequence[bool | float], prompts: Sequence[str] | None = None) -> Summary:
    """GenEval's ``summary_scores.py``: per-task accuracy and their unweighted mean.

    Args:
        tags: each image's task tag.
        correct: each image's correctness (``Verdict.correct``, or 0/1).
        prompts: each image's prompt, for the fraction of prompts with a correct image.
    """
    if len(tags) != len(correct) or (prompts is not None and len(prompts) != len(tags)) or not tags:
        raise ValueError(f"summarize needs one tag and one verdict per image (and one prompt when given); got "
                         f"{len(tags)} tags, {len(correct)} verdicts, {None if prompts is None else len(prompts)} "
                         "prompts")
    per_task: dict[str, list[float]] = defaultdict(list)
    for tag, ok in zip(tags, correct):
        per_task[tag].append(float(ok))
    tasks = {tag: sum(v) / len(v) for tag, v in sorted(per_task.items(), key=lambda kv: _tag_order(kv[0]))}
    by_prompt: dict[str, bool] = {}
    for p, ok in zip(prompts or [], correct):
        by_prompt[p] = by_prompt.get(p, False) or bool(ok)
    return Summary(
        tasks=tasks,
        overall=math.fsum(tasks.values()) / len(tasks),
        images=math.fsum(float(c) for c in correct) / len(correct),
        prompts=sum(by_prompt.values()) / len(by_prompt) if prompts is not None else None,
    )


def _tag_order(tag: str) -> int:
    return TAGS.index(tag) if tag in TAGS else len(TAGS)
