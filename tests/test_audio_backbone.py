"""Stable Audio 3 specifics: ping-pong as CPS, wav previews, LoRA target names, settings the checkpoint cannot sample
and a tiny TempFlow-GRPO training run (tiny random pipelines saved and loaded, offline). The sampler contract (ODE
against StableAudio3Pipeline, branching, reference, export, configuration errors) is in tests/conformance."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers import StableAudio3Pipeline
from diffusers.utils.torch_utils import randn_tensor
from peft import PeftModel
from safetensors.torch import load_file
from weight_checks import WeightWatch, ema_lora_tensors, plain_lora_name

from alignkit.checkpoint import latest_checkpoint
from alignkit.config import BackboneConfig, ConfigError, LoraConfig
from alignkit.media.audio import read_wav
from alignkit.metrics import read_metrics
from alignkit.modalities.audio.stable_audio import StableAudio3Sampler, dit_linear_names
from alignkit.modalities.audio.tiny import TINY_MAX_DURATION, TINY_SAMPLE_RATE, build_tiny_stable_audio3_pipeline
from alignkit.modalities.diffusers_common import resolve_pretrained
from alignkit.modalities.policy import ADAPTER_WEIGHTS_NAME
from alignkit.plans import Branch, Deterministic
from alignkit.rollout import RolloutEngine, RolloutRequest

PROMPTS = ["a dog barking", "rain on a tin roof"]
N_STEPS, DURATION = 4, 0.5
AUDIO = (2, 4000)  # [C, T]: int(0.5 s * 8000 Hz)
TARGETS = ["to_qkv", "to_q", "to_kv", "to_out"]


@pytest.fixture(scope="module")
def sa3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Audio 3 pipeline (deterministic Euler scheduler), saved with ``save_pretrained``."""
    folder = tmp_path_factory.mktemp("sa3")
    build_tiny_stable_audio3_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


def _backbone(pretrained: str | Path, **kw: object) -> BackboneConfig:
    options = {"duration": DURATION, "sample_rate": TINY_SAMPLE_RATE, **kw.pop("options", {})}  # type: ignore[dict-item]
    base = dict(name="stable_audio_3", pretrained=str(pretrained), num_steps=N_STEPS, guidance_scale=3.0,
                lora=LoraConfig(rank=4, alpha=8, target_modules=TARGETS), options=options)
    base.update(kw)
    return BackboneConfig(**base)  # type: ignore[arg-type]


def _sampler(pretrained: str | Path, step_kind: str = "flow_grpo", noise_level: float = 0.7,
             **kw: object) -> StableAudio3Sampler:
    return StableAudio3Sampler.from_config(_backbone(pretrained, **kw), step_kind=step_kind,
                                           noise_level=noise_level, device="cpu")


def _request(num_seeds: int = 1) -> RolloutRequest:
    return RolloutRequest(prompts=PROMPTS, prompt_ids=[0, 1], metadata=[{}, {}], num_seeds=num_seeds, seed=7,
                          iteration=0)


def _pipeline(folder: Path) -> StableAudio3Pipeline:
    pipe = StableAudio3Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# -- the adapter against diffusers -------------------------------------------------------------------------


