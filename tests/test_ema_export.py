"""With EMA on, what a checkpoint exports (``trainable/``) is what the run evaluated with: ``alignkit eval`` of
the checkpoint reproduces the held-out scores the run logged for that epoch; the raw weights sit beside it in
``trainable_raw/``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.checkpoint import latest_checkpoint
from alignkit.cli import main
from alignkit.metrics import read_metrics

pytestmark = pytest.mark.integration

RECIPE = "sd3_tiny_flow_grpo"


def test_eval_of_a_checkpoint_reproduces_the_runs_heldout_scores(tmp_path: Path) -> None:
    run = [f"output_dir={tmp_path}", "train.epochs=2", "train.prompts_per_epoch=2", "algo.num_seeds=2",
           "train.rollout_batch_size=4", "train.train_batch_size=3", "backbone.num_steps=3",
           "train.checkpoint_every=1", "train.sample_every=1000", "train.learning_rate=3e-2",
           "train.ema.enabled=true", "train.ema.decay=0.5", "eval.every=1", "eval.num_prompts=3",
           "train.log_with=[]",
           # a smooth held-out reward (a fixed random projection of the pixels) besides JPEG size
           "+eval.rewards.proj={fn: 'distributed_run:projection'}"]
    assert main(["train", RECIPE, *run]) == 0
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and (ckpt / "trainable").is_dir() and (ckpt / "trainable_raw").is_dir()
    epoch = json.loads((ckpt / "state.json").read_text())["epoch"]
    logged = next(r for r in read_metrics(tmp_path / "metrics.jsonl") if r["epoch"] == epoch)

    def evaluate(weights: Path) -> dict[str, float]:
        assert main(["eval", RECIPE, *run, f"eval.checkpoint={weights}"]) == 0
        return json.loads((tmp_path / "eval" / "summary.json").read_text())

    exported = evaluate(ckpt)["mean"]  # eval/summary.json: each reward's mean under "mean"
    assert set(exported) == {"jpeg_compressibility", "proj"}
    for name, value in exported.items():
        assert value == pytest.approx(logged[f"eval/{name}"], rel=1e-6, abs=1e-9), name
    raw = evaluate(ckpt / "trainable_raw")["mean"]  # the trained weights themselves score otherwise
    assert raw["proj"] != pytest.approx(exported["proj"], rel=1e-4)
