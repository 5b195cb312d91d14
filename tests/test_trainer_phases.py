"""The trainer's phases as values: rollout -> score -> credit -> update, each phase's result passed to the
next; group ids computed once per epoch; checkpoint state written and read back by alignkit.checkpoint;
``alignkit eval`` without the trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from weight_checks import lora_tensors

from alignkit.checkpoint import (
    CheckpointParts,
    latest_checkpoint,
    open_checkpoint,
    restore_checkpoint,
)
from alignkit.compose import load_run_config
from alignkit.trainer import Trainer

pytestmark = pytest.mark.integration


def _overrides(out: Path, epochs: int, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"train.epochs={epochs}", "train.prompts_per_epoch=2", "algo.num_seeds=2",
            "train.rollout_batch_size=4", "train.train_batch_size=3", "backbone.num_steps=4",
            "train.sample_every=1000", "eval.before_after=false", *extra]


def test_phases_by_hand_equal_one_trained_epoch(tmp_path: Path) -> None:
    """Running the phases by hand, each result handed to the next, trains exactly as ``Trainer.train``."""
    trained = Trainer(load_run_config("sd3_tiny_flow_grpo", _overrides(tmp_path / "a", 1)), tensorboard=False)
    state = trained.train()

    manual = Trainer(load_run_config("sd3_tiny_flow_grpo", _overrides(tmp_path / "b", 1)), tensorboard=False)
    before = lora_tensors(manual.sampler.pipe.transformer)
    rolled = manual.rollout(0)
    gathered = manual.score(rolled)
    scored = manual.assign_credit(gathered)
    stats = manual.optimize(rolled.rollout, gathered, scored.credit, 0)

    assert scored.score.shape == (len(gathered.keys),) and scored.groups.shape == scored.score.shape
    assert manual.state.global_step == state.global_step > 0
    assert stats["train/minibatches"] == state.history[-1]["train/minibatches"]
    assert stats["train/loss"] == state.history[-1]["train/loss"]
    after = lora_tensors(manual.sampler.pipe.transformer)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    expected = lora_tensors(trained.sampler.pipe.transformer)
    assert all(torch.equal(after[k], expected[k]) for k in expected)


def test_group_ids_are_computed_once_per_epoch(tmp_path: Path) -> None:
    overrides = [*_overrides(tmp_path, 2), "algo.reward_aggregation=normalize_then_sum"]
    cfg = load_run_config("sd3_tiny_flow_grpo", overrides)
    trainer = Trainer(cfg, tensorboard=False)
    calls = {"n": 0}
    real = trainer.credit.groups

    def counted(keys):
        calls["n"] += 1
        return real(keys)

    trainer.credit.groups = counted
    trainer.train()
    assert calls["n"] == 2


def test_checkpoint_state_reads_back_through_the_checkpoint_module(tmp_path: Path) -> None:
    """What a trainer saved is restored by open_checkpoint + restore_checkpoint into a fresh run: optimizer
    moments, LR schedule, EMA, counters and trainable weights."""
    overrides = _overrides(tmp_path, 2, "train.ema.enabled=true", "train.warmup_steps=100")
    first = Trainer(load_run_config("sd3_tiny_flow_grpo", overrides), tensorboard=False)
    state = first.train()
    assert latest_checkpoint(tmp_path) is not None

    # a new run in its own folder (train.resume=false refuses a folder that holds checkpoints)
    fresh = Trainer(load_run_config("sd3_tiny_flow_grpo", [*overrides, f"output_dir={tmp_path / 'fresh'}",
                                                           "train.resume=false"]), tensorboard=False)
    assert fresh.state.epoch == 0
    opened = open_checkpoint(tmp_path, fresh.train_prompts, fresh.sampler)
    assert opened is not None and opened.path == latest_checkpoint(tmp_path)
    parts = CheckpointParts(sampler=fresh.sampler, optimizer=fresh.optimizer, lr_scheduler=fresh.lr_scheduler,
                            scaler=None, ema=fresh.ema, fsdp=False)
    restored = restore_checkpoint(opened, parts, output_dir=tmp_path, is_main=True, barrier=lambda: None)

    assert (restored.epoch, restored.global_step, restored.nfe_total) == (2, state.global_step, state.nfe_total)
    assert [r["epoch"] for r in restored.history] == [1.0, 2.0]
    assert fresh.lr_scheduler.get_last_lr() == first.lr_scheduler.get_last_lr()
    for a, b in zip(fresh.ema.shadow, first.ema.shadow, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(fresh.params, first.params, strict=True):
        assert torch.equal(a, b)
    mine, theirs = fresh.optimizer.state_dict()["state"], first.optimizer.state_dict()["state"]
    assert mine.keys() == theirs.keys() and mine
    for i in mine:
        assert torch.equal(mine[i]["exp_avg"], theirs[i]["exp_avg"])


def test_eval_command_does_not_import_the_trainer(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from alignkit.cli import main\n"
        f"rc = main(['eval', 'sd3_tiny_flow_grpo', 'output_dir={tmp_path}', 'backbone.num_steps=3', "
        "'eval.num_prompts=2', 'eval.seeds_per_prompt=1'])\n"
        "assert rc == 0, rc\n"
        "assert 'alignkit.trainer' not in sys.modules, 'alignkit eval imported the trainer'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "eval" / "summary.json").is_file()
