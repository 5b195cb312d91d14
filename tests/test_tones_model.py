"""The tones text-to-audio model: shipped weights loaded by the stock diffusers / transformers classes and served by the
Stable Audio 3 adapter, their held-out ToneEval against a window a random model fails, the pretraining command and a
short run of its TempFlow-GRPO recipe with wav previews."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderSAME, FlowMatchEulerDiscreteScheduler, StableAudio3DiTModel, StableAudio3Pipeline
from safetensors.torch import load_file
from transformers import T5GemmaEncoderModel
from weight_checks import WeightWatch

from alignkit.compose import load_run_config
from alignkit.config import BackboneConfig, LoraConfig
from alignkit.media.audio import read_wav
from alignkit.metrics import read_metrics
from alignkit.modalities.audio.stable_audio import StableAudio3Sampler
from alignkit.modalities.diffusers_common import resolve_pretrained
from alignkit.plans import Deterministic
from alignkit.reward_set import RewardSet, RewardTerm
from alignkit.rollout import RolloutEngine, RolloutRequest, sample_generator
from alignkit.trainer import Trainer, evaluate
from alignkit.worlds.tones.model import WEIGHTS_DIR, build_tones_pipeline
from alignkit.worlds.tones.pretrain import main as pretrain_main
from alignkit.worlds.tones.prompts import tones_source
from alignkit.worlds.tones.toneeval import ToneEval
from alignkit.worlds.tones.world import NUM_SAMPLES, SAMPLE_RATE

RECIPE = "tones_tempflow_grpo"
LATENT = (32, 250)  # [D, L] of a 1 s clip: one latent frame per 32-sample patch
WINDOW = (0.2, 0.7)
"""Held-out partial ToneEval of the shipped model on the first 8 held-out prompts x 2 noises (recipe's eval seed):
0.26 for the shipped weights; 0 at random initialisation, 0.16 (on the recipe's 32 prompts) for an earlier model
whose decoder filled every clip with a steady tone."""


def _backbone(pretrained: str | Path = "builtin:tones", **kw: object) -> BackboneConfig:
    cfg = load_run_config(RECIPE).backbone
    base = dict(name="stable_audio_3", pretrained=str(pretrained), num_steps=cfg.num_steps,
                guidance_scale=cfg.guidance_scale, options=dict(cfg.options),
                lora=LoraConfig(rank=4, alpha=8, target_modules=list(cfg.lora.target_modules)))
    base.update(kw)
    return BackboneConfig(**base)  # type: ignore[arg-type]


def _sampler(pretrained: str | Path = "builtin:tones", **kw: object) -> StableAudio3Sampler:
    return StableAudio3Sampler.from_config(_backbone(pretrained, **kw), step_kind="flow_grpo", noise_level=0.7,
                                           device="cpu")


def _heldout_partial(sampler: StableAudio3Sampler) -> float:
    cfg = load_run_config(RECIPE)
    _, heldout = tones_source(cfg.prompts)
    rewards = RewardSet([RewardTerm("partial", ToneEval("partial", SAMPLE_RATE), 1.0)])
    _, table = evaluate(sampler, rewards, heldout, seed=cfg.eval.seed, seeds_per_prompt=2, batch_size=16, limit=8)
    return float(table.raw["partial"].mean())


def test_builtin_tones_is_the_shipped_folder_of_stock_classes() -> None:
    assert Path(resolve_pretrained("builtin:tones")) == WEIGHTS_DIR
    total = sum(f.stat().st_size for f in WEIGHTS_DIR.rglob("*.safetensors"))
    assert total < 8e6, f"shipped weights are {total / 1e6:.1f} MB"
    assert not list(WEIGHTS_DIR.rglob("*.bin")) and not list(WEIGHTS_DIR.rglob("*.pt"))  # safetensors only
    index = json.loads((WEIGHTS_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableAudio3Pipeline" and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    pipe = StableAudio3Pipeline.from_pretrained(WEIGHTS_DIR)
    assert isinstance(pipe.transformer, StableAudio3DiTModel) and isinstance(pipe.vae, AutoencoderSAME)
    assert isinstance(pipe.text_encoder, T5GemmaEncoderModel)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.vae.config.sampling_rate == SAMPLE_RATE and pipe.vae.config.audio_channels == 1


def test_shipped_model_ode_is_the_stock_pipeline() -> None:
    """The adapter's deterministic rollout equals ``StableAudio3Pipeline(...)`` from the same initial noise."""
    sampler = _sampler(num_steps=4)
    assert sampler.latent_shape == LATENT and sampler.sample_rate == SAMPLE_RATE
    prompts = ["two high beeps", "a long low rising chirp"]
    request = RolloutRequest(prompts=prompts, prompt_ids=[0, 1], metadata=[{}, {}], num_seeds=1, seed=3, iteration=0)
    rollout = RolloutEngine(sampler, batch_size=2).run(request, Deterministic().schedule(4, 0, torch.Generator()))
    assert rollout.samples.shape == (2, 1, NUM_SAMPLES)
    pipe = StableAudio3Pipeline.from_pretrained(WEIGHTS_DIR)
    pipe.set_progress_bar_config(disable=True)
    latents = sampler.initial_state([sample_generator(3, 0, i, 0) for i in range(2)])
    kw = dict(prompt=prompts, latents=latents, num_inference_steps=4, guidance_scale=sampler.cfg.guidance_scale,
              duration=1.0)
    with torch.no_grad():
        final = pipe(**kw, output_type="latent").audios
        audio = pipe(**kw, output_type="pt").audios
    torch.testing.assert_close(rollout.final_state, final.float(), rtol=1e-4, atol=1e-4)
    # The decoder multiplies latents by the bottleneck's running_std (hundreds), so float-rounding differences of
    # the two batchings reach the waveform amplified; 2e-3 is -54 dBFS, far below the tones (about -10 dBFS).
    torch.testing.assert_close(rollout.samples, audio.float().clamp(-1, 1), rtol=0, atol=2e-3)


def test_shipped_model_scores_held_out_prompts_inside_a_window_a_random_model_fails(tmp_path: Path) -> None:
    """Deterministic samples of 8 held-out prompts x 2 noises. The shipped model scores inside :data:`WINDOW`; the
    same architecture at its random initialisation scores 0 (its decoder makes no tones), below the window."""
    partial = _heldout_partial(_sampler())
    assert WINDOW[0] < partial < WINDOW[1], partial
    info = json.loads((WEIGHTS_DIR / "pretrain_info.json").read_text())
    assert WINDOW[0] < info["heldout_toneeval_partial"] < WINDOW[1], info
    build_tones_pipeline(seed=0).save_pretrained(tmp_path, safe_serialization=True)
    assert _heldout_partial(_sampler(tmp_path)) < WINDOW[0]


def test_pretraining_command_is_reproducible_and_loads(tmp_path: Path) -> None:
    args = ["--seed", "3", "--vae-steps", "2", "--vae-batch", "2", "--steps", "3", "--batch", "4", "--pool", "4",
            "--width", "32", "--layers", "1", "--threads", "1", "--no-eval"]
    pretrain_main([*args, "--out", str(tmp_path / "a")])
    pretrain_main([*args, "--out", str(tmp_path / "b")])
    a = json.loads((tmp_path / "a" / "pretrain_info.json").read_text())
    assert math.isfinite(a["flow_loss_ema"]) and a["steps"] == 3 and a["threads"] == 1
    files = sorted((tmp_path / "a").rglob("*.safetensors"))
    assert len(files) == 4  # transformer, vae, text encoder, duration embedder
    for f in files:
        x, y = load_file(str(f)), load_file(str(tmp_path / "b" / f.relative_to(tmp_path / "a")))
        assert all(torch.equal(x[k], y[k]) for k in x), f
    vae = load_file(str(tmp_path / "a" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert vae["bottleneck.running_std"].item() == pytest.approx(a["latent_std"])  # latents scaled to unit std
    sampler = _sampler(tmp_path / "a", num_steps=2)
    assert sampler.decode(sampler.initial_state([torch.Generator().manual_seed(0)])).shape == (1, 1, NUM_SAMPLES)
    with pytest.raises(SystemExit):
        pretrain_main(["--out", str(tmp_path / "c"), "--steps", "0"])


def test_recipe_composes_with_toneeval_partial_and_strict() -> None:
    cfg = load_run_config(RECIPE)
    assert cfg.backbone.pretrained == "builtin:tones" and cfg.prompts.source == "tones"
    assert cfg.algo.name == "tempflow_grpo" and cfg.eval.before_after
    assert cfg.reward["toneeval"].kwargs == {"mode": "partial", "sample_rate": 8000}
    assert cfg.eval.rewards["toneeval_strict"].kwargs == {"mode": "strict", "sample_rate": 8000}


@pytest.mark.integration
def test_tones_recipe_trains_lora_only_and_writes_wav_previews(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = load_run_config(RECIPE, [
        f"output_dir={out}", "train.epochs=2", "train.prompts_per_epoch=1", "backbone.num_steps=3",
        "algo.plan.options.children=2", "train.rollout_batch_size=16", "train.train_batch_size=8",
        "train.checkpoint_every=2", "train.sample_every=1", "eval.every=0", "eval.num_prompts=2",
        "eval.seeds_per_prompt=1", "eval.batch_size=2",
    ])
    trainer = Trainer(cfg, tensorboard=False)
    watch = WeightWatch(trainer.sampler.pipe)
    state = trainer.train()
    assert state.epoch == 2 and state.global_step > 0
    watch.assert_trained()
    rows = read_metrics(out / "metrics.jsonl")
    trained = [r for r in rows if r["epoch"] > 0]
    assert len(trained) == 2 and all(math.isfinite(r["train/loss"]) for r in trained)
    assert "eval/toneeval" in rows[0] and "eval/toneeval_strict" in rows[-1]
    assert all(r["reward/toneeval_invalid"] == 0 for r in trained)
    for name in ("eval_before", "eval_after"):
        assert (out / "samples" / f"{name}.png").is_file()
        files = sorted((out / "samples" / name).glob("*.wav"))
        assert len(files) == 2, (name, files)
        wave, rate = read_wav(files[0])
        assert rate == SAMPLE_RATE and wave.shape == (1, NUM_SAMPLES)
