"""What the worlds share: the check of a shipped pretrained folder and the train / held-out prompt split."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from alignkit.config import PromptsConfig
from alignkit.prompts import PromptSet

_OPTIONS = ("train_size", "eval_size", "seed", "categories")


def shipped_folder(folder: Path, marker: str, what: str, command: str) -> Path:
    """A pretrained model folder shipped inside the package, checked for its ``marker`` file.

    Raises:
        FileNotFoundError: naming ``what`` is missing and the pretraining ``command`` that rebuilds it.
    """
    if not (folder / marker).is_file():
        raise FileNotFoundError(f"the {what} is missing from {folder}; rebuild it with `{command}`")
    return folder


def split_prompt_sets(
    cfg: PromptsConfig, source: str, draw: Callable[..., Sequence[Any]], categories_all: Sequence[str],
    default_eval_size: int,
) -> tuple[PromptSet, PromptSet]:
    """Train / held-out prompt sets drawn by ``draw(n, seed, split, categories=...)`` from a world.

    Shared by every world; ``source`` names the prompt source in error messages.
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
