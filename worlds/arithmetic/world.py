"""The arithmetic toy task: two-number sums and differences answered by a masked token model.

Prompts are ``"37+48="`` (category ``add``: ``0 <= a, b <= 99``) and ``"85-37="`` (category ``sub``:
``0 <= b <= a <= 99``); the answer is the decimal result (``"85"``, ``"48"``), at most 3 digits, scored by
``exact_match`` / ``numeric_match`` against ``metadata["answer"]``. A problem is held out when the SHA-256
of its prompt, read as an integer, is 0 mod 5 (about 20%); pretraining and training prompts come from the
other split only. Prompt source ``prompts.source=arithmetic`` (options ``train_size``, ``eval_size``,
``seed``, ``categories``).
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.config import PromptsConfig
from alignkit.prompts import PromptSet
from alignkit.worlds.common import shipped_folder, split_prompt_sets

CATEGORIES = ("add", "sub")
MAX_OPERAND = 99
HELDOUT_MODULUS = 5
PROMPT_LENGTH = 6  # "99+99="
ANSWER_LENGTH = 4  # up to 3 digits and at least one end token
WEIGHTS_DIR = Path(__file__).parent / "weights"
"""The shipped pretrained model folder (``save_pretrained`` layout: model, tokenizer, ``pretrain_info.json``)."""


@dataclass(frozen=True)
class Problem:
    """``a op b``; ``op`` is ``+`` (category ``add``) or ``-`` (``sub``, with ``a >= b``)."""

    a: int
    b: int
    op: str

    @property
    def category(self) -> str:
        return "add" if self.op == "+" else "sub"

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    def caption(self) -> str:
        return f"{self.a}{self.op}{self.b}="

    def to_metadata(self) -> dict[str, Any]:
        return {"answer": str(self.answer), "category": self.category}


def split_of(prompt: str) -> str:
    """``heldout`` when ``sha256(prompt) % 5 == 0``, else ``train``."""
    digest = int.from_bytes(hashlib.sha256(prompt.encode()).digest(), "big")
    return "heldout" if digest % HELDOUT_MODULUS == 0 else "train"


@functools.lru_cache(maxsize=4)
def all_problems(split: str) -> tuple[Problem, ...]:
    """Every problem of ``split`` (``train`` or ``heldout``), in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}: use 'train' or 'heldout'")
    out = []
    for a in range(MAX_OPERAND + 1):
        for b in range(MAX_OPERAND + 1):
            out.append(Problem(a, b, "+"))
            if b <= a:
                out.append(Problem(a, b, "-"))
    return tuple(p for p in out if split_of(p.caption()) == split)


def problem_set(n: int, seed: int, split: str, categories: list[str] | None = None,
                exclude: Collection[str] = frozenset()) -> list[Problem]:
    """``n`` distinct problems of ``split`` (and ``categories``) whose prompt is not in ``exclude``, a seeded draw
    without replacement."""
    pool = [p for p in all_problems(split) if (categories is None or p.category in categories)
            and p.caption() not in exclude]
    if n > len(pool):
        raise ValueError(f"prompts.options: asked for {n} {split} problems, the split has {len(pool)}; ask for fewer")
    return random.Random(seed).sample(pool, n)


def arithmetic_source(cfg: PromptsConfig) -> tuple[PromptSet, PromptSet]:
    """``(train, heldout)`` prompt sets with ``answer`` metadata (``prompts.source=arithmetic``)."""
    return split_prompt_sets(cfg, "arithmetic", problem_set, CATEGORIES, default_eval_size=256)


def shipped_weights() -> Path:
    """The pretrained arithmetic model folder shipped with the package.

    Raises:
        FileNotFoundError: naming the pretraining command when the folder is missing.
    """
    return shipped_folder(WEIGHTS_DIR, "config.json", "arithmetic model",
                          "python -m alignkit.worlds.arithmetic.pretrain")
