"""Wan specifics: the flow math on 5-D latents, per-token timesteps, the released UniPC scheduler and a tiny
TempFlow-GRPO training run (tiny random pipelines, offline). The sampler contract (ODE against WanPipeline,
branching, prompts encoded once, reference, export, configuration errors) is in tests/conformance."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline
from safetensors.torch import load_file
from weight_checks import WeightWatch, ema_lora_tensors, plain_lora_name

from alignkit.checkpoint import latest_checkpoint
from alignkit.config import BackboneConfig, LoraConfig
from alignkit.flow import GaussianStep, flow_grpo_step
from alignkit.metrics import read_metrics
from alignkit.modalities.diffusers_common import LORA_WEIGHTS_NAME, resolve_pretrained
from alignkit.modalities.video.tiny import TINY_WAN_FLOW_SHIFT, build_tiny_wan_pipeline
from alignkit.modalities.video.wan import WanSampler, flow_euler_scheduler
from alignkit.plans import Deterministic
from alignkit.rollout import RolloutEngine, RolloutRequest, sample_generator

PROMPTS = ["a red circle", "two blue squares"]
N_STEPS, FRAMES, SIZE = 4, 9, 32
LATENT = (16, 3, 4, 4)  # [C, f, h, w] of a 9-frame 32 x 32 clip


def _backbone(pretrained: str | Path, **kw: object) -> BackboneConfig:
    base = dict(name="wan", pretrained=str(pretrained), height=SIZE, width=SIZE, num_frames=FRAMES,
                num_steps=N_STEPS, guidance_scale=5.0, max_sequence_length=16, lora=LoraConfig(rank=4, alpha=8))
    base.update(kw)
    return BackboneConfig(**base)  # type: ignore[arg-type]


def _sampler(pretrained: str | Path, **kw: object) -> WanSampler:
    return WanSampler.from_config(_backbone(pretrained, **kw), step_kind="flow_grpo", noise_level=0.7, device="cpu")


def _request(num_seeds: int = 1) -> RolloutRequest:
    return RolloutRequest(prompts=PROMPTS, prompt_ids=[0, 1], metadata=[{}, {}], num_seeds=num_seeds, seed=7,
                          iteration=0)


# -- the shared flow math on video latents ---------------------------------------------------------------


def test_flow_math_is_shape_agnostic_on_video_latents() -> None:
    """5-D latents ``[B, C, F, H, W]`` give the same step, log-prob (element mean) and KL as flattened ones."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, *LATENT, generator=g), torch.randn(3, *LATENT, generator=g)
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.3]), torch.tensor([0.85, 0.3, 0.1])
    mean, std = flow_grpo_step(x, v, sigma, sigma_next, 0.7)
    flat_mean, flat_std = flow_grpo_step(x.flatten(1), v.flatten(1), sigma, sigma_next, 0.7)
    torch.testing.assert_close(mean.flatten(1), flat_mean)
    torch.testing.assert_close(std, flat_std)
    step = GaussianStep(mean=mean, std=std, ode_mean=mean)
    nxt = step.sample([torch.Generator().manual_seed(i) for i in range(3)])
    assert nxt.shape == x.shape
    ref = torch.distributions.Normal(mean, std.view(3, 1, 1, 1, 1)).log_prob(nxt).flatten(1).mean(1)
    torch.testing.assert_close(step.log_prob(nxt), ref)
    flat = GaussianStep(mean=flat_mean, std=flat_std, ode_mean=flat_mean)
    torch.testing.assert_close(step.log_prob(nxt), flat.log_prob(nxt.flatten(1)))
    other = GaussianStep(mean=mean + 0.1, std=std, ode_mean=mean)
    torch.testing.assert_close(step.kl(other), 0.01 / (2 * std**2))


# -- the adapter against diffusers -----------------------------------------------------------------------


