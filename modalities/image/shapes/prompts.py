"""Shapes-world prompt source: ``prompts.source=shapes``.

Training prompts come from the world's training split and evaluation prompts from its held-out split;
each carries its :class:`~modalities.image.shapes.world.PromptSpec` as metadata for ShapeEval. Options
(``prompts.options``): ``train_size`` / ``eval_size`` (prompt counts), ``seed``, ``categories`` (a subset
of ``single``, ``count``, ``two_object``, ``position``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from alignkit.config import PromptsConfig
from alignkit.prompts import PromptSet
from modalities.image.shapes.world import CATEGORIES, prompt_set

_OPTIONS = ("train_size", "eval_size", "seed", "categories")


def shapes_source(cfg: PromptsConfig) -> tuple[PromptSet, PromptSet]:
    """``(train, heldout)`` prompt sets of the shapes world, with metadata."""
    return split_prompt_sets(cfg, "shapes", prompt_set, CATEGORIES, default_eval_size=64)


def split_prompt_sets(
    cfg: PromptsConfig, source: str, draw: Callable[..., Sequence[Any]], categories_all: Sequence[str],
    default_eval_size: int,
) -> tuple[PromptSet, PromptSet]:
    """Train / held-out prompt sets drawn by ``draw(n, seed, split, categories=...)`` from a shapes world.

    Shared by the image and video worlds; ``source`` names the prompt source in error messages.
    """
    opts = dict(cfg.options)
    unknown = sorted(set(opts) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"prompts.options has unknown keys {unknown} for source {source!r}; valid: "
                         f"{', '.join(_OPTIONS)}")
    categories = opts.get("categories")
    if categories is not None and not set(categories) <= set(categories_all):
        raise ValueError(f"prompts.options.categories={categories}: choose from {list(categories_all)}")
    seed = int(opts.get("seed", 0))

    def make(n: int, split: str) -> PromptSet:
        specs = draw(n, seed, split, categories=categories)
        return PromptSet([s.caption() for s in specs], [s.to_metadata() for s in specs])

    return (make(int(opts.get("train_size", 512)), "train"),
            make(int(opts.get("eval_size", default_eval_size)), "heldout"))
