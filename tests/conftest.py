"""Test tiers.

    pytest                      unit + integration tests on CPU (the default suite, README's test command)
    pytest -m "not integration" fast unit tests only
    pytest -m gpu               GPU tests (skipped without CUDA; with ALIGNKIT_GPU_TESTS_DEVICE=cpu they run on
                                the CPU instead, as bench/gpu_preflight.py runs them)

Everything runs offline: tiny random pipelines are built in-process, saved to a temporary folder and
loaded back through ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models: one intra-op thread is as fast on a quiet machine and avoids spin-wait slowdowns of 100x
# and more when the machine is shared (measured on the 2-core CI machine type under load).
# The trainer respects $OMP_NUM_THREADS (alignkit.cpu_threads), and CLI subprocesses inherit it.
os.environ["OMP_NUM_THREADS"] = os.environ.get("ALIGNKIT_TEST_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def _builtin_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Builtin tiny pipelines are built once per session into a private cache."""
    os.environ["ALIGNKIT_CACHE"] = str(tmp_path_factory.mktemp("alignkit_cache"))


@pytest.fixture
def gpu_device() -> torch.device:
    """The device of the GPU-marked tests: CUDA, or the CPU where ``ALIGNKIT_GPU_TESTS_DEVICE=cpu``."""
    return torch.device(os.environ.get("ALIGNKIT_GPU_TESTS_DEVICE", "cuda"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available() or os.environ.get("ALIGNKIT_GPU_TESTS_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `"gpu" in item.keywords`: that matches folder names
            item.add_marker(skip)


@dataclass
class TinyRun:
    """A finished `alignkit train` run folder and what the command printed and logged."""

    path: Path
    stdout: str
    stderr: str
    log: str


TINY_RUN_OVERRIDES = ["train.epochs=2", "train.prompts_per_epoch=2", "algo.num_seeds=2", "train.rollout_batch_size=4",
                      "train.train_batch_size=4", "backbone.num_steps=3", "eval.before_after=true", "eval.every=1",
                      "eval.num_prompts=3", "eval.seeds_per_prompt=2", "train.learning_rate=0.01",
                      "algo.reward_aggregation=normalize_then_sum",
                      "+reward.big={fn: jpeg_incompressibility, weight: 0.5}"]
"""Tiny SD3, two rewards under normalize_then_sum, held-out evaluation before, after and at every epoch."""


def train_captured(out: Path, args: list[str]) -> TinyRun:
    """Run `alignkit train` in-process, capturing stdout, stderr (the progress bar) and alignkit's log records."""
    from alignkit.cli import main

    stdout, stderr, log = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setLevel(logging.INFO)
    alignkit_logger = logging.getLogger("alignkit")
    alignkit_logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["train", *args, f"output_dir={out}"])
    finally:
        alignkit_logger.removeHandler(handler)
    assert code == 0, stderr.getvalue()[-2000:] + log.getvalue()[-2000:]
    return TinyRun(out, stdout.getvalue(), stderr.getvalue(), log.getvalue())


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyRun]:
    """Three finished tiny runs (:data:`TINY_RUN_OVERRIDES`): ``a0`` and ``a1`` of one recipe (seeds 0 and 1) and
    ``b0``, the same with ``algo.objective.beta=0``; shared by the summary, report and compare tests."""
    root = tmp_path_factory.mktemp("tiny_runs")
    variants = {"a0": ["seed=0"], "a1": ["seed=1"], "b0": ["seed=0", "algo.objective.beta=0"]}
    return {name: train_captured(root / name, ["sd3_tiny_flow_grpo", *TINY_RUN_OVERRIDES, *extra])
            for name, extra in variants.items()}