def test_distilled_ping_pong_scheduler_is_replaced_and_equals_cps_at_noise_level_one(tmp_path: Path) -> None:
    """The distilled checkpoint's ping-pong step ``(1 - s') x0_hat + s' eps`` is the CPS step at a = 1: same mean,
    std ``s'`` and, for the same generator, the same sample."""
    distilled = build_tiny_stable_audio3_pipeline(seed=1, stochastic_sampling=True)
    distilled.save_pretrained(tmp_path, safe_serialization=True)
    sampler = _sampler(tmp_path, step_kind="cps", noise_level=1.0, guidance_scale=1.0)
    assert not sampler.pipe.scheduler.config.stochastic_sampling  # the ODE / pipe now take Euler steps
    reference = _pipeline(tmp_path)  # the checkpoint as shipped: ping-pong
    assert reference.scheduler.config.stochastic_sampling
    scheduler = reference.scheduler
    scheduler.set_timesteps(sigmas=sampler.sigmas[:-1].tolist())

    cond = sampler.encode_prompts(PROMPTS[:1])
    x = sampler.initial_state([torch.Generator().manual_seed(3)])
    step = 1
    with torch.no_grad():
        dist = sampler.transition(x, torch.tensor([step]), cond, stochastic=True)
        velocity = sampler.velocity(x, torch.tensor([step]), cond)
    sigma_next = float(sampler.sigmas[step + 1])
    torch.testing.assert_close(dist.std, torch.tensor([sigma_next]))
    torch.testing.assert_close(dist.mean, (1 - sigma_next) * (x - sampler.sigmas[step] * velocity), rtol=1e-5,
                               atol=1e-6)
    scheduler._step_index = step
    ping_pong = scheduler.step(velocity, scheduler.timesteps[step], x,
                               generator=torch.Generator().manual_seed(11)).prev_sample
    torch.testing.assert_close(dist.sample([torch.Generator().manual_seed(11)]), ping_pong, rtol=1e-5, atol=1e-6)
    # the noise the scheduler drew is the one GaussianStep.sample draws for a single row
    eps = randn_tensor(x.shape, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(ping_pong, dist.mean + sigma_next * eps, rtol=1e-5, atol=1e-6)


def test_audio_previews_are_written_as_wav_at_the_sample_rate(sa3_folder: Path, tmp_path: Path) -> None:
    sampler = _sampler(sa3_folder, guidance_scale=1.0)
    ode = Deterministic().schedule(N_STEPS, 0, torch.Generator())
    rollout = RolloutEngine(sampler, batch_size=2).run(_request(), ode)
    path = sampler.save_samples(rollout.samples, ["a | r=1", "b | r=2"], tmp_path / "epoch_00001.png")
    assert path == tmp_path / "epoch_00001.png" and path.is_file()
    wave, rate = read_wav(tmp_path / "epoch_00001" / "001.wav")
    assert rate == TINY_SAMPLE_RATE and wave.shape == AUDIO
    torch.testing.assert_close(wave, rollout.samples[1], rtol=0, atol=2 / 2**15)


# -- configuration errors ------------------------------------------------------------------------------------


def test_lora_target_names_come_from_the_real_dit() -> None:
    names = dit_linear_names()
    assert "transformer_blocks.0.self_attn.to_qkv" in names and "transformer_blocks.0.cross_attn.to_kv" in names
    assert not StableAudio3Sampler.check_config(_backbone("unused"))


def test_settings_the_checkpoint_cannot_sample_fail_when_it_loads(sa3_folder: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _sampler(sa3_folder, options={"sample_rate": 44100, "duration": 2 * TINY_MAX_DURATION})
    msg = str(info.value)
    assert "backbone.options.sample_rate=44100" in msg and f"set backbone.options.sample_rate={TINY_SAMPLE_RATE}" in msg
    assert f"duration={2 * TINY_MAX_DURATION}" in msg and f"at most {TINY_MAX_DURATION}" in msg


# -- training ------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_stable_audio_tiny_tempflow_grpo_trains(tmp_path: Path) -> None:
    from alignkit.compose import load_run_config
    from alignkit.trainer import Trainer

    out = tmp_path / "run"
    cfg = load_run_config("stable_audio_tiny_tempflow_grpo", [
        f"output_dir={out}", "train.epochs=2", "train.prompts_per_epoch=2", "algo.num_seeds=2",
        "algo.plan.options.children=2", "train.rollout_batch_size=24", "train.train_batch_size=8",
        "train.checkpoint_every=2", "train.sample_every=1",
    ])
    trainer = Trainer(cfg, tensorboard=False)
    watch = WeightWatch(trainer.sampler.pipe, ("transformer", "vae", "text_encoder", "duration_embedder"))
    state = trainer.train()
    assert state.epoch == 2 and state.global_step > 0
    lora1 = watch.assert_trained()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/kl"]) for r in rows)
    assert all(r["train/grad_norm"] > 0 for r in rows)
    per_seed = Branch(children=2).schedule(4, 0, torch.Generator()).nfe_per_seed(4)
    assert rows[0]["rollout/nfe"] == 4 * per_seed and rows[0]["rollout/transitions"] == 24
    assert all(r["reward/loudness_range_invalid"] == 0 and r["reward/silence_ratio_invalid"] == 0 for r in rows)
    assert (out / "samples" / "epoch_00000.png").is_file()  # amplitude plots

    # the checkpoint holds peft adapter folders: the EMA LoRA (trainable/, the recipe trains with EMA) and the trained
    # one (trainable_raw/); PeftModel adds each to the stock transformer
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    trained = {plain_lora_name(n): v for n, v in lora1.items()}
    for folder, expected in (("trainable", ema_lora_tensors(trainer)), ("trainable_raw", trained)):
        saved = load_file(str(ckpt / folder / ADAPTER_WEIGHTS_NAME))
        stock = StableAudio3Pipeline.from_pretrained(resolve_pretrained(cfg.backbone.pretrained)).transformer
        PeftModel.from_pretrained(stock, str(ckpt / folder))
        loaded = {plain_lora_name(n): p for n, p in stock.named_parameters() if "lora_" in n}
        assert len(loaded) == len(expected) == len(saved)
        assert all(torch.equal(loaded[n].detach(), v) for n, v in expected.items()), folder


