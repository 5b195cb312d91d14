"""Test tiers.

    pytest                      unit + integration tests on CPU (the default suite, README's test command)
    pytest -m "not integration" fast unit tests only
    pytest -m gpu               GPU tests (skipped without CUDA; with ALIGNKIT_GPU_TESTS_DEVICE=cpu they run on
                                the CPU instead, as bench/gpu_preflight.py runs them)

Everything runs offline: tiny random pipelines are built in-process, saved to a temporary folder and
loaded back through ``from_pretrained``.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models: one intra-op thread is as fast on a quiet machine and avoids spin-wait slowdowns of 100x
# and more when the machine is shared (measured on the 2-core CI machine type under load).
torch.set_num_threads(int(os.environ.get("ALIGNKIT_TEST_THREADS", "1")))


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
