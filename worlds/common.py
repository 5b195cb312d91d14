"""What the worlds share: the check of a shipped pretrained folder, the train / held-out caption split and the
prompt sets drawn from it."""

from __future__ import annotations

import functools
import hashlib
import logging
import random
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.config import PromptsConfig
from alignkit.prompts import PromptSet

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "heldout")
HELDOUT_MODULUS = 5
"""A caption is held out when ``sha256(caption) % HELDOUT_MODULUS == 0`` (about 20%)."""


_OPTIONS = ("train_size", "eval_size", "seed", "categories", "eval_split")
EVAL_SPLITS = ("validation", "test")
"""Values of ``prompts.options.eval_split``: the held-out prompts choices are made on (``validation``, the default)
and the ones results are reported on (``test``)."""
TEST_EXCLUDED_SEEDS = (0,)
TEST_EXCLUDED_FIRST = 96
"""The ``test`` split leaves out every caption among the first :data:`TEST_EXCLUDED_FIRST` prompts of the validation
draw of each seed in :data:`TEST_EXCLUDED_SEEDS` (all categories, and the chosen ones), and of the run's own seed
(at least its ``eval_size``): every past choice (recipes, learning rates, epochs, schedules) was made on validation
draws of seed 0 with 64 or 96 prompts."""
TEST_DRAWS_PER_PROMPT = 50
"""The ``test`` draw keeps distinct captions only (a repeated caption is not a new unit of evidence): it draws up to
this many specs per prompt to find them."""


MAX_REJECTED_IN_A_ROW = 10_000
""":func:`draw_split` gives up after this many rejected draws in a row (a split with nothing left: a split that has
captions accepts a draw with probability of a few percent at least, so 10,000 rejections in a row do not happen)."""


@functools.lru_cache(maxsize=4096)
def split_of(caption: str) -> str:
    """``"heldout"`` or ``"train"``: the split a caption belongs to (deterministic hash rule)."""
    digest = int(hashlib.sha256(caption.encode("utf-8")).hexdigest(), 16)
    return "heldout" if digest % HELDOUT_MODULUS == 0 else "train"


def draw_split(n: int, seed: int, split: str, sample: Callable[[random.Random], Any],
               exclude: Collection[str] = frozenset()) -> list[Any]:
    """``n`` specs ``sample(rng)`` from ``random.Random(seed)`` whose caption falls in ``split`` (or ``"all"``) and
    is not in ``exclude`` (with no exclusion, the same list as before the option existed).

    Shared by the worlds' prompt sets: a spec is anything with a ``caption()``.

    Raises:
        ValueError: an unknown split, or no caption of the split left outside ``exclude``
            (:data:`MAX_REJECTED_IN_A_ROW` draws in a row found none).
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split={split!r} is unknown; use one of {(*SPLITS, 'all')}")
    rng = random.Random(seed)
    out: list[Any] = []
    draws = rejected = 0
    while len(out) < n:
        spec = sample(rng)
        draws += 1
        caption = spec.caption()
        if (split == "all" or split_of(caption) == split) and caption not in exclude:
            out.append(spec)
            rejected = 0
        else:
            rejected += 1
            if rejected >= MAX_REJECTED_IN_A_ROW:
                raise ValueError(f"found {len(out)} of {n} {split} captions in {draws} draws outside the "
                                 f"{len(exclude)} excluded ones")
    return out


def shipped_folder(folder: Path, marker: str, what: str, command: str) -> Path:
    """A pretrained model folder shipped inside the package, checked for its ``marker`` file.

    Raises:
        FileNotFoundError: naming ``what`` is missing and the pretraining ``command`` that rebuilds it.
    """
    if not (folder / marker).is_file():
        raise FileNotFoundError(f"the {what} is missing from {folder}; rebuild it with `{command}`")
    return folder


def test_seed(seed: int) -> int:
    """The seed of the ``test`` draw for ``prompts.options.seed``: a stream of its own (SHA-256 of a label), so it
    never coincides with a validation draw's seed."""
    return int.from_bytes(hashlib.sha256(f"alignkit test split {seed}".encode()).digest()[:8], "big")


def validation_captions(draw: Callable[..., Sequence[Any]], seed: int, eval_size: int,
                        categories: Sequence[str] | None) -> set[str]:
    """The captions the ``test`` split leaves out (see :data:`TEST_EXCLUDED_FIRST`)."""
    out: set[str] = set()
    draws = [(s, TEST_EXCLUDED_FIRST) for s in TEST_EXCLUDED_SEEDS] + [(seed, max(TEST_EXCLUDED_FIRST, eval_size))]
    for cats in {None, tuple(categories) if categories is not None else None}:
        for s, n in draws:
            out |= {spec.caption() for spec in draw(n, s, "heldout", categories=list(cats) if cats else None)}
    return out


