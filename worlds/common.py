"""What the worlds share: the check of a shipped pretrained folder, the train / held-out caption split and the
prompt sets drawn from it."""

from __future__ import annotations

import functools
import hashlib
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignkit.config import PromptsConfig
from alignkit.prompts import PromptSet

logger = logging.getLogger(__name__)

_OPTIONS = ("train_size", "eval_size", "seed", "categories")
SPLITS: tuple[str, ...] = ("train", "heldout")
HELDOUT_MODULUS = 5
"""A caption is held out when ``sha256(caption) % HELDOUT_MODULUS == 0`` (about 20%)."""


@functools.lru_cache(maxsize=4096)
def split_of(caption: str) -> str:
    """``"heldout"`` or ``"train"``: the split a caption belongs to (deterministic hash rule)."""
    digest = int(hashlib.sha256(caption.encode("utf-8")).hexdigest(), 16)
    return "heldout" if digest % HELDOUT_MODULUS == 0 else "train"


def draw_split(n: int, seed: int, split: str, sample: Callable[[random.Random], Any]) -> list[Any]:
    """``n`` specs ``sample(rng)`` from ``random.Random(seed)`` whose caption falls in ``split`` (or ``"all"``).

    Shared by the worlds' prompt sets: a spec is anything with a ``caption()``.
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split={split!r} is unknown; use one of {(*SPLITS, 'all')}")
    rng = random.Random(seed)
    out: list[Any] = []
    while len(out) < n:
        spec = sample(rng)
        if split == "all" or split_of(spec.caption()) == split:
            out.append(spec)
    return out


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
