"""GenEval-style prompts with GenEval metadata: ``prompts.source=geneval``.

Rows are drawn the way GenEval's ``prompts/create_prompts.py`` draws them (numpy ``Generator``, the same calls in
the same order), with its wording: "a"/"an" by the first letter of the next word ("an orange cow", "an umbrella"),
plurals by adding "es" after a final "s" and "s" otherwise ("buses", "benchs", "sheeps"), counts as words (two to
four, uniform), no colour with "person", two different classes in two_object / position / color_attr and two
different colours in color_attr. Templates: "a photo of {a X}", "a photo of {a X} and {a Y}", "a photo of {N}
{Xs}", "a photo of {a colour} {X}", "a photo of {a A} {relation} {a B}", "a photo of {a c1} {X} and {a c2} {Y}".
Metadata rows are GenEval's (:mod:`alignkit.rewards.geneval_rules`): ``tag``, ``include``, ``exclude`` for
counting; a position prompt "A rel B" lists B first and A with ``position: [rel, 0]``.

:func:`benchmark_rows` regenerates GenEval's own 553-prompt evaluation file (seed 43, 100 draws per task, exact
duplicates dropped: 80 / 99 / 80 / 94 / 100 / 100 prompts per task).

Splits: a prompt belongs to the held-out split when the SHA-256 of its text is divisible by
:data:`HELDOUT_MODULUS`, else to the training split, so training and held-out prompts never overlap whatever the
seeds and counts. Options (``prompts.options``):

* ``seed`` (0): seed of the draws; each tag draws from its own stream, so changing one tag's count leaves the
  other tags' prompts unchanged.
* ``tags`` (all six): the tasks to draw. (``null`` for ``tags``, ``counts`` or ``eval_counts`` means the default.)
* ``counts``: distinct training prompts per tag, an int for every tag or ``{tag: n}`` over
  :data:`DEFAULT_COUNTS`.
* ``eval``: ``heldout`` (default; ``eval_counts`` prompts per tag, over :data:`DEFAULT_EVAL_COUNTS`, from the
  held-out split) or ``benchmark`` (GenEval's 553 prompts, for the tags selected; the training draws then skip
  every benchmark prompt instead of the held-out split, so single_object, whose 80 prompts are all in the
  benchmark, defaults to 0 training prompts).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alignkit.config import PromptsConfig
from alignkit.prompts import PromptSet
from alignkit.rewards.geneval_rules import COLORS, OBJECT_NAMES, RELATIONS, TAGS

logger = logging.getLogger(__name__)

HELDOUT_MODULUS = 5
"""One prompt in five (by hash) is held out."""

DEFAULT_COUNTS: dict[str, int] = {"single_object": 48, "two_object": 2000, "counting": 150, "colors": 500,
                                  "position": 2000, "color_attr": 2000}
"""Training prompts per tag (single_object, counting and colors have 80, 240 and 790 prompts in all)."""

DEFAULT_EVAL_COUNTS: dict[str, int] = {"single_object": 12, "two_object": 100, "counting": 40, "colors": 100,
                                       "position": 100, "color_attr": 100}
"""Held-out prompts per tag with ``eval=heldout``."""

BENCHMARK_SEED = 43
"""The seed of GenEval's released ``evaluation_metadata.jsonl``."""

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                                 "ten")
_OPTIONS = ("seed", "tags", "counts", "eval", "eval_counts")
_EVAL_MODES = ("heldout", "benchmark")
_PERSON = OBJECT_NAMES.index("person")


def with_article(word: str) -> str:
    """GenEval's article rule: "an" before a vowel letter, else "a"."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def plural(name: str) -> str:
    """GenEval's plural rule: "es" after a final "s", else "s" (so "benchs", "sheeps")."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def _row(tag: str, include: list[dict[str, Any]], prompt: str, exclude: list[dict[str, Any]] | None = None
         ) -> dict[str, Any]:
    """A row with GenEval's key order (tag, include, exclude, prompt)."""
    out: dict[str, Any] = {"tag": tag, "include": include}
    if exclude is not None:
        out["exclude"] = exclude
    out["prompt"] = prompt
    return out


def _single(index: int) -> dict[str, Any]:
    name = OBJECT_NAMES[index]
    return _row("single_object", [{"class": name, "count": 1}], f"a photo of {with_article(name)}")


def draw_single_object(rng: np.random.Generator) -> dict[str, Any]:
    return _single(int(rng.choice(len(OBJECT_NAMES))))


