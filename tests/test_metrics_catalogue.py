"""The metrics catalogue (alignkit.metrics.METRICS) is exactly what a run logs: a short real training run."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.metrics import METRICS, describe, metric_pattern, read_metrics


def test_keys_resolve_to_exact_entries_and_reward_families() -> None:
    assert metric_pattern("reward/score_mean") == "reward/score_mean"  # not a reward named "score"
    assert metric_pattern("reward/jpeg_compressibility_std") == "reward/{name}_std"
    assert metric_pattern("reward/a_b_invalid") == "reward/{name}_invalid"
    assert metric_pattern("eval/shapeeval_strict") == "eval/{name}"
    assert describe("eval/shapeeval_strict") == METRICS["eval/{name}"]
    assert metric_pattern("train/made_up") is None and describe("train/made_up") is None
    assert metric_pattern("reward/a/b_mean") is None  # {name} is one path segment
    assert metric_pattern("reward/_mean") is None  # and not empty


def test_every_entry_is_explained() -> None:
    assert all(isinstance(meaning, str) and len(meaning) > 20 for meaning in METRICS.values())


@pytest.mark.integration
def test_every_logged_key_is_in_the_catalogue_and_every_entry_is_logged(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # the adaptive plan logs its plan/* metrics too: every entry of the catalogue appears in one run
    code = main(["train", "sd3_tiny_flow_grpo", "algo=tempflow_grpo_adaptive", "algo.plan.options.budget=1",
                 "train.epochs=2", f"output_dir={out}", "train.prompts_per_epoch=2",
                 "algo.num_seeds=2", "train.rollout_batch_size=4", "train.train_batch_size=4",
                 "backbone.num_steps=3", "eval.before_after=true", "eval.every=1", "eval.num_prompts=2",
                 "+reward.big={fn: jpeg_incompressibility, weight: 0.5}"])
    assert code == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # before training, then each epoch
    keys = sorted({k for row in rows for k in row})
    unlisted = [k for k in keys if describe(k) is None]
    assert not unlisted, f"logged but missing from alignkit.metrics.METRICS: {unlisted}"
    never = sorted(set(METRICS) - {metric_pattern(k) for k in keys})
    assert not never, f"in the catalogue but never logged: {never}"
    for name in ("jpeg_compressibility", "big"):  # one family entry covers every reward of the recipe
        assert {f"reward/{name}_mean", f"reward/{name}_std", f"reward/{name}_invalid", f"eval/{name}"} <= set(keys)
