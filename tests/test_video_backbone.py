"""Wan text-to-video adapter: the flow math on 5-D latents, the ODE against diffusers' WanPipeline, branching
rollouts, configuration errors and a tiny TempFlow-GRPO training run (tiny random pipelines, offline)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline
from safetensors.torch import load_file
from weight_checks import WeightWatch, ema_lora_tensors, plain_lora_name

from alignkit.checkpoint import latest_checkpoint
from alignkit.config import BackboneConfig, ConfigError, LoraConfig
from alignkit.flow import GaussianStep, flow_grpo_step
from alignkit.metrics import read_metrics
from alignkit.modalities.diffusers_common import LORA_WEIGHTS_NAME, resolve_pretrained
from alignkit.modalities.video.tiny import TINY_WAN_FLOW_SHIFT, build_tiny_wan_pipeline
from alignkit.modalities.video.wan import WanSampler, flow_euler_scheduler
from alignkit.plans import Branch, Deterministic
from alignkit.registry import SAMPLERS
from alignkit.rollout import RolloutEngine, RolloutRequest, sample_generator
from alignkit.types import index_batch

PROMPTS = ["a red circle", "two blue squares"]
N_STEPS, FRAMES, SIZE = 4, 9, 32
LATENT = (16, 3, 4, 4)  # [C, f, h, w] of a 9-frame 32 x 32 clip



@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Wan pipeline with the flow-matching Euler scheduler, saved with ``save_pretrained``."""
    folder = tmp_path_factory.mktemp("wan")
    build_tiny_wan_pipeline(seed=0, scheduler="euler").save_pretrained(folder, safe_serialization=True)
    return folder


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


@pytest.mark.parametrize(("guidance", "negative"), [(5.0, "blurry, low quality"), (1.0, "")])
def test_ode_rollout_equals_wan_pipeline(wan_folder: Path, guidance: float, negative: str) -> None:
    sampler = _sampler(wan_folder, guidance_scale=guidance, negative_prompt=negative)
    assert sampler.modality == "video" and sampler.do_cfg == (guidance > 1)
    engine = RolloutEngine(sampler, batch_size=2)
    rollout = engine.run(_request(), Deterministic().schedule(N_STEPS, 0, torch.Generator()))
    assert rollout.nfe == 2 * N_STEPS and len(rollout.transitions) == 0
    assert rollout.final_state.shape == (2, *LATENT)
    assert rollout.samples.shape == (2, FRAMES, 3, SIZE, SIZE)
    assert rollout.samples.min() >= 0 and rollout.samples.max() <= 1

    pipe = WanPipeline.from_pretrained(wan_folder)
    pipe.set_progress_bar_config(disable=True)
    latents = sampler.initial_state([sample_generator(7, 0, i, 0) for i in range(2)])
    kw = dict(prompt=PROMPTS, negative_prompt=negative or None, latents=latents, num_inference_steps=N_STEPS,
              guidance_scale=guidance, height=SIZE, width=SIZE, num_frames=FRAMES, max_sequence_length=16)
    ref_latents = pipe(**kw, output_type="latent").frames
    torch.testing.assert_close(rollout.final_state, ref_latents, rtol=1e-5, atol=1e-5)
    ref_frames = pipe(**kw, output_type="pt").frames
    torch.testing.assert_close(rollout.samples, ref_frames, rtol=1e-5, atol=1e-5)


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


def test_branching_rollout_shapes_nfe_and_log_probs(wan_folder: Path) -> None:
    sampler = _sampler(wan_folder)
    schedule = Branch(children=2).schedule(N_STEPS, 0, torch.Generator().manual_seed(0))
    rollout = RolloutEngine(sampler, batch_size=16).run(_request(num_seeds=2), schedule)
    trunks, branch_steps, k = 4, [0, 1, 2], 2
    n = trunks * len(branch_steps) * k
    assert len(rollout.keys) == n and rollout.samples.shape == (n, FRAMES, 3, SIZE, SIZE)
    assert rollout.final_state.shape == (n, *LATENT)
    # trunk up to and including the last branch step, then every child finishes the steps after its branch step
    assert rollout.nfe == trunks * (max(branch_steps) + 1 + k * sum(N_STEPS - 1 - s for s in branch_steps)) == 60
    tr = rollout.transitions
    assert tr.state.shape == tr.next_state.shape == (n, *LATENT)
    assert torch.equal(tr.step, rollout.keys.branch_step) and (tr.scale > 0).all()
    assert torch.isfinite(tr.log_prob).all()
    rows = torch.arange(4)
    cond = index_batch(rollout.cond, rollout.keys.prompt_index[tr.sample_index[rows]])
    with torch.no_grad():
        again = sampler.transition(tr.state[rows], tr.step[rows], cond, stochastic=True)
    torch.testing.assert_close(again.log_prob(tr.next_state[rows]), tr.log_prob[rows], rtol=0, atol=1e-5)


def test_prompts_are_encoded_once_and_the_negative_prompt_once_per_sampler(wan_folder: Path) -> None:
    sampler = _sampler(wan_folder, negative_prompt="blurry")
    rows: list[int] = []
    sampler.pipe.text_encoder.register_forward_hook(lambda _m, args, _o: rows.append(int(args[0].shape[0])))
    first = sampler.encode_prompts(PROMPTS)
    second = sampler.encode_prompts(PROMPTS[::-1])
    assert rows == [2, 1, 2]  # prompts, the negative prompt (once), prompts again
    assert first["prompt_embeds"].shape == first["negative_prompt_embeds"].shape == (2, 16, 32)
    torch.testing.assert_close(second["prompt_embeds"], first["prompt_embeds"].flip(0))
    torch.testing.assert_close(second["negative_prompt_embeds"], first["negative_prompt_embeds"])


def test_gradient_checkpointing_gives_the_same_gradients(wan_folder: Path) -> None:
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        sampler = _sampler(wan_folder, gradient_checkpointing=ckpt)
        cond = sampler.encode_prompts(PROMPTS)
        gens = [sample_generator(1, i) for i in range(2)]
        x, step = sampler.initial_state(gens), torch.tensor([1, 2])
        with torch.no_grad():
            nxt = sampler.transition(x, step, cond, stochastic=True).sample(gens)
        sampler.train(True)
        sampler.transition(x, step, cond, stochastic=True).log_prob(nxt).sum().backward()
        grads.append({n: p.grad.clone() for n, p in sampler.trainable_module().named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert all(".attn1." in n or ".attn2." in n for n in grads[0])  # LoRA on self- and cross-attention
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


def test_bad_video_settings_fail_before_loading(tmp_path: Path) -> None:
    cfg = _backbone(tmp_path / "absent", num_frames=10, height=40, options={"shift": 3})
    problems = WanSampler.check_config(cfg)
    assert len(problems) == 3
    assert "backbone.num_frames=10" in problems[0] and "4k+1" in problems[0] and "9 or 13" in problems[0]
    assert "backbone.height=40" in problems[1] and "multiple of 16" in problems[1]
    assert "backbone.options" in problems[2] and "flow_shift" in problems[2]
    with pytest.raises(ConfigError, match=r"num_frames=10"):  # not FileNotFoundError: nothing was loaded
        WanSampler.from_config(cfg, step_kind="flow_grpo", noise_level=0.7, device="cpu")


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


def test_wan_is_a_registered_sampler() -> None:
    assert SAMPLERS.get("wan") is WanSampler
