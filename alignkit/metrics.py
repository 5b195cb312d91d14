"""A run's metrics: ``metrics.jsonl`` (always written) and accelerate's experiment trackers (``train.log_with``).

Every epoch's metrics are one JSON row of ``<output_dir>/metrics.jsonl`` (``step`` = the epoch) and, for each
tracker named in ``train.log_with`` (``tensorboard`` by default, ``wandb`` and the others accelerate knows,
each imported only when named), the same numeric values logged at that step through
``Accelerator.log``. TensorBoard event files go to ``<output_dir>/tensorboard/alignkit/``; a resumed run
supersedes the events of the epochs it trains again (TensorBoard's ``purge_step``), as it drops their
``metrics.jsonl`` rows.

:data:`METRICS` names each key of a ``metrics.jsonl`` row (or a family of keys: ``{name}`` stands for a reward's
name in the recipe) with its meaning; the docs' metrics reference is generated from it, and a test checks that a
real run logs exactly these keys.
"""

from __future__ import annotations

import json
import logging
import numbers
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.cost import COST_METRICS
from alignkit.plans import PLAN_METRICS

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TRACKER_PROJECT = "alignkit"
"""The project name given to the trackers (TensorBoard's sub-folder of ``<output_dir>/tensorboard``)."""


def _regex(pattern: str) -> re.Pattern[str]:
    """``reward/{name}_mean`` -> a regex where ``{name}`` is one path segment (a reward's name)."""
    parts = re.split(r"(\{name\})", pattern)
    return re.compile("".join("[^/]+" if part == "{name}" else re.escape(part) for part in parts))


TRAIN_METRICS: dict[str, str] = {
    "train/transitions_trained": "Transitions in the epoch's minibatches (inner epochs summed, all processes).",
    "train/distinct_inputs": "Distinct inputs (state, step, conditioning) among them: one per branch point.",
    "train/inputs_evaluated": "Policy forwards of the epoch's update: the distinct inputs with train.shared_inputs, "
        "the transitions without.",
    "train/tied_skipped": "Transitions of advantage exactly 0 left out by algo.objective.skip_tied (0 when off).",
}
"""The ``train/*`` keys the shared-input update adds (logged by :mod:`alignkit.update`)."""