def test_per_token_timesteps_equal_wan_pipeline(tmp_path: Path) -> None:
    """Wan2.2 TI2V pipelines (``expand_timesteps``) give the transformer one (equal) timestep per latent token;
    the adapter's per-sample timestep reproduces them."""
    pipe = build_tiny_wan_pipeline(seed=1, scheduler="euler")
    pipe.register_to_config(expand_timesteps=True)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    sampler = _sampler(tmp_path, num_steps=2)
    rollout = RolloutEngine(sampler, batch_size=2).run(_request(), Deterministic().schedule(2, 0, torch.Generator()))
    ref = WanPipeline.from_pretrained(tmp_path)
    assert ref.config.expand_timesteps
    ref.set_progress_bar_config(disable=True)
    latents = sampler.initial_state([sample_generator(7, 0, i, 0) for i in range(2)])
    out = ref(prompt=PROMPTS, latents=latents, num_inference_steps=2, guidance_scale=5.0, height=SIZE, width=SIZE,
              num_frames=FRAMES, max_sequence_length=16, output_type="latent").frames
    torch.testing.assert_close(rollout.final_state, out, rtol=1e-5, atol=1e-5)


def test_released_unipc_scheduler_becomes_flow_euler_with_its_shift() -> None:
    """``builtin:tiny-wan`` ships UniPC with flow sigmas (as Wan2.1's diffusers checkpoints); the policy steps on
    the flow-matching Euler schedule with the same shift, and ``pipe`` uses it too."""
    sampler = _sampler("builtin:tiny-wan", vae_tiling=True, vae_slicing=True)
    folder = Path(resolve_pretrained("builtin:tiny-wan"))
    assert "UniPCMultistepScheduler" in (folder / "scheduler" / "scheduler_config.json").read_text()
    assert isinstance(sampler.pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    expected = FlowMatchEulerDiscreteScheduler(shift=TINY_WAN_FLOW_SHIFT)
    expected.set_timesteps(N_STEPS)
    torch.testing.assert_close(sampler.sigmas, expected.sigmas)
    torch.testing.assert_close(sampler.timesteps, expected.timesteps)
    assert sampler.pipe.vae.use_tiling and sampler.pipe.vae.use_slicing
    # backbone.options.flow_shift overrides the checkpoint's shift
    shifted = flow_euler_scheduler(sampler.pipe.scheduler, 5.0)
    assert shifted.config.shift == 5.0
    with pytest.raises(ValueError, match="flow-matching"):
        flow_euler_scheduler(UniPCMultistepScheduler(), None)


# -- training ----------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_wan_tiny_tempflow_grpo_trains(tmp_path: Path) -> None:
    from alignkit.compose import load_run_config
    from alignkit.trainer import Trainer

    out = tmp_path / "run"
    cfg = load_run_config("wan_tiny_tempflow_grpo", [
        f"output_dir={out}", "train.epochs=2", "train.prompts_per_epoch=2", "algo.num_seeds=2",
        "algo.plan.options.children=2", "train.rollout_batch_size=24", "train.train_batch_size=8",
        "train.checkpoint_every=2", "train.sample_every=1",
    ])
    trainer = Trainer(cfg, tensorboard=False)
    watch = WeightWatch(trainer.sampler.pipe)
    state = trainer.train()
    assert state.epoch == 2 and state.global_step > 0
    lora1 = watch.assert_trained()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/kl"]) for r in rows)
    assert rows[0]["rollout/nfe"] == 4 * (3 + 2 * (3 + 2 + 1)) and rows[0]["rollout/transitions"] == 24
    assert all(r["reward/frame_jpeg_compressibility_invalid"] == 0 for r in rows)
    assert (out / "samples" / "epoch_00000.png").is_file()  # one frame strip per video

    # the checkpoint loads into the stock WanPipeline: trainable/ reproduces the EMA LoRA (the recipe trains
    # with EMA), trainable_raw/ the trained one
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    saved = load_file(str(ckpt / "trainable" / LORA_WEIGHTS_NAME))
    stock = WanPipeline.from_pretrained(resolve_pretrained(cfg.backbone.pretrained))
    trained = {plain_lora_name(n): v for n, v in lora1.items()}
    for folder, expected in (("trainable", ema_lora_tensors(trainer)), ("trainable_raw", trained)):
        stock.load_lora_weights(ckpt / folder)
        loaded = {plain_lora_name(n): p for n, p in stock.transformer.named_parameters() if "lora_" in n}
        assert len(loaded) == len(expected) == len(saved)
        assert all(torch.equal(loaded[n].detach(), v) for n, v in expected.items()), folder
        stock.unload_lora_weights()