def split_prompt_sets(
    cfg: PromptsConfig, source: str, draw: Callable[..., Sequence[Any]], categories_all: Sequence[str],
    default_eval_size: int,
) -> tuple[PromptSet, PromptSet]:
    """Train / held-out prompt sets drawn by ``draw(n, seed, split, categories=..., exclude=...)`` from a world.

    The held-out set is the ``validation`` draw (``prompts.options.eval_split``, the default: ``draw(eval_size,
    seed, "heldout")``) or the ``test`` draw: distinct held-out captions from another random stream
    (:func:`test_seed`), none of them in the validation draws (:func:`validation_captions`). Shared by every world;
    ``source`` names the prompt source in error messages.

    Raises:
        ValueError: an unknown option, unknown categories or ``eval_split``, or too few captions left for ``test``.
    """
    opts = dict(cfg.options)
    unknown = sorted(set(opts) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"prompts.options has unknown keys {unknown} for source {source!r}; valid: "
                         f"{', '.join(_OPTIONS)}")
    categories = opts.get("categories")
    if categories is not None and not set(categories) <= set(categories_all):
        raise ValueError(f"prompts.options.categories={categories}: choose from {list(categories_all)}")
    eval_split = opts.get("eval_split", "validation")
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"prompts.options.eval_split={eval_split!r} is not a held-out split; use validation (the "
                         "prompts choices are made on, the default) or test (for reported results)")
    seed = int(opts.get("seed", 0))
    eval_size = int(opts.get("eval_size", default_eval_size))

    def make(specs: Sequence[Any]) -> PromptSet:
        return PromptSet([s.caption() for s in specs], [s.to_metadata() for s in specs])

    train = make(draw(int(opts.get("train_size", 512)), seed, "train", categories=categories))
    if eval_split == "validation":
        return train, make(draw(eval_size, seed, "heldout", categories=categories))
    exclude = frozenset(validation_captions(draw, seed, eval_size, categories))
    specs: list[Any] = []
    seen: set[str] = set()
    pool: Sequence[Any] = []
    for n in (eval_size * TEST_DRAWS_PER_PROMPT, eval_size):  # a draw without replacement refuses the larger n
        try:
            pool = draw(n, test_seed(seed), "heldout", categories=categories, exclude=exclude)
            break
        except ValueError:
            continue
    for spec in pool:
        if spec.caption() not in seen:
            seen.add(spec.caption())
            specs.append(spec)
            if len(specs) == eval_size:
                break
    if not specs:
        raise ValueError(f"prompts.options.eval_split=test: source {source!r} has no held-out caption outside the "
                         f"{len(exclude)} of its validation draws (its held-out set is too small for a separate test "
                         "split); use eval_split=validation")
    if len(specs) < eval_size:
        raise ValueError(f"prompts.options.eval_split=test: prompts.options.eval_size={eval_size} distinct test "
                         f"captions asked, {len(specs)} found (the test split of source {source!r} keeps distinct "
                         f"held-out captions outside the {len(exclude)} of the validation draws); use a "
                         f"prompts.options.eval_size of at most {len(specs)}, more prompts.options.categories or "
                         "eval_split=validation")
    return train, make(specs)


def as_spec(item: Any, index: int, spec_type: type, world: str) -> Any:
    """``item`` if it is a ``spec_type``, else the spec its metadata dict describes (``spec_type.from_metadata``).

    Raises:
        ValueError: ``metadata[index]`` is not a ``world`` spec.
    """
    if isinstance(item, spec_type):
        return item
    try:
        return spec_type.from_metadata(dict(item))
    except ValueError as exc:
        raise ValueError(f"metadata[{index}] is not a {world} spec: {exc}") from exc


def spec_of_sample(prompt: str, metadata: Mapping[str, Any] | None, spec_type: type,
                   parse: Callable[[str], Any]) -> Any:
    """The spec of one sample: from its metadata when that carries one (a ``"category"`` or ``"objects"``
    key, as ``spec_type.to_metadata`` writes), else ``parse(prompt)`` (None when the caption is not one)."""
    if metadata and ("category" in metadata or "objects" in metadata):
        return spec_type.from_metadata(dict(metadata))
    return parse(prompt)


def score_by_spec(
    samples: torch.Tensor | np.ndarray,
    prompts: Sequence[str],
    metadata: Sequence[Mapping[str, Any]],
    resolve: Callable[[str, Mapping[str, Any] | None], Any],
    details: Callable[[Any, list[Any]], list[dict[str, Any]]],
    mode: str,
    world: str,
) -> list[float | None]:
    """The ``mode`` score of each sample whose spec ``resolve(prompt, metadata)`` finds; None for the others.

    Shared by the programmatic world rewards: ``details(samples[rows], specs)`` evaluates the samples that
    have a spec (``world`` names the world in the debug log).
    """
    metadata = list(metadata) or [{} for _ in prompts]
    if len(metadata) != len(prompts) or len(samples) != len(prompts):
        raise ValueError(f"{len(samples)} samples, {len(prompts)} prompts and {len(metadata)} metadata rows; "
                         "give one of each per sample")
    specs = [resolve(p, m) for p, m in zip(prompts, metadata)]
    rows = [i for i, spec in enumerate(specs) if spec is not None]
    scores: list[float | None] = [None] * len(specs)
    if len(rows) < len(specs):
        logger.debug("%d of %d samples have no %s spec", len(specs) - len(rows), len(specs), world)
    if rows:
        chosen = samples[rows] if isinstance(samples, torch.Tensor) else np.asarray(samples)[rows]
        for i, d in zip(rows, details(chosen, [specs[i] for i in rows])):
            scores[i] = d[mode]
    return scores
