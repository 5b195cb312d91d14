"""GPU tier: bf16 sampling and training of the tiny SD3 pipeline on the device, through the real trainer.

    pytest -m gpu                                  # on a CUDA machine (bench/device_check.sh runs this)
    ALIGNKIT_GPU_TESTS_DEVICE=cpu pytest -m gpu    # the same code on CPU (bench/gpu_preflight.py runs this)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from weight_checks import WeightWatch

from alignkit.checkpoint import latest_checkpoint
from alignkit.compose import load_run_config
from alignkit.metrics import read_metrics
from alignkit.plans import Deterministic
from alignkit.rollout import RolloutEngine, RolloutRequest
from alignkit.trainer import Trainer, build_sampler

pytestmark = pytest.mark.gpu

RUNS = {
    "sd3_tiny_flow_grpo": ["algo.num_seeds=4"],
    "sd3_tiny_tempflow_grpo": ["algo.num_seeds=2", "algo.plan.options.children=3"],
}


@pytest.fixture
def bf16_accelerate() -> Iterator[None]:
    """accelerate keeps one process-wide state whose mixed precision cannot change: these tests train with bf16,
    the rest of the suite without; the state is rebuilt before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("recipe", list(RUNS))
def test_bf16_training_on_the_device(recipe: str, gpu_device: torch.device, tmp_path: Path,
                                     bf16_accelerate: None) -> None:
    """Two epochs with bf16 weights and autocast: the frozen weights live on the device in bf16, every LoRA
    tensor (float32) trains and nothing else moves, losses are finite, and the first update's ratio is 1 (the
    training forward reproduces the rollout's log-probs)."""
    overrides = [f"output_dir={tmp_path}", f"device={gpu_device.type}", "backbone.dtype=bfloat16",
                 "train.mixed_precision=bf16", "train.epochs=2", "train.prompts_per_epoch=2", "backbone.num_steps=4",
                 "train.rollout_batch_size=8", "train.train_batch_size=4", "train.checkpoint_every=1",
                 "eval.before_after=false", *RUNS[recipe]]
    trainer = Trainer(load_run_config(recipe, overrides), tensorboard=False)
    pipe = trainer.sampler.pipe
    base = [p for n, p in pipe.transformer.named_parameters() if "lora_" not in n]
    lora = [p for n, p in pipe.transformer.named_parameters() if "lora_" in n]
    assert {(p.device.type, p.dtype) for p in base} == {(gpu_device.type, torch.bfloat16)}
    assert {(p.device.type, p.dtype) for p in lora} == {(gpu_device.type, torch.float32)}
    watch = WeightWatch(pipe, ("transformer", "vae", "text_encoder", "text_encoder_2"))

    state = trainer.train()

    assert state.epoch == 2 and state.global_step > 0 and state.nonfinite_skipped == 0
    watch.assert_trained()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/kl"]) for r in rows)
    assert rows[0]["train/first_ratio"] == pytest.approx(1.0, abs=1e-2)
    assert latest_checkpoint(tmp_path) is not None
    if gpu_device.type == "cuda":
        assert torch.cuda.max_memory_allocated(gpu_device) > 0


def _images(dtype: str, device: torch.device, seed: int) -> torch.Tensor:
    """Deterministic (ODE) samples ``[4, 3, 32, 32]`` of two prompts x two noises, on the CPU."""
    cfg = load_run_config("sd3_tiny_flow_grpo", [f"device={device.type}", f"backbone.dtype={dtype}",
                                                 "backbone.num_steps=4"])
    sampler = build_sampler(cfg, device)
    request = RolloutRequest(prompts=["a red circle", "two blue squares"], prompt_ids=[0, 1], metadata=[{}, {}],
                             num_seeds=2, seed=seed, iteration=0)
    plan = Deterministic().schedule(sampler.num_steps, 0, torch.Generator())
    return RolloutEngine(sampler, batch_size=4).run(request, plan).samples.float().cpu()


def test_bf16_sampling_on_the_device_matches_float32_on_cpu(gpu_device: torch.device) -> None:
    """The same noises give the same images in bf16 on the device as in float32 on the CPU, to within a small
    fraction of how much two different noises differ (initial noise is drawn on the CPU per sample)."""
    reference = _images("float32", torch.device("cpu"), seed=0)
    on_device = _images("bfloat16", gpu_device, seed=0)
    other_noise = _images("float32", torch.device("cpu"), seed=1)
    assert torch.isfinite(on_device).all() and on_device.shape == reference.shape == (4, 3, 32, 32)
    diff = (on_device - reference).abs()
    assert float(diff.mean()) < 0.02 and float(diff.max()) < 0.15
    assert float((other_noise - reference).abs().mean()) > 5 * 0.02  # the tolerance separates noises