def draw_two_object(rng: np.random.Generator) -> dict[str, Any]:
    a, b = (OBJECT_NAMES[int(i)] for i in rng.choice(len(OBJECT_NAMES), size=2, replace=False))
    return _row("two_object", [{"class": a, "count": 1}, {"class": b, "count": 1}],
                f"a photo of {with_article(a)} and {with_article(b)}")


def draw_counting(rng: np.random.Generator) -> dict[str, Any]:
    name = OBJECT_NAMES[int(rng.choice(len(OBJECT_NAMES)))]
    n = int(rng.integers(2, 4, endpoint=True))
    return _row("counting", [{"class": name, "count": n}], f"a photo of {NUMBER_WORDS[n]} {plural(name)}",
                exclude=[{"class": name, "count": n + 1}])


def _not_person(offsets: np.ndarray) -> list[str]:
    """Object names for draws over the 79 classes other than "person" (GenEval's offset trick)."""
    return [OBJECT_NAMES[(int(i) + 1 + _PERSON) % len(OBJECT_NAMES)] for i in np.atleast_1d(offsets)]


def draw_colors(rng: np.random.Generator) -> dict[str, Any]:
    (name,) = _not_person(rng.choice(len(OBJECT_NAMES) - 1))
    color = COLORS[int(rng.choice(len(COLORS)))]
    return _row("colors", [{"class": name, "count": 1, "color": color}], f"a photo of {with_article(color)} {name}")


