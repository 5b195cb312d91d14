"""Moving-shapes prompt source: ``prompts.source=shapes_video``.

Training prompts come from the world's training split and evaluation prompts from its held-out split;
each carries its :class:`~alignkit.worlds.moving_shapes.world.MotionSpec` as metadata for MotionEval. Options
(``prompts.options``): ``train_size`` / ``eval_size`` (prompt counts), ``seed``, ``categories`` (a subset
of ``single``, ``two_object``). The number of frames is the sampler's setting, not the prompts'.
"""

from __future__ import annotations

from alignkit.config import PromptsConfig
from alignkit.prompts import PromptSet
from alignkit.worlds.common import split_prompt_sets
from alignkit.worlds.moving_shapes.world import CATEGORIES, prompt_set


def shapes_video(cfg: PromptsConfig) -> tuple[PromptSet, PromptSet]:
    """``(train, heldout)`` prompt sets of the moving-shapes world, with metadata."""
    return split_prompt_sets(cfg, "shapes_video", prompt_set, CATEGORIES, default_eval_size=64)
