"""A run folder belongs to one run: it is locked while a run uses it, resuming compares the configuration with
the checkpoint's and refuses changes that would train differently (``train.resume=force`` applies them),
``train.resume=false`` never reuses a folder with checkpoints, a corrupt latest checkpoint gives way to the
previous intact one (never to a silent restart), and a torn last row of ``metrics.jsonl`` is dropped."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import alignkit.trainer as trainer_mod
from alignkit.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from alignkit.compose import load_run_config
from alignkit.config import RunConfig, to_dict
from alignkit.errors import CheckpointError, RunFolderError
from alignkit.metrics import read_metrics
from alignkit.run_folder import LOCK_FILE, RESUMABLE, config_changes, lock_run_folder, resumable
from alignkit.trainer import Trainer

RECIPE = "sd3_tiny_flow_grpo"


def _run(out: Path, epochs: int, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"train.epochs={epochs}", "train.prompts_per_epoch=2", "algo.num_seeds=2",
            "train.rollout_batch_size=4", "train.train_batch_size=3", "backbone.num_steps=3",
            "train.checkpoint_every=1", "train.keep_checkpoints=3", "train.sample_every=1000",
            "train.learning_rate=1e-2", "train.log_with=[]", *extra]


def _trainer(out: Path, epochs: int, *extra: str) -> Trainer:
    return Trainer(load_run_config(RECIPE, _run(out, epochs, *extra)))


def _no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the run folder was checked")

    monkeypatch.setattr(trainer_mod, "build_sampler", refuse)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- configuration comparison (no model) ---------------------------------------------------------------------


def test_config_changes_list_every_field_with_old_and_new_values() -> None:
    old = to_dict(load_run_config(RECIPE, ["train.learning_rate=1e-2"]))
    new = to_dict(load_run_config(RECIPE, ["train.learning_rate=2e-2", "train.epochs=40", "eval.every=2",
                                           "reward.jpeg_compressibility.kwargs.quality=50",
                                           "+reward.extra={fn: jpeg_incompressibility, weight: 0.5}"]))
    changes = {c.path: str(c) for c in config_changes(old, new)}
    assert changes == {
        "train.learning_rate": "train.learning_rate: 0.01 -> 0.02",
        "train.epochs": "train.epochs: 12 -> 40",
        "eval.every": "eval.every: 0 -> 2",
        "reward.jpeg_compressibility.kwargs.quality": "reward.jpeg_compressibility.kwargs.quality: 95 -> 50",
        "reward.extra.fn": 'reward.extra.fn: (absent) -> "jpeg_incompressibility"',
        "reward.extra.weight": "reward.extra.weight: (absent) -> 0.5",
        "reward.extra.timeout": "reward.extra.timeout: (absent) -> null",
    }
    assert sorted(p for p in changes if not resumable(p)) == [
        "reward.extra.fn", "reward.extra.weight", "reward.jpeg_compressibility.kwargs.quality", "train.learning_rate"]


def test_settings_older_checkpoints_lack_count_as_their_defaults() -> None:
    new = to_dict(load_run_config(RECIPE, []))
    old = json.loads(json.dumps(new))
    del old["algo"]["logprob"], old["train"]["log_with"]  # written before these settings existed
    old["train"]["a_removed_setting"] = 1
    assert config_changes(old, new) == []
    changed = to_dict(load_run_config(RECIPE, ["algo=flow_grpo_cps", "algo.logprob=cps_released"]))
    assert {c.path for c in config_changes(old, changed)} == {"algo.logprob", "algo.name", "algo.step_kind"}


def test_every_resumable_setting_exists() -> None:
    def paths(data: dict, prefix: str = "") -> set[str]:
        out = set()
        for key, value in data.items():
            out |= paths(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}"}
        return out

    fields = paths(to_dict(RunConfig()))
    assert "train.learning_rate" in fields and "eval.every" in fields
    for path in RESUMABLE:
        assert path in fields or any(f.startswith(path + ".") for f in fields), path


# --- the lock (no model) ----------------------------------------------------------------------------------------


def test_a_live_lock_refuses_and_a_dead_ones_lock_is_taken_over(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom alignkit.run_folder import lock_run_folder\n"
         f"lock_run_folder({str(tmp_path)!r})\nprint('locked', flush=True)\ntime.sleep(300)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunFolderError) as info:
            lock_run_folder(tmp_path)
        msg = str(info.value)
        assert f"pid {holder.pid}" in msg and "in use by another run" in msg and "another output_dir" in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.WARNING):
        lock = lock_run_folder(tmp_path)  # the killed holder left its lock file
    assert "stale lock" in caplog.text and f"pid {holder.pid}" in caplog.text and "no longer running" in caplog.text
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    with pytest.raises(RunFolderError, match=f"pid {os.getpid()}"):  # a second user in this very process
        lock_run_folder(tmp_path)
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    lock_run_folder(tmp_path).release()


# --- resuming a real run --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_resume_refuses_training_changes_and_force_applies_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    first = _trainer(tmp_path, 1)
    # the folder is locked while the first trainer is open
    with pytest.raises(RunFolderError, match=r"in use by another run in this process \(pid \d+\)"):
        _trainer(tmp_path, 1)
    first.train()
    ckpt = latest_checkpoint(tmp_path)
    before = _snapshot(tmp_path)

    with monkeypatch.context() as m:
        _no_model_loads(m)
        with pytest.raises(RunFolderError) as info:
            _trainer(tmp_path, 2, "train.learning_rate=2e-2", "algo.objective.clip_range=2e-4")
        msg = str(info.value)
        for words in ("train.learning_rate: 0.01 -> 0.02", "algo.objective.clip_range: 0.0001 -> 0.0002",
                      ckpt.name, "output_dir to a new folder", "train.resume=force", "train.epochs"):
            assert words in msg, (words, msg)
        # train.resume=false on a folder with checkpoints: refused, the folder untouched
        with pytest.raises(RunFolderError) as info:
            _trainer(tmp_path, 2, "train.resume=false")
        assert "train.resume=false" in str(info.value) and "another output_dir" in str(info.value)
        assert _snapshot(tmp_path) == before

    # more epochs and other evaluation settings need no force
    resumed = _trainer(tmp_path, 2, "eval.every=1", "eval.num_prompts=2")
    assert resumed.state.epoch == 1
    resumed.train()
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 2.0]

    # force: the new learning rate reaches the optimizer and its schedule, and the run goes on from epoch 2
    with caplog.at_level(logging.WARNING):
        forced = _trainer(tmp_path, 3, "train.learning_rate=2e-2", "train.resume=force")
    assert forced.state.epoch == 2
    assert "train.resume=force" in caplog.text and "train.learning_rate" in caplog.text
    assert [g["lr"] for g in forced.optimizer.param_groups] == [2e-2] and forced.lr_scheduler.base_lrs == [2e-2]
    forced.train()
    meta = load_checkpoint(latest_checkpoint(tmp_path))[1]
    assert meta["epoch"] == 3 and meta["optimizer"]["param_groups"][0]["lr"] == 2e-2
    assert meta["config"]["train"]["learning_rate"] == 2e-2  # the next resume compares with the new settings


@pytest.mark.integration
def test_a_corrupt_latest_checkpoint_gives_way_to_the_previous_one(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    _trainer(tmp_path, 2).train()
    older, newest = list_checkpoints(tmp_path)
    state = newest / "state.safetensors"
    state.write_bytes(b"\x07" * state.stat().st_size)  # same size: only the digests can tell
    with caplog.at_level(logging.WARNING):
        resumed = _trainer(tmp_path, 3)
    assert resumed.state.epoch == 1  # the older checkpoint's epoch, not 0
    assert str(older) in caplog.text and str(newest) in caplog.text and "corrupt" in caplog.text
    resumed.close()

    lora = next((older / "trainable_raw").glob("*.safetensors"))
    lora.write_bytes(lora.read_bytes()[::-1])
    with pytest.raises(CheckpointError) as info:  # none intact: refused, never a silent restart from epoch 0
        _trainer(tmp_path, 3)
    msg = str(info.value)
    assert str(older) in msg and str(newest) in msg and "epoch 0" in msg and "new output_dir" in msg


@pytest.mark.integration
def test_a_torn_last_metrics_row_is_dropped_on_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _trainer(tmp_path, 1).train()
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:  # a crash in the middle of writing the next row
        f.write('{"step": 2, "epoch": 2.0, "reward/sc')
    with caplog.at_level(logging.WARNING):
        _trainer(tmp_path, 2).train()
    assert "cut short by a crash" in caplog.text and '"reward/sc' in caplog.text
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]  # every line is a whole row
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert torch.isfinite(torch.tensor([r["train/loss"] for r in rows])).all()