def draw_position(rng: np.random.Generator) -> dict[str, Any]:
    a, b = (OBJECT_NAMES[int(i)] for i in rng.choice(len(OBJECT_NAMES), size=2, replace=False))
    relation = RELATIONS[int(rng.choice(len(RELATIONS)))]
    return _row("position", [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
                f"a photo of {with_article(a)} {relation} {with_article(b)}")


def draw_color_attr(rng: np.random.Generator) -> dict[str, Any]:
    a, b = _not_person(rng.choice(len(OBJECT_NAMES) - 1, size=2, replace=False))
    ca, cb = (COLORS[int(i)] for i in rng.choice(len(COLORS), size=2, replace=False))
    return _row("color_attr", [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
                f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}")


DRAWS: dict[str, Callable[[np.random.Generator], dict[str, Any]]] = {
    "single_object": draw_single_object, "two_object": draw_two_object, "counting": draw_counting,
    "colors": draw_colors, "position": draw_position, "color_attr": draw_color_attr,
}
"""One random row of each tag, drawn as GenEval's generator draws it."""


def benchmark_rows(seed: int = BENCHMARK_SEED, n: int = 100) -> list[dict[str, Any]]:
    """GenEval's evaluation suite: every class once as single_object (in a random order), then ``n`` draws of
    each other task, exact duplicates dropped. The defaults give GenEval's released 553 rows."""
    rng = np.random.default_rng(seed)
    rows = [_single(int(i)) for i in rng.choice(len(OBJECT_NAMES), size=len(OBJECT_NAMES), replace=False)]
    for tag in TAGS[1:]:
        rows += [DRAWS[tag](rng) for _ in range(n)]
    seen: set[str] = set()
    unique = []
    for r in rows:
        key = json.dumps(r)
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


@functools.cache
def _benchmark_prompts() -> frozenset[str]:
    return frozenset(r["prompt"] for r in benchmark_rows())


def split_of(prompt: str) -> str:
    """``"heldout"`` or ``"train"``: the split of a prompt, by the hash of its text."""
    digest = int(hashlib.sha256(prompt.encode("utf-8")).hexdigest(), 16)
    return "heldout" if digest % HELDOUT_MODULUS == 0 else "train"


def draw_rows(tag: str, count: int, seed: int, keep: Callable[[str], bool], what: str) -> list[dict[str, Any]]:
    """``count`` rows of ``tag`` with distinct prompts for which ``keep(prompt)`` holds, from the tag's own stream.

    Raises:
        ValueError: fewer than ``count`` such prompts turned up (``what`` names the setting in the message).
    """
    rng = np.random.default_rng([seed, TAGS.index(tag)])
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    attempts = 0
    budget = 50 * count + 5000
    while len(rows) < count:
        if attempts == budget:
            raise ValueError(f"{what}={count}: only {len(rows)} distinct {tag} prompts of that split turned up in "
                             f"{budget} draws (single_object has 80 prompts in all, counting 240, colors 790); "
                             "lower it")
        attempts += 1
        r = DRAWS[tag](rng)
        if r["prompt"] not in seen and keep(r["prompt"]):
            seen.add(r["prompt"])
            rows.append(r)
    return rows


def to_prompt_set(rows: Sequence[Mapping[str, Any]]) -> PromptSet:
    """Rows -> prompts and their metadata (the row without ``prompt``, as a ``.jsonl`` prompt file loads)."""
    return PromptSet([r["prompt"] for r in rows], [{k: v for k, v in r.items() if k != "prompt"} for r in rows])


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write rows as GenEval's ``evaluation_metadata.jsonl`` (one JSON object per line); loadable with
    ``prompts.source=file``."""
    path = Path(path)
    path.write_text("".join(json.dumps(dict(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _counts(value: Any, tags: Sequence[str], defaults: Mapping[str, int], key: str) -> dict[str, int]:
    if value is None:
        return {t: defaults[t] for t in tags}
    if isinstance(value, int) and not isinstance(value, bool):
        value = dict.fromkeys(tags, value)
    if not isinstance(value, Mapping):
        raise ValueError(f"prompts.options.{key}={value!r}: give a count for every tag (e.g. 100) or a mapping "
                         "{tag: count}")
    unknown = sorted(set(value) - set(TAGS))
    if unknown:
        raise ValueError(f"prompts.options.{key} has unknown tags {unknown}; use {', '.join(TAGS)}")
    unselected = sorted(set(value) - set(tags))
    if unselected:
        raise ValueError(f"prompts.options.{key} gives counts for {unselected}, which prompts.options.tags={tags} "
                         "leaves out; add them to tags or drop their counts")
    out = {t: value.get(t, defaults[t]) for t in tags}
    for t, n in out.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"prompts.options.{key}.{t}={n!r}: give a whole number >= 0")
    return out


def geneval_source(cfg: PromptsConfig) -> tuple[PromptSet, PromptSet]:
    """``(train, eval)`` GenEval-style prompt sets with GenEval metadata (options in the module docstring)."""
    opts = dict(cfg.options)
    unknown = sorted(set(opts) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"prompts.options has unknown keys {unknown} for source 'geneval'; valid: "
                         f"{', '.join(_OPTIONS)}")
    seed = opts.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"prompts.options.seed={seed!r}: give an integer")
    tags = opts.get("tags")
    tags = list(TAGS) if tags is None else tags
    if isinstance(tags, str) or not isinstance(tags, Sequence) or not tags or not set(tags) <= set(TAGS):
        raise ValueError(f"prompts.options.tags={tags!r}: choose a non-empty list from {', '.join(TAGS)}")
    tags = [t for t in TAGS if t in tags]
    mode = opts.get("eval", "heldout")
    if mode not in _EVAL_MODES:
        raise ValueError(f"prompts.options.eval={mode!r}: use heldout (drawn from the held-out split) or benchmark "
                         "(GenEval's 553 prompts)")
    train_defaults = dict(DEFAULT_COUNTS)
    if mode == "benchmark":
        train_defaults["single_object"] = 0  # every single_object prompt is a benchmark prompt
        benchmark = _benchmark_prompts()

        def keep_train(prompt: str) -> bool:
            return prompt not in benchmark
    else:

        def keep_train(prompt: str) -> bool:
            return split_of(prompt) == "train"

    counts = _counts(opts.get("counts"), tags, train_defaults, "counts")
    train = [r for t in tags for r in draw_rows(t, counts[t], seed, keep_train, f"prompts.options.counts.{t}")]
    if not train:
        raise ValueError(f"prompts.options.counts={counts}: no training prompts; give some tag a count > 0")
    if mode == "benchmark":
        if opts.get("eval_counts") is not None:
            raise ValueError("prompts.options.eval_counts is for eval=heldout; eval=benchmark uses GenEval's prompts")
        evaluation = [r for r in benchmark_rows() if r["tag"] in tags]
    else:
        eval_counts = _counts(opts.get("eval_counts"), tags, DEFAULT_EVAL_COUNTS, "eval_counts")
        evaluation = [r for t in tags for r in draw_rows(t, eval_counts[t], seed + 1,
                                                         lambda p: split_of(p) == "heldout",
                                                         f"prompts.options.eval_counts.{t}")]
    if not evaluation:
        raise ValueError("prompts.options.eval_counts are all 0: give some tag a held-out count > 0")
    logger.info("GenEval prompts: %d for training (%s), %d for evaluation (%s)", len(train),
                ", ".join(f"{t} {counts[t]}" for t in tags), len(evaluation), mode)
    return to_prompt_set(train), to_prompt_set(evaluation)
