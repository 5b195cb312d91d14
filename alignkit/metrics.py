"""Metrics to a JSONL file and TensorBoard, and the catalogue of every metric a run logs.

:data:`METRICS` names each key of a ``metrics.jsonl`` row (or a family of keys: ``{name}`` stands for a reward's
name in the recipe) with its meaning; the docs' metrics reference is generated from it, and a test checks that a
real run logs exactly these keys.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _regex(pattern: str) -> re.Pattern[str]:
    """``reward/{name}_mean`` -> a regex where ``{name}`` is one path segment (a reward's name)."""
    parts = re.split(r"(\{name\})", pattern)
    return re.compile("".join("[^/]+" if part == "{name}" else re.escape(part) for part in parts))


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
    # held-out evaluation
    "eval/{name}": "Held-out mean of reward `{name}` (training and evaluation-only rewards) over "
        "eval.num_prompts prompts x eval.seeds_per_prompt noises, sampled deterministically (EMA "
        "weights when train.ema is on); in rows of epochs that evaluate.",
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
    """Appends one JSON object per epoch to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, directory: Path, tensorboard: bool = True) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(directory / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **metrics}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
