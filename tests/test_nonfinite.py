"""NaN / inf in log-probs, losses or gradients: the optimizer step is skipped and counted; the run stops
with a clear message when it persists (``train.max_nonfinite_steps`` consecutive steps)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from weight_checks import lora_tensors

import alignkit.trainer as trainer_mod
from alignkit.checkpoint import latest_checkpoint, load_checkpoint
from alignkit.cli import main
from alignkit.compose import load_run_config
from alignkit.errors import NonFiniteError
from alignkit.metrics import read_metrics
from alignkit.trainer import Trainer

pytestmark = pytest.mark.integration

# 2 prompts x 2 seeds x 3 trained steps = 12 transitions per epoch, 3 per minibatch: 4 optimizer steps per epoch
STEPS_PER_EPOCH = 4


def _overrides(out: Path, epochs: int, limit: int = 3) -> list[str]:
    return [f"output_dir={out}", f"train.epochs={epochs}", "train.prompts_per_epoch=2", "algo.num_seeds=2",
            "train.rollout_batch_size=4", "train.train_batch_size=3", "backbone.num_steps=4",
            "train.checkpoint_every=1", "train.sample_every=1000", f"train.max_nonfinite_steps={limit}",
            "train.ema.enabled=false"]


class PoisonLogProb:
    """Wraps ``sampler.transition``: in the training forwards (grad enabled) numbered ``bad`` (1-based), the
    returned distribution's log-probs get ``value`` (NaN or inf) added, as a diverged model would give."""

    def __init__(self, sampler, bad: set[int] | None = None, after: int | None = None, value: float = math.nan):
        self.inner = sampler.transition
        self.bad, self.after, self.value = bad or set(), after, value
        self.calls = 0
        sampler.transition = self

    def __call__(self, state, step, cond, stochastic):
        dist = self.inner(state, step, cond, stochastic=stochastic)
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls in self.bad or (self.after is not None and self.calls >= self.after):
                clean = dist.log_prob
                dist.log_prob = lambda x: clean(x) + self.value
        return dist


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_occasional_nonfinite_log_probs_skip_and_count_steps(tmp_path: Path, value: float,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    trainer = Trainer(load_run_config("sd3_tiny_flow_grpo", _overrides(tmp_path, 3)), tensorboard=False)
    poison = PoisonLogProb(trainer.sampler, bad={2, 7})
    before = lora_tensors(trainer.sampler.pipe.transformer)
    with caplog.at_level(logging.WARNING):
        state = trainer.train()
    assert poison.calls == 3 * STEPS_PER_EPOCH
    assert state.nonfinite_skipped == 2 and state.consecutive_nonfinite == 0
    assert state.global_step == 3 * STEPS_PER_EPOCH - 2
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["train/skipped_steps"] for r in rows] == [1.0, 1.0, 0.0]
    assert [r["train/nonfinite_skipped"] for r in rows] == [1.0, 2.0, 2.0]
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in rows)
    assert "optimizer step skipped" in caplog.text and "process 0" in caplog.text
    after = lora_tensors(trainer.sampler.pipe.transformer)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert load_checkpoint(latest_checkpoint(tmp_path))[1]["nonfinite_skipped"] == 2


def test_persistent_nan_stops_the_run_and_keeps_the_checkpoint(tmp_path: Path) -> None:
    trainer = Trainer(load_run_config("sd3_tiny_flow_grpo", _overrides(tmp_path, 4, limit=2)), tensorboard=False)
    PoisonLogProb(trainer.sampler, after=STEPS_PER_EPOCH + 1)  # every step from the second epoch on
    with pytest.raises(NonFiniteError) as info:
        trainer.train()
    msg = str(info.value)
    for words in ("3 consecutive optimizer steps", "train.max_nonfinite_steps=2", "loss nan", "step-00000004",
                  "is kept", "train.learning_rate"):
        assert words in msg, (words, msg)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step-00000004"
    tensors, meta = load_checkpoint(ckpt)
    assert meta["epoch"] == 1 and all(torch.isfinite(v).all() for v in tensors.values() if v.is_floating_point())
    assert trainer.state.nonfinite_skipped == 3


