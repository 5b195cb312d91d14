"""Exact resume and atomic checkpoints.

A run killed with SIGKILL at a random moment and resumed from its last checkpoint ends bit-identical (CPU)
to an uninterrupted run; checkpoints are written atomically, half-written ones are never picked up, old
ones are rotated, and a failed write keeps the previous checkpoint.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import alignkit.checkpoint as ckpt_mod
from alignkit.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from alignkit.cli import main
from alignkit.errors import CheckpointError
from alignkit.metrics import read_metrics
from alignkit.modalities.diffusers_common import LORA_WEIGHTS_NAME

logger = logging.getLogger(__name__)

EPOCHS = 12


def _run_args(out: Path) -> list[str]:
    """A tiny Flow-GRPO run that uses every piece of saved state: several optimizer steps per epoch with
    gradient accumulation, LR warm-up, EMA, a random subset of steps per sample, KL to the reference."""
    return [
        sys.executable, "-m", "alignkit.cli", "-q", "train", "sd3_tiny_flow_grpo", f"output_dir={out}",
        f"train.epochs={EPOCHS}", "train.prompts_per_epoch=2", "algo.num_seeds=2", "train.rollout_batch_size=4",
        "train.train_batch_size=3", "train.gradient_accumulation_steps=2", "backbone.num_steps=4",
        "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.sample_every=1000", "train.warmup_steps=3",
        "train.ema.enabled=true", "algo.timestep_fraction=0.67", "train.learning_rate=1e-2",
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {f"trainable.{k}": v for k, v in load_file(str(folder / "trainable" / LORA_WEIGHTS_NAME)).items()}
    if (folder / "trainable_raw").is_dir():  # EMA on: the raw weights beside the exported EMA ones
        out.update({f"raw.{k}": v for k, v in load_file(str(folder / "trainable_raw" / LORA_WEIGHTS_NAME)).items()})
    out.update({f"state.{k}": v for k, v in load_file(str(folder / "state.safetensors")).items()})
    return out


def _checkpointed_epoch(out: Path) -> int:
    """The epoch of the latest checkpoint in ``out`` (0 when none); checkpoints appear by atomic rename."""
    for _ in range(5):
        try:  # the run prunes old checkpoints (keep_checkpoints) while this reads: a folder may vanish mid-read
            latest = latest_checkpoint(out)
            if latest is None:
                return 0
            return int(json.loads((latest / "state.json").read_text())["epoch"])
        except FileNotFoundError:
            continue
    return 0


@pytest.mark.integration
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(tmp_path: Path) -> None:
    """SIGKILL inside epoch ``k + 1`` for a random ``k`` in ``[2, EPOCHS - 4]``: the moment is chosen relative to
    the run's own checkpoints (a random fraction, below one half, of the last epoch's duration after checkpoint
    ``k``), so it cannot fall past the end of the run however fast or slow the machine is."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    victim = subprocess.Popen(_run_args(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rng = random.Random()
    k, fraction = rng.randint(2, EPOCHS - 4), rng.uniform(0.0, 0.5)
    report: dict[str, object] = {}

    def kill_inside_epoch_after_checkpoint_k() -> None:
        deadline = time.monotonic() + 240
        seen: dict[int, float] = {}  # checkpointed epoch -> when it was first seen
        epoch = 0
        while victim.poll() is None and time.monotonic() < deadline:
            epoch = _checkpointed_epoch(killed)
            seen.setdefault(epoch, time.monotonic())
            if epoch >= k:
                break
            time.sleep(0.005)
        report["first"] = latest_checkpoint(killed)
        report["epoch_at_k"] = epoch
        earlier = [t for e, t in seen.items() if e == k - 1]
        epoch_s = seen.get(k, time.monotonic()) - earlier[0] if earlier else 0.0
        time.sleep(fraction * epoch_s)
        report["alive"] = victim.poll() is None
        if report["alive"]:
            os.kill(victim.pid, signal.SIGKILL)
        report["rc"] = victim.wait()

    watcher = threading.Thread(target=kill_inside_epoch_after_checkpoint_k)
    watcher.start()
    try:
        assert main(_run_args(straight)[3:]) == 0  # the uninterrupted run, in this process meanwhile
    finally:
        watcher.join(timeout=300)
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    first = report.get("first")
    assert first is not None, f"no checkpoint appeared: {victim.stderr.read().decode()}"
    assert report["epoch_at_k"] == k, f"checkpoint {k} was skipped (saw {report['epoch_at_k']})"
    assert report["alive"], f"the run ended within half an epoch of checkpoint {k} of {EPOCHS}"
    assert report["rc"] == -signal.SIGKILL
    logger.info("killed inside epoch %d (%.2f of the previous epoch's time after its checkpoint)", k + 1, fraction)
    at_kill = latest_checkpoint(killed)
    assert at_kill is not None
    killed_epoch = json.loads((at_kill / "state.json").read_text())["epoch"]
    assert killed_epoch < EPOCHS, "the kill came after the last checkpoint"
    # leftovers a crash can leave, and one a broken copy could: none may be picked up
    (killed / "checkpoints" / "step-99999999.tmp" / "trainable").mkdir(parents=True)
    (killed / "checkpoints" / "step-99999998" / "trainable").mkdir(parents=True)

    resumed = subprocess.run(_run_args(killed), env=_env(), capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert not (killed / "checkpoints" / "step-99999999.tmp").exists()  # cleaned by the next save

    a, b = latest_checkpoint(straight), latest_checkpoint(killed)
    assert a is not None and b is not None and a.name == b.name
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert any(k.startswith("state.ema.") for k in ta) and any(k.startswith("state.optim.") for k in ta)
    differ = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not differ, f"resumed run (killed at epoch {killed_epoch}) differs in {differ[:5]}"
    ma, mb = (json.loads((p / "state.json").read_text()) for p in (a, b))
    for key in ("epoch", "global_step", "nfe_total", "lr_scheduler", "optimizer", "python_random", "numpy_random"):
        assert ma[key] == mb[key], key
    # metrics: each epoch exactly once (rows written after the checkpoint were dropped), same values
    ra, rb = read_metrics(straight / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == [float(e) for e in range(1, EPOCHS + 1)]
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if not k.startswith("time/")} == \
               {k: v for k, v in y.items() if not k.startswith("time/")}
    # the trainable weights moved: the comparison is not between two untrained models
    first_lora = load_file(str(straight / "checkpoints" / first.name / "trainable" / LORA_WEIGHTS_NAME)) \
        if (straight / "checkpoints" / first.name).exists() else None
    final = load_file(str(a / "trainable" / LORA_WEIGHTS_NAME))
    if first_lora is not None:
        assert any(not torch.equal(final[k], first_lora[k]) for k in final)


# --- checkpoint files (no model) ---------------------------------------------------------------------------


def _writer(value: float):
    def write(folder: Path) -> None:
        folder.mkdir(parents=True)
        save_file({"w": torch.full((4,), value)}, str(folder / "weights.safetensors"))
    return write


def _save(out: Path, step: int, keep: int = 3) -> Path:
    return save_checkpoint(out, step, write_trainable=_writer(float(step)), tensors={"x": torch.arange(3.0)},
                           meta={"epoch": step}, keep=keep)


def test_half_written_checkpoints_are_never_picked_up(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = _save(tmp_path, 1)
    root = tmp_path / "checkpoints"
    # a save interrupted before its rename
    (root / "step-00000005.tmp" / "trainable").mkdir(parents=True)
    (root / "step-00000005.tmp" / "state.json").write_text("{}")
    # a folder with the final name but no state.json, and one whose files do not match its manifest
    (root / "step-00000006" / "trainable").mkdir(parents=True)
    truncated = _save(tmp_path, 7)
    data = (truncated / "state.safetensors").read_bytes()
    (truncated / "state.safetensors").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == good
    assert "step-00000006" in caplog.text and "state.json is missing" in caplog.text
    assert "step-00000007" in caplog.text and "state.safetensors has" in caplog.text
    with pytest.raises(CheckpointError, match=r"step-00000007 is not a complete checkpoint.*delete it"):
        load_checkpoint(truncated)
    # the next save removes the interrupted one
    _save(tmp_path, 8)
    assert not (root / "step-00000005.tmp").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000001", "step-00000008"]


def test_corrupt_state_of_right_size_is_reported(tmp_path: Path) -> None:
    path = _save(tmp_path, 3)
    size = (path / "state.safetensors").stat().st_size
    (path / "state.safetensors").write_bytes(b"\xff" * size)
    with pytest.raises(CheckpointError, match=r"corrupt: state.safetensors cannot be read.*delete the folder"):
        load_checkpoint(path)


def test_rotation_keeps_the_newest(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8, 10):
        _save(tmp_path, step, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000008", "step-00000010"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000008", "step-00000010"]
    tensors, meta = load_checkpoint(latest_checkpoint(tmp_path))
    assert meta["epoch"] == 10 and torch.equal(tensors["x"], torch.arange(3.0))
    assert set(meta["files"]) == {"state.safetensors", "trainable/weights.safetensors"}


def test_rewriting_the_same_step_replaces_it_atomically(tmp_path: Path) -> None:
    _save(tmp_path, 4)
    again = save_checkpoint(tmp_path, 4, write_trainable=_writer(-1.0), tensors={"x": torch.zeros(3)},
                            meta={"epoch": 5}, keep=3)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000004"]
    assert load_checkpoint(again)[1]["epoch"] == 5


def test_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = _save(tmp_path, 1)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt_mod, "save_file", full)
    with pytest.raises(CheckpointError) as info:
        _save(tmp_path, 2)
    msg = str(info.value)
    assert "step-00000002" in msg and "No space left on device" in msg and "free disk space" in msg
    assert str(previous) in msg and "intact" in msg
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    assert latest_checkpoint(tmp_path) == previous
    load_checkpoint(previous)


def test_global_rng_states_round_trip(tmp_path: Path) -> None:
    import numpy as np

    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    path = _save(tmp_path, 1)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    load_checkpoint(path)
    assert torch.equal(torch.rand(3), expected[0])
    assert random.random() == expected[1] and np.random.rand() == expected[2]


# --- resume with a plan that learns -----------------------------------------------------------------------------


class _Stop(Exception):
    """Ends a run right after a checkpoint, as a crash there would."""


@pytest.mark.integration
def test_adaptive_plan_state_and_cost_totals_resume_bit_identical(tmp_path: Path) -> None:
    """A run of the adaptive branch plan stopped after its checkpoint of epoch 2 and resumed ends bit-identical to
    an uninterrupted one: the plan's estimates (saved with the checkpoint) draw the same branch steps, and the
    cost totals carry on."""
    from alignkit.compose import load_run_config
    from alignkit.trainer import Trainer

    def trainer(out: Path) -> Trainer:
        overrides = [f"output_dir={out}", "train.epochs=4", "algo=tempflow_grpo_adaptive", "train.prompts_per_epoch=2",
                     "backbone.num_steps=5", "algo.plan.options.budget=2", "algo.plan.options.decay=0.5",
                     "train.train_batch_size=12", "train.checkpoint_every=1", "train.sample_every=1000",
                     "eval.before_after=false", "eval.every=0", "device=cpu", "train.learning_rate=1e-2"]
        return Trainer(load_run_config("default", overrides), tensorboard=False)

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    trainer(straight).train()
    first = trainer(stopped)
    save = first.save

    def save_then_stop_at_epoch_2() -> Path | None:
        written = save()
        if first.state.epoch == 2:
            raise _Stop
        return written

    first.save = save_then_stop_at_epoch_2
    with pytest.raises(_Stop):
        first.train()
    at_stop = json.loads((latest_checkpoint(stopped) / "state.json").read_text())
    assert at_stop["epoch"] == 2 and at_stop["plan"]["estimate"] != [1.0] * 4  # the plan has learned something
    resumed = trainer(stopped)
    assert resumed.state.epoch == 2 and resumed.plan.state_dict() == at_stop["plan"]
    resumed.train()

    a, b = latest_checkpoint(straight), latest_checkpoint(stopped)
    assert a is not None and b is not None and a.name == b.name
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    ma, mb = (json.loads((p / "state.json").read_text()) for p in (a, b))
    assert ma["plan"] == mb["plan"] and ma["cost_totals"] == mb["cost_totals"] and ma["cost_totals"]["flops"] > 0
    ra, rb = read_metrics(straight / "metrics.jsonl"), read_metrics(stopped / "metrics.jsonl")
    assert [r["epoch"] for r in rb] == [1.0, 2.0, 3.0, 4.0]
    for x, y in zip(ra, rb, strict=True):
        assert {k: v for k, v in x.items() if not k.startswith("time/")} == \
               {k: v for k, v in y.items() if not k.startswith("time/")}
    assert len({r["rollout/nfe"] for r in ra}) > 1, "the branch steps should change between epochs"
    assert rb[-1]["cost/flops_total"] == sum(r["cost/flops"] for r in rb)
    # process CPU seconds carry on across the resume too
    assert mb["cpu_seconds_total"] > at_stop["cpu_seconds_total"] > 0
    assert rb[-1]["time/cpu_total_s"] == pytest.approx(sum(r["time/cpu_s"] for r in rb))
