"""Tones prompt source: ``prompts.source=tones``.

Training prompts come from the world's training split and evaluation prompts from its held-out split;
each carries its :class:`~alignkit.worlds.tones.world.ToneSpec` as metadata for ToneEval. Options
(``prompts.options``): ``train_size`` / ``eval_size`` (prompt counts), ``seed``, ``categories`` (a subset
of ``beep``, ``chirp``).
"""

from __future__ import annotations

from alignkit.config import PromptsConfig
from alignkit.prompts import PromptSet
from alignkit.worlds.common import split_prompt_sets
from alignkit.worlds.tones.world import CATEGORIES, prompt_set


def tones_source(cfg: PromptsConfig) -> tuple[PromptSet, PromptSet]:
    """``(train, heldout)`` prompt sets of the tones world, with metadata."""
    return split_prompt_sets(cfg, "tones", prompt_set, CATEGORIES, default_eval_size=64)