METRICS: dict[str, str] = {
    # the row's counters
    "step": "Completed epochs when the row was written: the x-axis of TensorBoard (0 for the held-out "
        "evaluation before training).",
    "epoch": "Completed epochs, as `step`; also the position in the prompt source.",
    "global_step": "Optimizer steps taken so far (skipped non-finite steps not counted).",
    # rewards of this epoch's rollout (all processes)
    "reward/score_mean": "Mean aggregated score of the epoch's samples: the weighted sum of the rewards "
        "(`sum_then_normalize`), or of the group-normalised rewards "
        "(`normalize_then_sum`); samples with an invalid reward are left out.",
    "reward/{name}_mean": "Mean raw score of reward `{name}` over the epoch's samples it could score.",
    "reward/{name}_std": "Standard deviation (population) of reward `{name}`'s raw scores in the epoch.",
    "reward/{name}_invalid": "Samples of the epoch reward `{name}` could not score (None, NaN or inf): "
        "masked, so their transitions do not train; never replaced by a value.",
    # credit
    "credit/zero_std_fraction": "Fraction of advantage groups whose valid scores are all equal: such a "
        "group gives every sample advantage 0 (no learning signal).",
    "credit/masked_transitions": "Stored transitions whose sample has no valid score (they do not train).",
    # rollout
    "rollout/nfe": "Model evaluations (NFE) of the epoch's rollout, over all processes; evaluation and "
        "training forwards are not counted.",
    "rollout/nfe_total": "Rollout model evaluations of the run so far.",
    "rollout/samples": "Scored samples of the epoch (prompts x seeds, times children x branch steps when "
        "branching).",
    "rollout/transitions": "Stored transitions (policy actions with their log-probs) of the epoch.",
    # training (means over the epoch's minibatches unless stated)
    "train/loss": "Objective minimised: clipped policy loss + beta * KL, mean over minibatches.",
    "train/policy_loss": "Clipped surrogate mean(w * max(-A r, -A clip(r, 1 - eps, 1 + eps))), mean over "
        "minibatches.",
    "train/kl": "Mean KL of the policy's transitions to the reference (adapter-disabled) model; 0 when "
        "algo.objective.beta = 0.",
    "train/ratio_mean": "Mean probability ratio r = exp(logp - logp_old) of the trained transitions.",
    "train/clip_fraction": "Fraction of trained transitions whose ratio left [1 - eps, 1 + eps].",
    "train/approx_kl": "0.5 * mean((logp - logp_old)^2): how far the policy moved from the rollout policy.",
    "train/grad_norm": "Mean gradient norm of the epoch's optimizer steps, before clipping to "
        "train.max_grad_norm.",
    "train/first_ratio": "Mean ratio of the epoch's first minibatch; 1 up to rounding (the rollout and the "
        "training forward agree), else the sampler's log-probs are not reproducible.",
    "train/minibatches": "Minibatches of the epoch that entered an optimizer step (skipped steps excluded).",
    "train/skipped_steps": "Optimizer steps of the epoch skipped for a NaN / inf loss or gradient.",
    "train/nonfinite_skipped": "Optimizer steps skipped for a NaN / inf loss or gradient in the whole run.",
    "train/masked_skipped": "Epochs whose update was skipped because every sample was masked (no reward could score "
                            "any sample, or every decode was non-finite), in the whole run.",
    "train/scale_overflows": "fp16 steps the loss scaler skipped (gradients overflowed, scale lowered) in "
        "the whole run; not counted as non-finite.",
    "train/lr": "Learning rate after the epoch's last optimizer step.",
    "run/processes": "Processes training together (accelerate / torchrun world size).",
    # timing
    "time/rollout_s": "Seconds of the epoch's rollout (sampling and decoding).",
    "time/reward_s": "Seconds spent after the rollout until the rewards, advantages and weights were ready "
        "(scoring overlaps the rollout when train.overlap_rewards is on).",
    "time/train_s": "Seconds of the epoch's clipped updates.",
    "time/epoch_s": "Seconds of the whole epoch, held-out evaluation and sample grids included.",
    "time/total_s": "Training seconds of the run so far (rollout to update; evaluation excluded).",
    "time/cpu_s": "Process CPU seconds (all threads, this process) of the epoch's rollout to update.",
    "time/cpu_total_s": "Process CPU seconds of the run so far (rollout to update; evaluation excluded; kept across "
        "resume).",
    "time/model_s": "Wall seconds of the epoch spent inside model calls (rollout transitions, decoding, the update's "
        "forwards and backward; this process); time/rollout_s + time/reward_s + time/train_s minus it is the "
        "framework's own time. On CUDA, kernels still queued when a call returns are not counted.",
    # held-out evaluation
    "eval/{name}": "Held-out mean of reward `{name}` (training and evaluation-only rewards) over "
        "eval.num_prompts prompts x eval.seeds_per_prompt noises, sampled deterministically (EMA "
        "weights when train.ema is on); in rows of epochs that evaluate.",
    **TRAIN_METRICS,
    **COST_METRICS,
    **PLAN_METRICS,
}
"""Every key a run writes to ``metrics.jsonl`` (and TensorBoard): the key, or a pattern where ``{name}`` stands for a
reward's name, mapped to its meaning; in the order of the docs' reference."""

_REGEX = {pattern: _regex(pattern) for pattern in METRICS}


