"""A run folder: the held-out records the trainer writes, and everything a run wrote read back for summaries,
reports (:mod:`alignkit.report`) and comparisons (:mod:`alignkit.compare`).

Layout of a run's ``output_dir``:

* ``config.yaml``, ``overrides.yaml``: the composed configuration and the command-line overrides;
* ``metrics.jsonl``: one row per epoch (row 0: the held-out evaluation before training);
* ``eval/<name>.jsonl``: one row per held-out sample of evaluation ``<name>`` (``eval_before``, ``eval_00020``,
  ``eval_after``): ``prompt_id`` (index into the held-out prompts), ``seed`` (which evaluation noise of the
  prompt), ``prompt``, ``epoch``, ``rewards`` (``{reward: score}``, null where a reward could not score),
  ``file`` (the sample's media file, relative to ``eval/``; null for text) and ``text`` (text and token samples);
* ``eval/<name>/p<prompt id>_s<seed>.png|mp4|wav``: the samples (:func:`alignkit.media.files.write_sample_files`);
* ``summary.json``: the end-of-run summary (:mod:`alignkit.summary`); ``samples/``, ``checkpoints/``, ...

Samples are paired across evaluations (and across runs) by ``(prompt_id, seed)``: the evaluation noise of a
sample depends only on ``eval.seed``, its prompt id and its seed, so the same pair is the same starting noise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.errors import RunFolderError
from alignkit.interfaces import Sampler
from alignkit.media.files import sample_text, write_sample_files
from alignkit.types import Rollout

__all__ = ["AXES", "HeldoutRecord", "RunDir", "record_samples", "write_records"]

EVAL_DIR = "eval"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"
Key = tuple[int, int]
"""A held-out sample's identity: ``(prompt id, evaluation seed)``."""

AXES: dict[str, tuple[str, str]] = {
    "epoch": ("epoch", "epoch"),
    "nfe": ("rollout/nfe_total", "rollout model evaluations (NFE)"),
    "flops": ("cost/flops_total", "total model FLOPs"),
    "time": ("time/total_s", "training seconds (rollout to update)"),
    "cpu": ("time/cpu_total_s", "process CPU seconds (rollout to update)"),
}
"""Compute axes of curves: name -> (the ``metrics.jsonl`` key holding the running total, its label)."""

NOT_EVAL_SETTINGS = ("eval.every", "eval.before_after", "eval.batch_size", "eval.checkpoint", "prompts.train",
                     "prompts.train_file", "prompts.shuffle", "prompts.options.train_size")
"""Fields of ``eval`` and ``prompts`` that do not change held-out scores (left out when runs' evaluation settings
are compared)."""
BACKBONE_SAMPLING = ("name", "pretrained", "revision", "variant", "dtype", "height", "width", "num_frames",
                     "num_steps", "guidance_scale", "negative_prompt", "max_sequence_length", "options")
"""``backbone`` fields that change what deterministic sampling of the base model produces."""


# --- writing: the held-out records ------------------------------------------------------------------------


def record_samples(sampler: Sampler, rollout: Rollout, raw: dict[str, torch.Tensor], keep: torch.Tensor,
                   prompt_ids: list[int], record: Path, epoch: int) -> list[dict[str, Any]]:
    """Write this process's kept held-out samples into the folder ``record`` and return their rows (see the
    module docstring; the caller gathers them and writes ``<record>.jsonl`` with :func:`write_records`).

    Args:
        rollout: the evaluation rollout; ``keys.prompt_index`` indexes ``prompt_ids``.
        raw: ``{reward: [S_kept]}`` scores of the kept samples.
        keep: ``[S]`` bool, the samples that are not padding.
        prompt_ids: held-out prompt id of each of the rollout's prompts.
    """
    rows_kept = torch.nonzero(keep).flatten().tolist()
    pids = [prompt_ids[int(rollout.keys.prompt_index[j])] for j in rows_kept]
    seeds = [int(rollout.keys.seed_index[j]) for j in rows_kept]
    samples = rollout.samples
    if isinstance(samples, torch.Tensor):
        samples = samples[keep.to(samples.device)]
    else:
        samples = [samples[j] for j in rows_kept]
    stems = [f"p{p:05d}_s{s}" for p, s in zip(pids, seeds, strict=True)]
    files = write_sample_files(samples, record, stems, fps=sampler.preview_fps, sample_rate=sampler.sample_rate)
    prompts = rollout.sample_prompts
    rows = []
    for i, j in enumerate(rows_kept):
        scores = {k: float(v[i]) for k, v in raw.items()}
        rows.append({
            "prompt_id": pids[i], "seed": seeds[i], "prompt": prompts[j], "epoch": epoch,
            "rewards": {k: (v if math.isfinite(v) else None) for k, v in scores.items()},
            "file": f"{record.name}/{files[i]}" if files[i] is not None else None,
            "text": sample_text(samples, i),
        })
    return rows