def test_nonfinite_gradient_is_skipped(tmp_path: Path) -> None:
    trainer = Trainer(load_run_config("sd3_tiny_flow_grpo", _overrides(tmp_path, 1)), tensorboard=False)
    calls = {"n": 0}

    def poison_grad(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * math.nan if calls["n"] == 3 else grad

    trainer.params[0].register_hook(poison_grad)
    state = trainer.train()
    assert calls["n"] == STEPS_PER_EPOCH
    assert state.nonfinite_skipped == 1 and state.global_step == STEPS_PER_EPOCH - 1
    assert all(torch.isfinite(p).all() for p in trainer.params)


def test_cli_reports_persistent_nan_without_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    real = trainer_mod.build_sampler

    def poisoned(cfg, device):
        sampler = real(cfg, device)
        PoisonLogProb(sampler, after=1)
        return sampler

    monkeypatch.setattr(trainer_mod, "build_sampler", poisoned)
    code = main(["train", "sd3_tiny_flow_grpo", *_overrides(tmp_path, 2, limit=0)])
    assert code == 2
    assert "1 consecutive optimizer steps" in caplog.text and "train.max_nonfinite_steps=0" in caplog.text
    assert "no checkpoint had been written yet" in caplog.text
    assert "Traceback" not in caplog.text
    assert latest_checkpoint(tmp_path) is None


def test_fp16_overflow_is_left_to_the_loss_scaler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a loss scaler (fp16 on a GPU), gradients that overflow while the loss is finite are the scaler's
    business: the step is skipped, the scale halves, training goes on, and nothing counts as non-finite.

    accelerate creates a scaler only on a GPU; here a real ``torch.amp.GradScaler`` on CPU is installed in
    the accelerator and its optimizer wrapper the way accelerate does on a GPU.
    """
    from accelerate.optimizer import patch_optimizer_step

    trainer = Trainer(load_run_config("sd3_tiny_flow_grpo", _overrides(tmp_path, 1)), tensorboard=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    acc, opt = trainer.accelerator, trainer.optimizer
    monkeypatch.setattr(acc, "scaler", scaler)
    monkeypatch.setattr(acc, "unscale_gradients", lambda optimizer=None: scaler.unscale_(opt.optimizer))
    opt.scaler = scaler
    opt._accelerate_step_called = False
    opt._optimizer_original_step_method = opt.optimizer.step
    opt._optimizer_patched_step_method = patch_optimizer_step(opt, opt.optimizer.step)
    calls = {"n": 0}

    def overflow(grad: torch.Tensor) -> torch.Tensor:  # the 2nd optimizer step's scaled gradient overflows
        calls["n"] += 1
        return grad * math.inf if calls["n"] == 2 else grad

    trainer.params[0].register_hook(overflow)
    state = trainer.train()
    assert calls["n"] == STEPS_PER_EPOCH
    assert state.scale_overflows == 1 and state.nonfinite_skipped == 0
    assert state.global_step == STEPS_PER_EPOCH - 1
    assert scaler.get_scale() == 2.0 ** 9  # backed off once (growth needs 2000 good steps)
    assert all(torch.isfinite(p).all() for p in trainer.params)
    row = read_metrics(tmp_path / "metrics.jsonl")[-1]
    assert row["train/scale_overflows"] == 1.0 and row["train/skipped_steps"] == 1.0
    meta = load_checkpoint(latest_checkpoint(tmp_path))[1]
    assert meta["scale_overflows"] == 1 and meta["grad_scaler"]["scale"] == 2.0 ** 9


def test_fp16_on_cpu_is_refused(tmp_path: Path) -> None:
    from alignkit.config import ConfigError

    with pytest.raises(ConfigError) as info:
        Trainer(load_run_config("sd3_tiny_flow_grpo", [*_overrides(tmp_path, 1), "train.mixed_precision=fp16"]))
    assert "train.mixed_precision=fp16" in str(info.value) and "use train.mixed_precision=bf16" in str(info.value)


# --- epochs in which every sample is masked -------------------------------------------------------------------


class Unscorable:
    """A reward (JPEG-size stand-in: the mean pixel) that returns None for every sample in the calls numbered
    ``bad`` (1-based; one call per epoch here), as a reward service that is down would."""

    def __init__(self, bad: set[int] | None = None, always: bool = False) -> None:
        self.bad, self.always, self.calls = bad or set(), always, 0

    def __call__(self, samples: torch.Tensor, prompts: list[str], metadata: list[dict]) -> list[float | None]:
        self.calls += 1
        if self.always or self.calls in self.bad:
            return [None] * len(prompts)
        return samples.flatten(1).mean(dim=1).tolist()


def _masked_overrides(out: Path, epochs: int, *extra: str) -> list[str]:
    return [*_overrides(out, epochs), "train.overlap_rewards=false", "train.rollout_batch_size=4", *extra]


@pytest.mark.parametrize("cause", ["unscorable", "nonfinite_decode"])
def test_an_epoch_with_every_sample_masked_is_skipped_and_counted(tmp_path: Path, cause: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from alignkit.reward_set import RewardSet, RewardTerm

    reward = Unscorable(bad={2} if cause == "unscorable" else set())
    trainer = Trainer(load_run_config("sd3_tiny_flow_grpo", _masked_overrides(tmp_path, 3)),
                      reward_set=RewardSet([RewardTerm("mean", reward, 1.0)]), tensorboard=False)
    if cause == "nonfinite_decode":  # every sample of the second epoch decodes to NaN
        decode = trainer.sampler.decode

        def diverged(states: torch.Tensor):
            out = decode(states)
            return out * math.nan if trainer.state.epoch == 1 else out

        trainer.sampler.decode = diverged
    with caplog.at_level(logging.WARNING):
        state = trainer.train()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["train/masked_skipped"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["train/minibatches"] for r in rows] == [STEPS_PER_EPOCH, 0.0, STEPS_PER_EPOCH]
    assert state.global_step == 2 * STEPS_PER_EPOCH and state.masked_skipped == 1 and state.consecutive_masked == 0
    assert rows[1]["reward/mean_invalid"] == 4.0
    assert "every sample is masked" in caplog.text and "could not score 4 of 4 samples" in caplog.text
    assert load_checkpoint(latest_checkpoint(tmp_path))[1]["masked_skipped"] == 1


def test_persistently_masked_epochs_stop_the_run_with_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr("alignkit.reward_set.resolve_reward",
                        lambda name, term: Unscorable(always=True))  # every reward of the run cannot score
    code = main(["train", "sd3_tiny_flow_grpo", *_masked_overrides(tmp_path, 5, "train.max_masked_epochs=1")])
    assert code == 2
    for words in ("2 consecutive epochs had every sample masked", "train.max_masked_epochs=1",
                  "reward 'jpeg_compressibility' could not score 4 of 4 samples", "the last checkpoint"):
        assert words in caplog.text, words
    assert "Traceback" not in caplog.text and "ZeroDivisionError" not in caplog.text
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["train/masked_skipped"] for r in rows] == [1.0]  # the epoch that stopped the run is not recorded
    assert load_checkpoint(latest_checkpoint(tmp_path))[1]["epoch"] == 1
