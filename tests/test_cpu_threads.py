"""CPU thread settings are chosen deliberately and can be read back (alignkit.cpu_threads): train.cpu_threads,
$OMP_NUM_THREADS, CPU affinity and cgroup quotas are respected; the OpenMP wait policy is a user's when set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit import cpu_threads
from alignkit.compose import load_run_config
from alignkit.config import ConfigError


def _train(out: Path, env: dict[str, str], *overrides: str, one_cpu: bool = False) -> tuple[dict, str]:
    """``python -m alignkit train sd3_tiny_flow_grpo`` for one epoch; its environment row and its log."""
    def pin() -> None:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    proc = subprocess.run(
        [sys.executable, "-m", "alignkit", "train", "sd3_tiny_flow_grpo", f"output_dir={out}", "train.epochs=1",
         "train.prompts_per_epoch=1", "eval.before_after=false", *overrides],
        env=env, capture_output=True, text=True, timeout=600, preexec_fn=pin if one_cpu else None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "environment.jsonl").read_text().splitlines()]
    return rows[-1], proc.stderr


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", cpu_threads.CHOICE_VARIABLE,
                        cpu_threads.BUSY_VARIABLE)}
    env.update(extra)
    return env


def test_omp_num_threads_and_wait_policy_of_the_user_are_kept(tmp_path: Path) -> None:
    row, log = _train(tmp_path / "run", _env(OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE"))
    assert row["torch_threads"] == 1
    assert row["threads"]["intra_op"] == 1 and row["threads"]["source"] == "OMP_NUM_THREADS=1"
    assert row["threads"]["wait"] == "OMP_WAIT_POLICY=ACTIVE (yours)"
    assert "CPU threads 1 (OMP_NUM_THREADS=1" in log  # the start line states them
    assert len(row["load_average"]) == 3


def test_cpu_affinity_sets_the_thread_count_and_a_wait_policy_is_chosen(tmp_path: Path) -> None:
    row, log = _train(tmp_path / "run", _env(), one_cpu=True)
    assert row["threads"]["intra_op"] == 1 and row["threads"]["usable_cpus"] == 1
    assert row["threads"]["source"].startswith("CPU affinity 1")
    wait = row["threads"]["wait"]
    assert wait.startswith(("OMP_WAIT_POLICY=PASSIVE (other processes", "GOMP_SPINCOUNT=1000 (CPUs busy")), wait
    assert "OpenMP waiting: " + wait in log


def test_train_cpu_threads_wins_over_the_environment(tmp_path: Path) -> None:
    row, _ = _train(tmp_path / "run", _env(OMP_NUM_THREADS="1"), "train.cpu_threads=2")
    assert row["threads"]["intra_op"] == 2 and row["threads"]["source"] == "train.cpu_threads=2"


def test_negative_cpu_threads_is_refused_with_the_field_named() -> None:
    with pytest.raises(ConfigError, match=r"train.cpu_threads=-1: use 0 \(automatic\) or a positive"):
        load_run_config("sd3_tiny_flow_grpo", ["train.cpu_threads=-1"])


def test_a_cgroup_quota_caps_the_usable_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.setattr(cpu_threads, "_cgroup_quota", lambda: 0.5)
    expected = (1, f"cgroup quota 0.5 CPUs (affinity {affinity})") if affinity > 1 else (1, "CPU affinity 1 "
                                                                                         "(cgroup quota 0.5)")
    assert cpu_threads.usable_cpus() == expected
    monkeypatch.setattr(cpu_threads, "_cgroup_quota", lambda: None)
    assert cpu_threads.usable_cpus() == (affinity, f"CPU affinity {affinity}")


@pytest.mark.parametrize(("busy", "expected"), [(1.8, {"OMP_WAIT_POLICY": "PASSIVE"}),
                                                (0.1, {"GOMP_SPINCOUNT": "1000"})])
def test_the_wait_policy_follows_what_other_processes_use(monkeypatch: pytest.MonkeyPatch, busy: float,
                                                          expected: dict[str, str]) -> None:
    monkeypatch.setattr(cpu_threads, "busy_cpus", lambda window=0.25: busy)
    environ: dict[str, str] = {}
    reason = cpu_threads.prepare_openmp(environ)
    assert {k: v for k, v in environ.items() if k in cpu_threads.WAIT_VARIABLES} == expected
    assert environ[cpu_threads.CHOICE_VARIABLE] == reason and f"{busy:.1f}" in reason
    # a child process (accelerate launch, spawn) keeps the parent's choice; a user's setting is never replaced
    assert cpu_threads.prepare_openmp(dict(environ)) == reason
    mine = {"GOMP_SPINCOUNT": "0"}
    assert cpu_threads.prepare_openmp(mine) == "GOMP_SPINCOUNT=0 (yours)" and "OMP_WAIT_POLICY" not in mine


def test_busy_cpus_sees_a_busy_process() -> None:
    """A process spinning on one CPU is seen as about one busy CPU (not timed: a lower bound with slack)."""
    if cpu_threads.busy_cpus(0.05) is None:
        pytest.skip("no /proc/stat")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        seen = max(cpu_threads.busy_cpus(0.5) or 0.0 for _ in range(3))
    finally:
        spinner.kill()
    assert seen >= 0.5


def test_automatic_threads_do_not_depend_on_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Busy CPUs change how threads wait, not how many there are: a run's thread count repeats."""
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cpus", lambda: (4, "CPU affinity 4"))
    try:
        torch.set_num_threads(4)
        for busy in ("0.0", "1.7", "3.9"):
            monkeypatch.setenv(cpu_threads.BUSY_VARIABLE, busy)
            assert cpu_threads.configure_threads(0).intra_op == torch.get_num_threads() == 4
        settings = cpu_threads.configure_threads(0, local_processes=2)
        assert settings.intra_op == 2 and settings.source == "CPU affinity 4 / 2 processes"
        torch.set_num_threads(1)  # a program's own lower choice is kept
        settings = cpu_threads.configure_threads(0)
        assert settings.intra_op == 1 and settings.source == "torch.set_num_threads(1) kept (CPU affinity 4)"
    finally:
        torch.set_num_threads(before)
