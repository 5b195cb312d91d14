"""Prompt sources: inline lists or files (plain text, one prompt per line, or JSONL with metadata)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.config import PromptsConfig
from alignkit.registry import PROMPT_SOURCES


@dataclass
class PromptSet:
    """Prompts with per-prompt metadata (given to rewards, e.g. the objects a GenEval prompt asks for)."""

    prompts: list[str]
    metadata: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.metadata:
            self.metadata = [{} for _ in self.prompts]
        if len(self.metadata) != len(self.prompts):
            raise ValueError(f"{len(self.prompts)} prompts but {len(self.metadata)} metadata rows")

    def __len__(self) -> int:
        return len(self.prompts)

    def epoch_selection(self, count: int, generator: torch.Generator, shuffle: bool = True) -> list[int]:
        """``count`` prompt ids for one epoch: a random draw without replacement (wrapping if needed)."""
        n = len(self.prompts)
        order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
        return [order[i % n] for i in range(count)]


def read_prompt_file(path: str, field_name: str) -> PromptSet:
    """Read ``.txt`` (one prompt per line) or ``.jsonl`` (``{"prompt": ..., <metadata>}`` per line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts.{field_name}={path!r}: no such file")
    prompts: list[str] = []
    meta: list[dict[str, Any]] = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if p.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc}); each line must be an object") from exc
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: each JSONL row needs a string 'prompt' key")
            prompts.append(row.pop("prompt"))
            meta.append(row)
        else:
            prompts.append(line.strip())
            meta.append({})
    if not prompts:
        raise ValueError(f"prompts.{field_name}={path!r} holds no prompts; add one prompt per line")
    return PromptSet(prompts, meta)


@PROMPT_SOURCES.register("list")
def list_source(cfg: PromptsConfig) -> tuple[PromptSet, PromptSet]:
    train = PromptSet(list(cfg.train))
    return train, PromptSet(list(cfg.eval)) if cfg.eval else train


@PROMPT_SOURCES.register("file")
def file_source(cfg: PromptsConfig) -> tuple[PromptSet, PromptSet]:
    if not cfg.train_file:
        raise ValueError("prompts.train_file is required with prompts.source=file")
    train = read_prompt_file(cfg.train_file, "train_file")
    return train, read_prompt_file(cfg.eval_file, "eval_file") if cfg.eval_file else train


def load_prompts(cfg: PromptsConfig) -> tuple[PromptSet, PromptSet]:
    """``(train, eval)`` prompt sets from the configured source."""
    train, evaluation = PROMPT_SOURCES.get(cfg.source)(cfg)
    if len(train) == 0:
        raise ValueError("no training prompts: fill prompts.train or prompts.train_file")
    return train, evaluation
