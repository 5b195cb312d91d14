"""Cost accounting: model FLOPs of rollout, decode and training counted once per input shape and cached, the
counts (training inputs, decodes, reward calls, optimizer steps) and running totals in every epoch's metrics."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from alignkit.compose import load_run_config
from alignkit.cost import COST_METRICS, FlopMeter, count_flops, shape_key
from alignkit.metrics import read_metrics
from alignkit.trainer import Trainer


def test_the_meter_measures_each_shape_once_and_adds_it_per_call() -> None:
    layer = torch.nn.Linear(8, 16)
    meter = FlopMeter()
    calls = {"n": 0}

    def run(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return layer(x)

    for batch in (4, 4, 2, 4):
        x = torch.randn(batch, 8)
        out = meter.call("rollout", shape_key(x), lambda x=x: run(x))
        torch.testing.assert_close(out, layer(x))
    assert calls["n"] == 4 and meter.measured_shapes == 2  # batch 4 measured once, batch 2 once
    assert meter.take() == {"rollout": 2 * 8 * 16 * (4 + 4 + 2 + 4), "decode": 0, "train": 0}
    assert meter.take()["rollout"] == 0  # taken: reset
    _, flops = count_flops(lambda: layer(torch.randn(3, 8)).sum().backward())
    assert flops == 2 * (2 * 3 * 8 * 16)  # the forward and the weight gradient (the input needs none)
    with pytest.raises(ValueError, match="unknown cost phase 'eval'"):
        meter.call("eval", (), lambda: None)


def test_the_meter_times_the_calls_it_wraps() -> None:
    meter = FlopMeter()
    meter.call("decode", ("a",), lambda: time.sleep(0.02))
    meter.call("decode", ("a",), lambda: time.sleep(0.02))  # cached FLOPs: still timed
    seconds = meter.take_seconds()
    assert seconds["decode"] >= 0.04 and seconds["rollout"] == seconds["train"] == 0.0
    assert meter.take_seconds() == {"rollout": 0.0, "decode": 0.0, "train": 0.0}  # taken: reset


def _overrides(out: Path, epochs: int) -> list[str]:
    return [f"output_dir={out}", f"train.epochs={epochs}", "train.prompts_per_epoch=2", "backbone.num_steps=4",
            "algo.plan.options.children=3", "train.train_batch_size=7", "train.sample_every=1000",
            "eval.before_after=false", "device=cpu"]


@pytest.mark.integration
def test_every_epoch_logs_flops_by_phase_counts_and_totals(tmp_path: Path) -> None:
    trainer = Trainer(load_run_config("sd3_tiny_tempflow_grpo", _overrides(tmp_path, 2)), tensorboard=False)
    state = trainer.train()
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["epoch"] >= 1]
    assert len(rows) == 2
    assert {k for k in rows[0] if k.startswith("cost/")} == set(COST_METRICS)  # each one documented
    first, second = rows
    # the FLOPs of one row of each phase, counted independently: the cost is linear in the rows evaluated
    sampler = trainer.sampler
    cond = sampler.encode_prompts(["a red circle"])
    x = torch.randn(1, *trainer.engine.sampler.initial_state([torch.Generator()]).shape[1:])
    with torch.no_grad():
        _, per_nfe = count_flops(lambda: sampler.transition(x, torch.tensor([1]), cond, stochastic=True))
        _, per_decode = count_flops(lambda: sampler.decode(x))
    assert first["cost/rollout_flops"] == first["rollout/nfe"] * per_nfe
    assert first["cost/decode_flops"] == first["rollout/samples"] * per_decode == first["cost/decodes"] * per_decode
    rolled = trainer.rollout(0)
    gathered = trainer.score(rolled)
    credit = trainer.assign_credit(gathered).credit
    group = torch.nonzero(gathered.transitions.input_id == gathered.transitions.input_id[0]).flatten()
    assert len(group) == 3  # one branch point's children: one input
    trainer.sampler.train(True)
    _, per_input = count_flops(lambda: trainer.updater.minibatch_loss(rolled.rollout, credit, group).loss.backward())
    assert first["cost/train_flops"] == first["cost/train_inputs"] * per_input
    assert first["cost/train_inputs"] == first["train/inputs_evaluated"] == first["rollout/transitions"] / 3
    assert first["cost/flops"] == first["cost/rollout_flops"] + first["cost/decode_flops"] + first["cost/train_flops"]
    assert first["cost/reward_calls"] == first["rollout/samples"] * len(trainer.reward_set.terms)
    assert first["cost/optimizer_steps"] + second["cost/optimizer_steps"] == state.global_step
    for key in ("flops", "train_inputs", "decodes", "reward_calls", "optimizer_steps"):
        assert first[f"cost/{key}_total"] == first[f"cost/{key}"]
        assert second[f"cost/{key}_total"] == first[f"cost/{key}"] + second[f"cost/{key}"]
    # process CPU seconds and the time inside model calls (the framework's own time is the rest)
    assert first["time/cpu_s"] > 0 and first["time/cpu_total_s"] == first["time/cpu_s"]
    assert second["time/cpu_total_s"] == pytest.approx(first["time/cpu_s"] + second["time/cpu_s"])
    for row in rows:
        assert 0 < row["time/model_s"] <= row["time/rollout_s"] + row["time/reward_s"] + row["time/train_s"]
    # measured on the first call of each shape only: the second epoch (same shapes) measured nothing new
    assert second["cost/rollout_flops"] == first["cost/rollout_flops"]
    shapes = trainer.meter.measured_shapes
    assert trainer.engine.meter is trainer.meter and shapes > 0
    trainer.rollout(5)
    assert trainer.meter.measured_shapes == shapes
