"""Prompt sources: inline lists, files (plain text, one prompt per line; JSONL or JSON with metadata) and Hugging Face
``datasets`` datasets (:func:`hf_source`, the ``data`` extra)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.config import PromptsConfig, left_to_user
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
    """Read a prompt file named by setting ``prompts.<field_name>`` (or by ``field_name`` itself when it is a dotted
    setting such as ``eval.prompts``).

    ``.txt`` (or any other suffix): one prompt per line. ``.jsonl``: one object per line with a string
    ``prompt`` and optional metadata. ``.json``: an array of strings, or of such objects. UTF-8, with or
    without a byte-order mark. Blank lines after the last prompt are ignored; a blank line before it, an
    empty prompt or any other content is refused with its line (or item) number.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the content is not what the suffix promises; the message names the setting, the file,
            the line and the fix.
    """
    setting = f"{field_name if '.' in field_name else f'prompts.{field_name}'}={path!r}"
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
    for key, fallback in (("train_file", ""), ("eval_file", ", or prompts.eval_file=null to evaluate on the training "
                                                              "prompts")):
        if left_to_user(getattr(cfg, key)):
            raise ValueError(f"prompts.{key} is required: the recipe leaves it for you to give (its first comment "
                             f"lines say which file); set prompts.{key}=path/to/prompts.txt (one prompt per line) or a "
                             f".jsonl file with a 'prompt' key per row{fallback}")
    train = read_prompt_file(cfg.train_file, "train_file")
    return train, read_prompt_file(cfg.eval_file, "eval_file") if cfg.eval_file else train


# --- Hugging Face datasets ------------------------------------------------------------------------------------

HF_OPTIONS: dict[str, Any] = {"path": None, "name": None, "split": None, "eval_split": None, "column": "prompt",
                              "metadata_columns": [], "revision": None}
"""``prompts.options`` of ``source=hf`` and their defaults (see :func:`hf_source`)."""

HF_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet",
                    ".txt": "text", ".arrow": "arrow"}
"""``datasets`` builder of a single local data file, by suffix (``.txt``: one row per line, column ``text``)."""


def _hf_options(options: dict[str, Any], where: str) -> dict[str, Any]:
    """``options`` over :data:`HF_OPTIONS`, type-checked; every problem at once."""
    unknown = sorted(set(options) - set(HF_OPTIONS))
    problems = [f"{where}.{k}: unknown option of prompts.source=hf; valid: {', '.join(HF_OPTIONS)}" for k in unknown]
    opts = {**HF_OPTIONS, **options}
    if left_to_user(opts["path"]):
        problems.append(f"{where}.path is required: the recipe leaves it for you to give (its first comment lines say "
                        f"which data); set {where}.path to a dataset folder, a local data file or a hub dataset name")
    elif not isinstance(opts["path"], str) or not opts["path"].strip():
        problems.append(f"{where}.path={opts['path']!r}: required with prompts.source=hf; give a hub dataset name "
                        "(e.g. openai/gsm8k), a folder written by Dataset.save_to_disk, or a local .jsonl / .json / "
                        ".csv / .parquet / .txt file or folder of them")
    for key in ("name", "split", "eval_split", "revision"):
        if opts[key] is not None and (not isinstance(opts[key], str) or not opts[key]):
            problems.append(f"{where}.{key}={opts[key]!r}: give a name (a string) or null")
    if not isinstance(opts["column"], str) or not opts["column"]:
        problems.append(f"{where}.column={opts['column']!r}: give the name of the column holding the prompts")
    meta = opts["metadata_columns"]
    if not isinstance(meta, (list, tuple)) or not all(isinstance(c, str) and c for c in meta):
        problems.append(f"{where}.metadata_columns={meta!r}: give a list of column names, e.g. [answer]")
    if problems:
        raise ValueError("; ".join(problems))
    return opts


def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def load_hf_dataset(opts: dict[str, Any], where: str) -> Any:
    """The ``datasets`` object ``opts["path"]`` names: ``load_from_disk`` for a saved dataset folder,
    ``load_dataset(builder, data_files=file)`` for one local data file, ``load_dataset(path)`` for a folder of data
    files or a hub dataset name (``name`` and ``revision`` passed). ``datasets`` is imported only here.

    Raises:
        ImportError: ``datasets`` is not installed (the ``data`` extra).
        ValueError: the path does not exist or the dataset cannot be read; the message names ``<where>.path``.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError("prompts.source=hf needs the datasets package: pip install 'alignkit[data]' (or pip install "
                          "datasets)") from None
    path = opts["path"]
    local = Path(path).expanduser()
    setting = f"{where}.path={path!r}"
    looks_local = path.startswith((".", "/", "~")) or local.suffix in HF_FILE_BUILDERS or local.exists()
    if looks_local and not local.exists():
        raise ValueError(f"{setting}: no such file or folder; give a dataset folder (save_to_disk), a local data file "
                         f"({', '.join(HF_FILE_BUILDERS)}) or a hub dataset name")
    kwargs = {k: opts[k] for k in ("name", "revision") if opts[k] is not None}
    try:
        if local.is_dir() and _is_saved_dataset(local):
            return datasets.load_from_disk(str(local))
        if local.is_file():
            builder = HF_FILE_BUILDERS.get(local.suffix)
            if builder is None:
                raise ValueError(f"{setting}: a {local.suffix or 'suffix-less'} file is not a data file datasets "
                                 f"reads; give a {', '.join(HF_FILE_BUILDERS)} file or a save_to_disk folder")
            return datasets.load_dataset(builder, data_files=str(local), **kwargs)
        return datasets.load_dataset(str(local) if local.is_dir() else path, **kwargs)
    except ValueError as exc:
        if str(exc).startswith(setting):
            raise
        raise ValueError(f"{setting}: the dataset cannot be read ({' '.join(str(exc).split())})") from None
    except OSError as exc:  # missing files, unknown hub datasets (DatasetNotFoundError), no network
        raise ValueError(f"{setting}: the dataset cannot be loaded ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())}); check the name, or give a local folder or file") from None


