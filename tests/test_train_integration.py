"""Tiny SD3 and FLUX trained for a few epochs: real effects, checkpoints diffusers can load, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file
from weight_checks import WeightWatch, ema_lora_tensors, plain_lora_name

from alignkit.checkpoint import latest_checkpoint
from alignkit.cli import main
from alignkit.compose import load_run_config
from alignkit.metrics import read_metrics
from alignkit.modalities.diffusers_common import LORA_WEIGHTS_NAME, absent_components, resolve_pretrained
from alignkit.plans import Deterministic
from alignkit.rollout import RolloutEngine, RolloutRequest, sample_generator
from alignkit.trainer import Trainer

pytestmark = pytest.mark.integration

CASES = {"sd3_tiny_flow_grpo": StableDiffusion3Pipeline, "flux_tiny_flow_grpo": FluxPipeline}
NEGATIVE = {"sd3_tiny_flow_grpo": lambda c: {"negative_prompt": c.negative_prompt},
            "flux_tiny_flow_grpo": lambda c: {}}  # FLUX.1 is guidance-distilled: no negative prompt


def _overrides(out: Path, epochs: int) -> list[str]:
    return [f"output_dir={out}", f"train.epochs={epochs}", "train.prompts_per_epoch=2", "algo.num_seeds=2",
            "train.rollout_batch_size=4", "train.train_batch_size=3", "train.gradient_accumulation_steps=2",
            "backbone.num_steps=4", "train.checkpoint_every=1", "train.sample_every=1", "train.keep_checkpoints=2"]


@pytest.mark.parametrize("recipe", list(CASES))
def test_train_checkpoint_resume(recipe: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trainer = Trainer(load_run_config(recipe, _overrides(out, 2)), tensorboard=False)
    watch = WeightWatch(trainer.sampler.pipe, ("transformer", "vae", "text_encoder", "text_encoder_2"))
    assert all(not p.requires_grad for n, p in trainer.sampler.pipe.vae.named_parameters())
    state = trainer.train()
    assert state.epoch == 2 and state.global_step > 0

    # real effects: every LoRA tensor moved, nothing else did, losses finite, ratio 1 on the first step
    lora1 = watch.assert_trained()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/kl"]) for r in rows)
    assert rows[0]["train/first_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert rows[0]["rollout/nfe"] == 4 * 4 and rows[0]["rollout/transitions"] == 4 * 3
    assert (out / "samples" / "epoch_00000.png").is_file()

    # the checkpoint loads into the stock diffusers pipeline: trainable/ reproduces the EMA weights (the recipe
    # trains with EMA; held-out evaluation samples with them), trainable_raw/ the trained LoRA
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name == f"step-{state.global_step:08d}"
    ema = ema_lora_tensors(trainer)
    saved = load_file(str(ckpt / "trainable" / LORA_WEIGHTS_NAME))
    source = resolve_pretrained(trainer.cfg.backbone.pretrained)
    pipe = CASES[recipe].from_pretrained(source, **absent_components(source))
    for folder, expected in (("trainable", ema), ("trainable_raw", {plain_lora_name(n): v for n, v in lora1.items()})):
        pipe.load_lora_weights(ckpt / folder)
        loaded = {plain_lora_name(n): p for n, p in pipe.transformer.named_parameters() if "lora_" in n}
        assert len(loaded) == len(expected) == len(saved)
        assert all(torch.equal(loaded[n].detach(), v) for n, v in expected.items()), folder
        pipe.unload_lora_weights()
    assert any(not torch.equal(ema[plain_lora_name(n)], v) for n, v in lora1.items())  # EMA lags the weights
    # ... at the trained alpha: the stock pipeline with the exported adapter samples what alignkit samples with
    # the EMA weights (what its held-out evaluation uses) from the same noise
    pipe.load_lora_weights(ckpt / "trainable")
    sampler, c = trainer.sampler, trainer.cfg.backbone
    request = RolloutRequest(prompts=["a red circle"], prompt_ids=[0], metadata=[{}], num_seeds=1, seed=7, iteration=0)
    ode = Deterministic().schedule(c.num_steps, 0, torch.Generator())
    with trainer.ema.swapped():
        ours = RolloutEngine(sampler, batch_size=1).run(request, ode)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt=request.prompts, latents=sampler.initial_state([sample_generator(7, 0, 0, 0)]),
                  num_inference_steps=c.num_steps, guidance_scale=c.guidance_scale, height=c.height, width=c.width,
                  max_sequence_length=c.max_sequence_length, output_type="latent", **NEGATIVE[recipe](c)).images
    torch.testing.assert_close(theirs, ours.final_state, rtol=1e-5, atol=1e-5)
    pipe.unload_lora_weights()

    # resume through the real CLI: continues from the saved step and ends where an uninterrupted run ends
    assert main(["train", recipe, *_overrides(out, 3)]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1.0, 2.0, 3.0]
    assert rows[2]["global_step"] == 3 * rows[0]["global_step"]
    assert len(list((out / "checkpoints").iterdir())) == 2  # rotation keeps train.keep_checkpoints

    straight = tmp_path / "straight"
    Trainer(load_run_config(recipe, _overrides(straight, 3)), tensorboard=False).train()
    a = load_file(str(latest_checkpoint(out) / "trainable" / LORA_WEIGHTS_NAME))
    b = load_file(str(latest_checkpoint(straight) / "trainable" / LORA_WEIGHTS_NAME))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"


def test_cli_rejects_bad_config_before_loading(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = main(["train", "sd3_tiny_flow_grpo", f"output_dir={tmp_path}", "algo.num_seeds=1"])
    assert code == 2
    assert "algo.num_seeds=1" in caplog.text
    assert not (tmp_path / "metrics.jsonl").exists()


def test_eval_command_writes_table_and_grid(tmp_path: Path) -> None:
    code = main(["eval", "sd3_tiny_flow_grpo", f"output_dir={tmp_path}", "backbone.num_steps=3",
                 "eval.num_prompts=3", "eval.seeds_per_prompt=2", "eval.batch_size=6"])
    assert code == 0
    rows = (tmp_path / "eval" / "rewards.jsonl").read_text().splitlines()
    assert len(rows) == 6
    assert (tmp_path / "eval" / "grid.png").is_file()
    summary = __import__("json").loads((tmp_path / "eval" / "summary.json").read_text())
    assert set(summary["mean"]) == {"jpeg_compressibility"} and summary["mean"]["jpeg_compressibility"] < 0
