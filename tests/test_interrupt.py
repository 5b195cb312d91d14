"""SIGINT / SIGTERM stop a training run cleanly: a real ``alignkit train`` process is signalled once its first
checkpoint appears; it stops at a safe point with one line naming its last checkpoint, exit code 130 / 143,
no traceback, the checkpoint intact and nothing recorded past it; the same command then resumes it. A second
signal aborts at once, still without a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignkit.checkpoint import latest_checkpoint, load_checkpoint
from alignkit.metrics import read_metrics
from alignkit.run_folder import LOCK_FILE

pytestmark = pytest.mark.integration

EPOCHS = 40  # far more than can pass between the first checkpoint and the signal


def _command(out: Path, epochs: int = EPOCHS) -> list[str]:
    return [sys.executable, "-m", "alignkit.cli", "-q", "train", "sd3_tiny_flow_grpo", f"output_dir={out}",
            f"train.epochs={epochs}", "train.prompts_per_epoch=2", "algo.num_seeds=2", "train.rollout_batch_size=4",
            "train.train_batch_size=3", "backbone.num_steps=3", "train.checkpoint_every=1",
            "train.sample_every=1000", "train.log_with=[]"]


def _start_and_signal(out: Path, signals: list[int]) -> tuple[int, str]:
    """Start a run, send ``signals`` as soon as its first checkpoint exists; ``(exit code, stderr)``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    proc = subprocess.Popen(_command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while latest_checkpoint(out) is None:
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        for sig in signals:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_at_a_safe_point_and_the_same_command_resumes(tmp_path: Path, sig: int,
                                                                              code: int) -> None:
    rc, err = _start_and_signal(tmp_path, [sig])
    assert rc == code, err[-3000:]
    last = latest_checkpoint(tmp_path)
    assert last is not None
    assert f"interrupted; the last checkpoint is {last}; rerun the same command to resume" in err
    assert "Traceback" not in err
    assert sum("interrupted;" in line for line in err.splitlines()) == 1  # said once
    _, meta = load_checkpoint(last)  # intact
    stopped = meta["epoch"]
    assert 1 <= stopped < EPOCHS
    # nothing of an unfinished epoch was recorded: the metrics end at the checkpoint
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [float(e) for e in range(1, stopped + 1)]
    assert not (tmp_path / LOCK_FILE).exists()

    # the same command resumes (fewer epochs keep the test short: train.epochs may change on resume)
    resumed = subprocess.run(_command(tmp_path, stopped + 1), env=dict(os.environ, OMP_NUM_THREADS="1"),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in read_metrics(tmp_path / "metrics.jsonl")] == \
        [float(e) for e in range(1, stopped + 2)]
    assert json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["epoch"] == stopped + 1


def test_a_second_ctrl_c_aborts_at_once_without_a_traceback(tmp_path: Path) -> None:
    rc, err = _start_and_signal(tmp_path, [signal.SIGINT, signal.SIGINT])
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err
    last = latest_checkpoint(tmp_path)
    assert last is not None and f"the last checkpoint is {last}" in err and "rerun the same command" in err
    load_checkpoint(last)
    assert not (tmp_path / LOCK_FILE).exists()