def _hf_split(data: Any, split: str | None, key: str, where: str, path: str) -> Any:
    """One split of a ``DatasetDict`` (``split`` None: ``train``); a ``Dataset`` (no splits) with ``split`` None."""
    splits = list(data.keys()) if hasattr(data, "keys") else None
    if splits is None:
        if split is not None:
            raise ValueError(f"{where}.{key}={split!r}: {path!r} holds one dataset without splits; set "
                             f"{where}.{key}=null")
        return data
    name = split or "train"
    if name not in splits:
        what = f"{where}.{key}={split!r}" if split else f"{where}.{key} is unset, so 'train' is read, but"
        raise ValueError(f"{what}: {path!r} has no split {name!r}; its splits: {', '.join(splits)}; set {where}.{key} "
                         "to one of them")
    return data[name]


def hf_prompt_set(dataset: Any, opts: dict[str, Any], split_key: str, where: str) -> PromptSet:
    """Prompts of column ``opts["column"]`` with ``opts["metadata_columns"]`` as each prompt's metadata.

    Raises:
        ValueError: a column the split does not have (naming the setting, the column and the valid columns), or a
            prompt that is not a non-blank string (naming its row).
    """
    columns = list(dataset.column_names)
    label = f"{opts['path']!r}" + (f" (split {opts[split_key]!r})" if opts[split_key] else "")
    for key, names in (("column", [opts["column"]]), ("metadata_columns", list(opts["metadata_columns"]))):
        for name in names:
            if name not in columns:
                value = opts[key] if key == "column" else list(opts[key])
                raise ValueError(f"{where}.{key}={value!r}: dataset {label} has no column {name!r}; its columns: "
                                 f"{', '.join(columns)}; set {where}.{key} to "
                                 f"{'one of them' if key == 'column' else 'a list of them'}")
    prompts = dataset[opts["column"]]
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            what = "blank" if isinstance(prompt, str) else f"a {type(prompt).__name__}, not text"
            raise ValueError(f"{where}.column={opts['column']!r}: row {i} of dataset {label} is {what}; choose the "
                             "column of prompt strings or clean the dataset")
    if not prompts:
        raise ValueError(f"{where}: dataset {label} has no rows")
    meta_cols = {name: dataset[name] for name in opts["metadata_columns"] if name != opts["column"]}
    metadata = [{name: values[i] for name, values in meta_cols.items()} for i in range(len(prompts))]
    return PromptSet(list(prompts), metadata)


@PROMPT_SOURCES.register("hf")
def hf_source(cfg: PromptsConfig) -> tuple[PromptSet, PromptSet]:
    """Prompts from a Hugging Face ``datasets`` dataset (``pip install 'alignkit[data]'``; imported only here).

    ``prompts.options``:

    - ``path``: a folder written by ``save_to_disk`` (read with ``load_from_disk``); a local data file (``.jsonl``,
      ``.json``, ``.csv``, ``.parquet``, ``.txt``: column ``text``) or folder of them (``load_dataset``); or a hub
      dataset name, downloaded by ``datasets`` into its cache (e.g. ``openai/gsm8k``);
    - ``name``: the dataset configuration (``main`` for gsm8k); ``revision``: a hub revision;
    - ``split``: the training split (default ``train``; a saved single ``Dataset`` has no splits: leave it null);
    - ``eval_split``: the held-out split (default null: the training prompts);
    - ``column``: the prompt column (default ``prompt``);
    - ``metadata_columns``: columns given to the rewards as each prompt's metadata (e.g. ``[answer]``).
    """
    where = "prompts.options"
    opts = _hf_options(dict(cfg.options), where)
    data = load_hf_dataset(opts, where)
    train = hf_prompt_set(_hf_split(data, opts["split"], "split", where, opts["path"]), opts, "split", where)
    if opts["eval_split"] is None:
        return train, train
    held_out = _hf_split(data, opts["eval_split"], "eval_split", where, opts["path"])
    return train, hf_prompt_set(held_out, opts, "eval_split", where)


def load_prompts(cfg: PromptsConfig) -> tuple[PromptSet, PromptSet]:
    """``(train, eval)`` prompt sets from the configured source."""
    train, evaluation = PROMPT_SOURCES.get(cfg.source)(cfg)
    if len(train) == 0:
        raise ValueError("no training prompts: fill prompts.train or prompts.train_file")
    return train, evaluation
