"""The metrics catalogue (alignkit.metrics.METRICS) is exactly what a run logs: a short real training run."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.metrics import METRICS, Metric, describe, read_metrics


def test_describe_finds_exact_keys_and_reward_families() -> None:
    assert describe("reward/score_mean").pattern == "reward/score_mean"  # not a reward named "score"
    assert describe("reward/jpeg_compressibility_std").pattern == "reward/{name}_std"
    assert describe("eval/shapeeval_strict").pattern == "eval/{name}"
    assert describe("train/made_up") is None
    assert describe("reward/a/b_mean") is None  # {name} is one path segment
    assert Metric("x/{name}_n", "m").matches("x/a_b_n") and not Metric("x/{name}_n", "m").matches("x/_m")


def test_catalogue_entries_are_unique_and_explained() -> None:
    patterns = [m.pattern for m in METRICS]
    assert len(patterns) == len(set(patterns))
    assert all(len(m.meaning) > 20 for m in METRICS)


@pytest.mark.integration
def test_every_logged_key_is_in_the_catalogue_and_every_entry_is_logged(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(["train", "sd3_tiny_flow_grpo", "train.epochs=2", f"output_dir={out}", "train.prompts_per_epoch=2",
                 "algo.num_seeds=2", "train.rollout_batch_size=4", "train.train_batch_size=4",
                 "backbone.num_steps=3", "eval.before_after=true", "eval.every=1", "eval.num_prompts=2",
                 "+reward.big={fn: jpeg_incompressibility, weight: 0.5}"])
    assert code == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # before training, then each epoch
    keys = sorted({k for row in rows for k in row})
    unlisted = [k for k in keys if describe(k) is None]
    assert not unlisted, f"logged but missing from alignkit.metrics.METRICS: {unlisted}"
    never = [m.pattern for m in METRICS if not any(m.matches(k) for k in keys)]
    assert not never, f"in the catalogue but never logged: {never}"
    for name in ("jpeg_compressibility", "big"):  # one family entry covers every reward of the recipe
        assert {f"reward/{name}_mean", f"reward/{name}_std", f"reward/{name}_invalid", f"eval/{name}"} <= set(keys)