def metric_pattern(key: str) -> str | None:
    """The catalogue entry ``key`` falls under (``reward/shapeeval_mean`` -> ``reward/{name}_mean``); None if unlisted.

    Exact keys win over families, so ``reward/score_mean`` is not read as a reward named ``score``.
    """
    if key in METRICS:
        return key
    return next((pattern for pattern, regex in _REGEX.items() if regex.fullmatch(key)), None)


def describe(key: str) -> str | None:
    """The meaning of logged ``key`` from :data:`METRICS`; None if it is not catalogued."""
    pattern = metric_pattern(key)
    return METRICS[pattern] if pattern is not None else None


class MetricsWriter:
    """Appends one JSON object per epoch to ``metrics.jsonl`` and logs its numbers to the accelerator's trackers.

    Args:
        directory: the run folder.
        accelerator: the run's ``Accelerator`` built with ``log_with`` and ``logging_dir=<directory>/tensorboard``
            (:func:`tracker_settings`), or None for ``metrics.jsonl`` only. Call on the main process.
        first_step: the first step this writer logs; tracker events of this step and later written by an
            earlier process are superseded (epochs about to be trained again).
        config: the run configuration, flattened to ``section.field`` keys, stored by the trackers as
            hyper-parameters.
    """

    def __init__(self, directory: Path, accelerator: Any | None = None, *, first_step: int = 0,
                 config: dict[str, Any] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / METRICS_FILE
        self._accelerator = accelerator if accelerator is not None and accelerator.log_with else None
        if self._accelerator is not None:
            self._accelerator.init_trackers(
                TRACKER_PROJECT, config=config,
                init_kwargs={"tensorboard": {"purge_step": first_step}, "wandb": {"name": directory.name}},
            )

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` to ``metrics.jsonl`` and log the numeric values (NaN included)
        at ``step`` to every tracker."""
        row = {"step": step, **metrics}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        if self._accelerator is not None:
            numeric = {k: float(v) for k, v in metrics.items()
                       if isinstance(v, numbers.Real) and not isinstance(v, bool)}
            self._accelerator.log(numeric, step=step)

    def close(self) -> None:
        """Finish the trackers (flush and close TensorBoard's writer, end a wandb run); the process group is
        left alone (``Accelerator.end_training`` would destroy it)."""
        if self._accelerator is not None:
            for tracker in self._accelerator.trackers:
                tracker.finish()
            self._accelerator.trackers.clear()
            self._accelerator = None


def tracker_settings(directory: Path, log_with: list[str]) -> dict[str, Any]:
    """Keyword arguments of ``Accelerator`` for the trackers ``log_with`` writing under ``directory``."""
    from accelerate.utils import ProjectConfiguration

    if not log_with:
        return {}
    project = ProjectConfiguration(project_dir=str(directory), logging_dir=str(directory / "tensorboard"))
    return {"log_with": list(log_with), "project_config": project}


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str | None]:
    """``data`` (nested dicts) as ``a.b.c`` keys with scalar values; lists and other values as their JSON text
    (what trackers accept as hyper-parameters)."""
    out: dict[str, bool | int | float | str | None] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


@dataclass
class MetricsFile:
    """What ``metrics.jsonl`` holds.

    Attributes:
        rows: the parsed rows, in file order.
        torn: the last line when it is not a complete JSON row (a write cut short by a crash), else None.
    """

    rows: list[dict[str, Any]]
    torn: str | None = None


def load_metrics(path: Path) -> MetricsFile:
    """Parse ``metrics.jsonl``; an unreadable last line is returned as ``torn``.

    Raises:
        ValueError: a line before the last one is not JSON (the file was damaged or edited), naming it.
    """
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                return MetricsFile(rows, torn=line)
            raise ValueError(f"{path} line {i + 1} is not a JSON row ({exc}); the file was damaged or edited: "
                             "repair or delete that line") from None
        rows.append(row)
    return MetricsFile(rows)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``, without a torn last line (a run writing it, or one that crashed mid-write).

    Raises:
        ValueError: a line before the last one is not JSON.
    """
    return load_metrics(path).rows
