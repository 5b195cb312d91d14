"""Moving-shapes prompt source: ``prompts.source=shapes_video``.

Training prompts come from the world's training split and evaluation prompts from its held-out split;
each carries its :class:`~modalities.video.shapes.world.MotionSpec` as metadata for MotionEval. Options
(``prompts.options``): ``train_size`` / ``eval_size`` (prompt counts), ``seed``, ``categories`` (a subset
of ``single``, ``two_object``). The number of frames is the sampler's setting, not the prompts'.
"""

from __future__ import annotations

from alignkit.config import PromptsConfig
from alignkit.prompts import PromptSet
from modalities.video.shapes.world import CATEGORIES, prompt_set

_OPTIONS = ("train_size", "eval_size", "seed", "categories")


def shapes_video(cfg: PromptsConfig) -> tuple[PromptSet, PromptSet]:
    """``(train, heldout)`` prompt sets of the moving-shapes world, with metadata."""
    opts = dict(cfg.options)
    unknown = sorted(set(opts) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"prompts.options has unknown keys {unknown} for source 'shapes_video'; valid: "
                         f"{', '.join(_OPTIONS)}")
    categories = opts.get("categories")
    if categories is not None and not set(categories) <= set(CATEGORIES):
        raise ValueError(f"prompts.options.categories={categories}: choose from {list(CATEGORIES)}")
    seed = int(opts.get("seed", 0))

    def make(n: int, split: str) -> PromptSet:
        specs = prompt_set(n, seed, split, categories=categories)
        return PromptSet([s.caption() for s in specs], [s.to_metadata() for s in specs])

    return make(int(opts.get("train_size", 512)), "train"), make(int(opts.get("eval_size", 64)), "heldout")