def write_records(record: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``<record>.jsonl`` (rows sorted by prompt id and seed), replacing it atomically."""
    path = record.with_name(record.name + ".jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (r["prompt_id"], r["seed"]))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
    return path


# --- reading ------------------------------------------------------------------------------------------------


@dataclass
class HeldoutRecord:
    """The per-sample rows of one held-out evaluation (``eval/<name>.jsonl``).

    Attributes:
        name: ``eval_before``, ``eval_<epoch>`` or ``eval_after``.
        epoch: completed epochs when it was evaluated.
        rows: one dict per sample (see the module docstring).
        folder: the run's ``eval/`` folder (``row["file"]`` is relative to it).
    """

    name: str
    epoch: int
    rows: list[dict[str, Any]]
    folder: Path

    @property
    def rewards(self) -> list[str]:
        """Reward names, in the order the evaluation scored them (training rewards first)."""
        return list(self.rows[0]["rewards"]) if self.rows else []

    @property
    def prompts(self) -> dict[int, str]:
        """Prompt id -> prompt text."""
        return {int(r["prompt_id"]): r["prompt"] for r in self.rows}

    @property
    def keys(self) -> set[Key]:
        return {(int(r["prompt_id"]), int(r["seed"])) for r in self.rows}

    def scores(self, reward: str) -> dict[Key, float | None]:
        """``(prompt id, seed) -> score`` of one reward (None where it could not score)."""
        return {(int(r["prompt_id"]), int(r["seed"])): _num(r["rewards"].get(reward)) for r in self.rows}

    def aggregate(self, weights: dict[str, float]) -> dict[Key, float | None]:
        """``(prompt id, seed) -> sum of weight x score`` over the rewards of non-zero weight; None where one
        of them could not score."""
        out: dict[Key, float | None] = {}
        for r in self.rows:
            values = [_num(r["rewards"].get(name)) for name, w in weights.items() if w != 0]
            ws = [w for w in weights.values() if w != 0]
            ok = values and all(v is not None for v in values)
            out[(int(r["prompt_id"]), int(r["seed"]))] = sum(w * v for w, v in zip(ws, values, strict=True)) \
                if ok else None
        return out

    def row(self, key: Key) -> dict[str, Any] | None:
        return next((r for r in self.rows if (int(r["prompt_id"]), int(r["seed"])) == key), None)


def _num(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass
class RunDir:
    """Everything a run folder holds, read once (:meth:`open`).

    Attributes:
        path: the run folder.
        config: the composed configuration (``config.yaml``, else the copy in ``summary.json``; None if neither).
        overrides: the command-line overrides (``overrides.yaml``).
        metrics: the rows of ``metrics.jsonl``, in order.
        records: held-out records by name, in evaluation order (``eval_before`` first).
        summary: ``summary.json`` when the run finished and wrote it.
    """

    path: Path
    config: dict[str, Any] | None
    overrides: list[str]
    metrics: list[dict[str, Any]]
    records: dict[str, HeldoutRecord] = field(default_factory=dict)
    summary: dict[str, Any] | None = None

    @classmethod
    def open(cls, path: Path | str) -> RunDir:
        """Read run folder ``path``.

        Raises:
            RunFolderError: ``path`` is not a folder, or holds neither ``config.yaml`` nor ``metrics.jsonl``
                (not a run), or one of its files cannot be read; the message names the folder or file.
        """
        from alignkit.compose import read_run_config

        path = Path(path).expanduser()
        if not path.is_dir():
            what = "is a file" if path.exists() else "does not exist"
            raise RunFolderError(f"{path} {what}: give the output_dir of a training run (alignkit train writes "
                                 "config.yaml and metrics.jsonl there)")
        metrics_file = path / METRICS_FILE
        try:
            saved = read_run_config(path)
        except ValueError as exc:
            raise RunFolderError(str(exc)) from None
        if saved is None and not metrics_file.is_file():
            raise RunFolderError(f"{path} is not an alignkit run folder: it holds neither config.yaml nor "
                                 "metrics.jsonl; give the output_dir of a training run")
        summary = _read_json(path / SUMMARY_FILE)
        config = saved.config if saved is not None else (summary or {}).get("config")
        run = cls(path=path, config=config, overrides=saved.overrides if saved is not None else [],
                  metrics=_read_jsonl(metrics_file, torn_ok=True) if metrics_file.is_file() else [],
                  summary=summary)
        run.records = run._read_records()
        return run

    def _read_records(self) -> dict[str, HeldoutRecord]:
        folder = self.path / EVAL_DIR
        found = []
        for f in sorted(folder.glob("eval_*.jsonl")) if folder.is_dir() else []:
            rows = _read_jsonl(f, torn_ok=False)
            if not rows or not all(isinstance(r, dict) and {"prompt_id", "seed", "rewards"} <= set(r) for r in rows):
                raise RunFolderError(f"{f} is not a held-out record (rows need prompt_id, seed and rewards)")
            found.append(HeldoutRecord(f.stem, int(rows[0].get("epoch", 0)), rows, folder))
        order = {"eval_before": -1}
        found.sort(key=lambda r: (order.get(r.name, r.epoch), r.name == "eval_after"))
        return {r.name: r for r in found}

    # --- what the run is ---------------------------------------------------------------------------------

    def setting(self, dotted: str, default: Any = None) -> Any:
        """A configuration value by dotted path (``train.epochs``); ``default`` when absent."""
        node: Any = self.config or {}
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def weights(self) -> dict[str, float]:
        """Training rewards and their weights (from the configuration; from the metrics when it is missing)."""
        rewards = self.setting("reward")
        if isinstance(rewards, dict) and rewards:
            return {k: float(v.get("weight", 1.0)) for k, v in rewards.items()}
        names = sorted({k[len("reward/"):-len("_mean")] for row in self.metrics for k in row
                        if k.startswith("reward/") and k.endswith("_mean") and k != "reward/score_mean"})
        return dict.fromkeys(names, 1.0)

    @property
    def world(self) -> str:
        """The prompt source (a world's name for the procedural worlds: shapes, arithmetic, ...)."""
        return str(self.setting("prompts.source", "unknown"))

    @property
    def epochs_planned(self) -> int | None:
        value = self.setting("train.epochs")
        return int(value) if value is not None else None

    @property
    def epochs_done(self) -> int:
        return max((int(r.get("epoch", 0)) for r in self.metrics), default=0)

    @property
    def finished(self) -> bool:
        planned = self.epochs_planned
        return planned is not None and self.epochs_done >= planned

    def status(self) -> str:
        """One line: finished, or how far it got."""
        planned = self.epochs_planned
        of = f" of {planned}" if planned is not None else ""
        if self.finished:
            return f"finished: {self.epochs_done}{of} epochs"
        return (f"not finished: {self.epochs_done}{of} epochs done (still running, stopped or interrupted); "
                "showing what exists so far")

    def eval_settings(self) -> dict[str, Any]:
        """The settings that decide held-out scores of a given model (``{dotted name: value}``): the ``eval``
        section, the backbone's sampling fields and the prompt source, less :data:`NOT_EVAL_SETTINGS`."""
        sections = {"eval": self.setting("eval") or {}, "prompts": self.setting("prompts") or {},
                    "backbone": {k: self.setting(f"backbone.{k}") for k in BACKBONE_SAMPLING}}
        flat = flatten(sections)
        return {k: v for k, v in flat.items() if not any(k == n or k.startswith(n + ".") for n in NOT_EVAL_SETTINGS)}

    # --- held-out evaluations ----------------------------------------------------------------------------

    @property
    def before(self) -> HeldoutRecord | None:
        return self.records.get("eval_before")

    @property
    def latest(self) -> HeldoutRecord | None:
        """``eval_after``, else the latest evaluation after training started (None if there is none)."""
        if "eval_after" in self.records:
            return self.records["eval_after"]
        later = [r for r in self.records.values() if r.name != "eval_before"]
        return later[-1] if later else None

    # --- curves ------------------------------------------------------------------------------------------

    def has_axis(self, axis: str) -> bool:
        key = axis_key(axis)
        return any(key in row for row in self.metrics)

    def series(self, key: str, axis: str = "epoch") -> tuple[list[float], list[float]]:
        """``(x, y)`` of every ``metrics.jsonl`` row holding a finite ``key`` (the y), x from ``axis``.

        The row written before training holds no cost counters: its x is 0.

        Raises:
            RunFolderError: the run never logged the axis' counter (e.g. ``flops`` before cost accounting).
        """
        xkey = axis_key(axis)
        if not self.has_axis(axis):
            have = [a for a in AXES if self.has_axis(a)]
            fix = f"choose another axis ({', '.join(have)})" if have else "it has no finished epoch yet"
            raise RunFolderError(f"--axis {axis}: run {self.path} logged no {xkey}; {fix}")
        xs, ys = [], []
        for row in self.metrics:
            y = row.get(key)
            if y is None or not math.isfinite(float(y)):
                continue
            x = row.get(xkey, 0.0 if int(row.get("epoch", 0)) == 0 else None)
            if x is None:
                continue
            xs.append(float(x))
            ys.append(float(y))
        return xs, ys

    def heldout_series(self, axis: str = "epoch") -> dict[str, tuple[list[float], list[float]]]:
        """Held-out curves: each ``eval/<reward>`` mean and ``aggregate`` (the weighted sum of the training
        rewards' means) at every evaluation."""
        names = sorted({k[len("eval/"):] for row in self.metrics for k in row if k.startswith("eval/")})
        out = {name: self.series(f"eval/{name}", axis) for name in names}
        w = {k: v for k, v in self.weights.items() if v != 0}
        if w and all(k in out for k in w):
            xs_by = {k: dict(zip(*out[k], strict=True)) for k in w}
            common = sorted(set.intersection(*(set(d) for d in xs_by.values())))
            out["aggregate"] = (common, [sum(w[k] * xs_by[k][x] for k in w) for x in common])
        return out

    def reward_series(self, axis: str = "epoch") -> dict[str, tuple[list[float], list[float]]]:
        """Training curves: each reward's mean over the epoch's rollout and ``aggregate`` (the weighted sum of
        those means, comparable across aggregation modes)."""
        out = {name: self.series(f"reward/{name}_mean", axis) for name in self.weights}
        w = {k: v for k, v in self.weights.items() if v != 0}
        xs, ys = [], []
        xkey = axis_key(axis)
        for row in self.metrics:
            values = [row.get(f"reward/{k}_mean") for k in w]
            if not w or xkey not in row or any(v is None or not math.isfinite(float(v)) for v in values):
                continue
            xs.append(float(row[xkey]))
            ys.append(sum(wk * float(v) for wk, v in zip(w.values(), values, strict=True)))
        out["aggregate"] = (xs, ys)
        return out

    def final(self, key: str) -> float | None:
        """The last finite value of ``key`` in ``metrics.jsonl`` (None if never logged)."""
        for row in reversed(self.metrics):
            v = row.get(key)
            if v is not None and math.isfinite(float(v)):
                return float(v)
        return None


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """A nested configuration dict as ``{dotted key: leaf value}`` (an empty dict is a leaf)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def axis_key(axis: str) -> str:
    """The ``metrics.jsonl`` key of compute axis ``axis``.

    Raises:
        RunFolderError: an unknown axis, naming the valid ones.
    """
    if axis not in AXES:
        raise RunFolderError(f"--axis {axis!r} is not an axis; choose one of {', '.join(AXES)}")
    return AXES[axis][0]


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path} is not valid JSON ({exc})") from None
    return value if isinstance(value, dict) else None


def _read_jsonl(path: Path, *, torn_ok: bool) -> list[dict[str, Any]]:
    """Rows of a JSONL file; with ``torn_ok`` a half-written last line (a run writing or killed) is dropped."""
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if torn_ok and i == len(lines) - 1:
                break
            raise RunFolderError(f"{path} line {i + 1} is not JSON ({exc})") from None
    return rows
