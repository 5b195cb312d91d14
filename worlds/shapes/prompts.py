"""Shapes-world prompt source: ``prompts.source=shapes``.

Training prompts come from the world's training split and evaluation prompts from its held-out split;
each carries its :class:`~alignkit.worlds.shapes.world.PromptSpec` as metadata for ShapeEval. Options
(``prompts.options``): ``train_size`` / ``eval_size`` (prompt counts), ``seed``, ``categories`` (a subset
of ``single``, ``count``, ``two_object``, ``position``).
"""

from __future__ import annotations

from alignkit.config import PromptsConfig
from alignkit.prompts import PromptSet
from alignkit.worlds.common import split_prompt_sets
from alignkit.worlds.shapes.world import CATEGORIES, prompt_set


def shapes_source(cfg: PromptsConfig) -> tuple[PromptSet, PromptSet]:
    """``(train, heldout)`` prompt sets of the shapes world, with metadata."""
    return split_prompt_sets(cfg, "shapes", prompt_set, CATEGORIES, default_eval_size=64)
