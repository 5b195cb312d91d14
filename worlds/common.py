"""What the worlds share: the check of a shipped pretrained folder and the train / held-out prompt split."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignkit.config import PromptsConfig
from alignkit.prompts import PromptSet

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
    if len(specs) < eval_size:
        raise ValueError(f"prompts.options.eval_split=test: prompts.options.eval_size={eval_size} distinct test "
                         f"captions asked, {len(specs)} found (the test split of source {source!r} keeps distinct "
                         f"held-out captions outside the {len(exclude)} of the validation draws); use a "
                         f"prompts.options.eval_size of at most {len(specs)}, more prompts.options.categories or "
                         "eval_split=validation")
    return train, make(specs)
