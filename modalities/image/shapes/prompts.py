"""Shapes-world prompt source: ``prompts.source=shapes``.

Training prompts come from the world's training split and evaluation prompts from its held-out split;
each carries its :class:`~modalities.image.shapes.world.PromptSpec` as metadata for ShapeEval. Options
(``prompts.options``): ``train_size`` / ``eval_size`` (prompt counts), ``seed``, ``categories`` (a subset
of ``single``, ``count``, ``two_object``, ``position``).
"""

from __future__ import annotations

from alignkit.config import PromptsConfig
from alignkit.prompts import PromptSet
from modalities.image.shapes.world import CATEGORIES, prompt_set


def shapes_source(cfg: PromptsConfig) -> tuple[PromptSet, PromptSet]:
    opts = dict(cfg.options)
    unknown = sorted(set(opts) - {"train_size", "eval_size", "seed", "categories"})
    if unknown:
        raise ValueError(f"prompts.options has unknown keys {unknown} for source 'shapes'; valid: train_size, "
                         "eval_size, seed, categories")
    categories = opts.get("categories")
    if categories is not None and not set(categories) <= set(CATEGORIES):
        raise ValueError(f"prompts.options.categories={categories}: choose from {list(CATEGORIES)}")
    seed = int(opts.get("seed", 0))

    def make(n: int, split: str) -> PromptSet:
        specs = prompt_set(n, seed, split, categories=categories)
        return PromptSet([s.caption() for s in specs], [s.to_metadata() for s in specs])

    return make(int(opts.get("train_size", 512)), "train"), make(int(opts.get("eval_size", 64)), "heldout")
