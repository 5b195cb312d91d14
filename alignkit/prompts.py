"""Prompt sources: inline lists or files (plain text, one prompt per line; JSONL or JSON with metadata)."""

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
    """Read a prompt file named by setting ``prompts.<field_name>``.

    ``.txt`` (or any other suffix): one prompt per line. ``.jsonl``: one object per line with a string
    ``prompt`` and optional metadata. ``.json``: an array of strings, or of such objects. UTF-8, with or
    without a byte-order mark. Blank lines after the last prompt are ignored; a blank line before it, an
    empty prompt or any other content is refused with its line (or item) number.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the content is not what the suffix promises; the message names the setting, the file,
            the line and the fix.
    """
    setting = f"prompts.{field_name}={path!r}"
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder, not a file" if p.is_dir() else "no such file"
        raise FileNotFoundError(f"{setting}: {what}; give the path of a .txt (one prompt per line), .jsonl or "
                                ".json prompt file")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ValueError(f"{setting}: cannot be read ({exc.strerror or exc}); check its permissions") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        utf16 = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ValueError(f"{setting}: not UTF-8 text{utf16} (byte 0x{raw[exc.start]:02x} on line {line}); save the "
                         "file as UTF-8") from None
    if p.suffix == ".json":
        rows = _json_rows(text, setting)
    else:
        rows = _line_rows(text, setting, jsonl=p.suffix == ".jsonl")
    if not rows:
        how = "add prompts to its array" if p.suffix == ".json" else "add one prompt per line"
        raise ValueError(f"{setting} holds no prompts; {how}")
    return PromptSet([prompt for prompt, _ in rows], [meta for _, meta in rows])


def _row(value: Any, where: str, setting: str) -> tuple[str, dict[str, Any]]:
    """One prompt and its metadata from a string or a ``{"prompt": ..., <metadata>}`` object."""
    if isinstance(value, dict):
        meta = dict(value)
        value = meta.pop("prompt", None)
        if not isinstance(value, str):
            raise ValueError(f"{setting}: {where}: needs a string 'prompt' key (found keys: "
                             f"{', '.join(map(str, meta)) or 'none'})")
    elif isinstance(value, str):
        meta = {}
    else:
        raise ValueError(f"{setting}: {where}: expected a prompt string or an object with a 'prompt' key, got "
                         f"{type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{setting}: {where}: the prompt is blank; remove the entry or write the prompt")
    return value, meta


def _line_rows(text: str, setting: str, *, jsonl: bool) -> list[tuple[str, dict[str, Any]]]:
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines end the file; they are not prompts
    rows = []
    for lineno, line in enumerate(lines, 1):
        where = f"line {lineno}"
        if not line.strip():
            raise ValueError(f"{setting}: {where} is blank; remove it (every line is one prompt)")
        if jsonl:
            try:
                value = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{setting}: {where}: invalid JSON ({exc}); each line must be an object with a "
                                 "'prompt' key") from None
            if not isinstance(value, dict):
                raise ValueError(f"{setting}: {where}: each JSONL row needs a string 'prompt' key, got "
                                 f"{type(value).__name__}")
            rows.append(_row(value, where, setting))
        else:
            rows.append(_row(line.strip(), where, setting))
    return rows


def _json_rows(text: str, setting: str) -> list[tuple[str, dict[str, Any]]]:
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{setting}: invalid JSON ({exc}); a .json prompt file holds an array of strings or of "
                         "objects with a 'prompt' key") from None
    if not isinstance(data, list):
        raise ValueError(f"{setting}: a .json prompt file must hold an array of strings or of objects with a "
                         f"'prompt' key, got {type(data).__name__}")
    return [_row(item, f"item {i + 1}", setting) for i, item in enumerate(data)]


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
