"""Stable Audio 3 text-to-audio adapter: the ODE against diffusers' StableAudio3Pipeline, ping-pong as CPS, branching
rollouts and log-prob recomputation, LoRA without diffusers' adapter mixin (reference, checkpoints), configuration
errors and a tiny TempFlow-GRPO training run (tiny random pipelines saved and loaded, offline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import StableAudio3Pipeline
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file
from weight_checks import WeightWatch, ema_lora_tensors, plain_lora_name

from alignkit.checkpoint import latest_checkpoint
from alignkit.config import BackboneConfig, ConfigError, LoraConfig
from alignkit.media.audio import read_wav
from alignkit.metrics import read_metrics
from alignkit.modalities.audio.stable_audio import StableAudio3Sampler, dit_linear_names
from alignkit.modalities.audio.tiny import TINY_MAX_DURATION, TINY_SAMPLE_RATE, build_tiny_stable_audio3_pipeline
from alignkit.modalities.diffusers_common import LORA_WEIGHTS_NAME, resolve_pretrained
from alignkit.plans import Branch, Deterministic
from alignkit.registry import SAMPLERS
from alignkit.rollout import RolloutEngine, RolloutRequest, sample_generator
from alignkit.types import index_batch

PROMPTS = ["a dog barking", "rain on a tin roof"]
N_STEPS, DURATION = 4, 0.5
LATENT = (8, 63)  # [D, L]: ceil(0.5 s * 8000 Hz / 64)
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


@pytest.mark.parametrize(("guidance", "negative"), [(3.0, "static noise"), (1.0, "")])
def test_ode_rollout_equals_stable_audio3_pipeline(sa3_folder: Path, guidance: float, negative: str) -> None:
    sampler = _sampler(sa3_folder, guidance_scale=guidance, negative_prompt=negative)
    assert sampler.modality == "audio" and sampler.do_cfg == (guidance > 1)
    assert sampler.sample_rate == TINY_SAMPLE_RATE and sampler.latent_shape == LATENT
    ode = Deterministic().schedule(N_STEPS, 0, torch.Generator())
    rollout = RolloutEngine(sampler, batch_size=2).run(_request(), ode)
    assert rollout.nfe == 2 * N_STEPS and len(rollout.transitions) == 0
    assert rollout.final_state.shape == (2, *LATENT)
    assert rollout.samples.shape == (2, *AUDIO) and rollout.samples.dtype == torch.float32
    assert rollout.samples.min() >= -1 and rollout.samples.max() <= 1
    assert not torch.allclose(rollout.samples[0], rollout.samples[1], atol=1e-3)  # the audio depends on the latent

    pipe = _pipeline(sa3_folder)
    latents = sampler.initial_state([sample_generator(7, 0, i, 0) for i in range(2)])
    kw = dict(prompt=PROMPTS, negative_prompt=negative or None, latents=latents, num_inference_steps=N_STEPS,
              guidance_scale=guidance, duration=DURATION)
    torch.testing.assert_close(rollout.final_state, pipe(**kw, output_type="latent").audios, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rollout.samples, pipe(**kw).audios, rtol=1e-5, atol=1e-5)


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


def test_branching_rollout_shapes_nfe_and_log_probs(sa3_folder: Path) -> None:
    sampler = _sampler(sa3_folder)
    schedule = Branch(children=2).schedule(N_STEPS, 0, torch.Generator().manual_seed(0))
    rollout = RolloutEngine(sampler, batch_size=16).run(_request(num_seeds=2), schedule)
    trunks, branch_steps, k = 4, [0, 1, 2], 2
    n = trunks * len(branch_steps) * k
    assert len(rollout.keys) == n and rollout.samples.shape == (n, *AUDIO)
    assert rollout.nfe == trunks * schedule.nfe_per_seed(N_STEPS)
    tr = rollout.transitions
    assert tr.state.shape == tr.next_state.shape == (n, *LATENT)
    assert torch.equal(tr.step, rollout.keys.branch_step) and (tr.scale > 0).all()
    torch.testing.assert_close(tr.scale, sampler.transition_std()[tr.step])
    rows = torch.arange(0, n, 5)
    cond = index_batch(rollout.cond, rollout.keys.prompt_index[tr.sample_index[rows]])
    with torch.no_grad():
        again = sampler.transition(tr.state[rows], tr.step[rows], cond, stochastic=True)
    torch.testing.assert_close(again.log_prob(tr.next_state[rows]), tr.log_prob[rows], rtol=0, atol=1e-5)


def test_prompts_are_encoded_once_and_the_negative_prompt_once_per_sampler(sa3_folder: Path) -> None:
    sampler = _sampler(sa3_folder, negative_prompt="static noise")
    rows: list[int] = []
    sampler.pipe.text_encoder.register_forward_hook(lambda _m, args, _o: rows.append(int(args[0].shape[0])))
    first = sampler.encode_prompts(PROMPTS)
    second = sampler.encode_prompts(PROMPTS[::-1])
    assert rows == [2, 1, 2]  # prompts, the negative prompt (once), prompts again
    # 16 tokens of the tiny tokenizer + the duration token, T5Gemma width 32
    assert first["prompt_embeds"].shape == first["negative_prompt_embeds"].shape == (2, 17, 32)
    assert first["attention_mask"].shape == (2, 17) and first["global_embeds"].shape == (2, 32)
    torch.testing.assert_close(second["prompt_embeds"], first["prompt_embeds"].flip(0))
    torch.testing.assert_close(second["negative_prompt_embeds"], first["negative_prompt_embeds"])


def test_lora_reference_and_checkpoint_without_diffusers_adapter_mixin(sa3_folder: Path, tmp_path: Path) -> None:
    """The SA3 DiT gets LoRA through peft directly: the reference context is the base model, and the saved
    checkpoint loads into a stock transformer with peft and into a fresh sampler."""
    sampler = _sampler(sa3_folder, guidance_scale=1.0)
    module = sampler.trainable_module()
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"to_qkv", "to_q", "to_kv", "to_out"}
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.5)  # LoRA B starts at zero: make the adapter change the output
    cond = sampler.encode_prompts(PROMPTS)
    x, step = sampler.initial_state([torch.Generator().manual_seed(i) for i in range(2)]), torch.tensor([0, 2])
    base = _pipeline(sa3_folder).transformer
    with torch.no_grad():
        adapted = sampler.velocity(x, step, cond)
        with sampler.reference():
            ref = sampler.velocity(x, step, cond)
        again = sampler.velocity(x, step, cond)
        plain = base(x, sampler.model_timestep(step), encoder_hidden_states=cond["prompt_embeds"],
                     global_hidden_states=cond["global_embeds"], encoder_attention_mask=cond["attention_mask"],
                     return_dict=False)[0]
    torch.testing.assert_close(ref, plain, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(adapted, ref, atol=1e-3)
    torch.testing.assert_close(again, adapted)  # the adapter is back on after the context
    assert all(p.requires_grad for n, p in module.named_parameters() if n in names)

    sampler.save_trainable(tmp_path)
    saved = load_file(str(tmp_path / LORA_WEIGHTS_NAME))
    assert len(saved) == len(names) and all(k.startswith("transformer.") for k in saved)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == sorted(TARGETS)
    inject_adapter_in_model(PeftLoraConfig.from_pretrained(str(tmp_path)), base)
    result = set_peft_model_state_dict(base, {k.removeprefix("transformer."): v for k, v in saved.items()})
    assert not result.unexpected_keys
    with torch.no_grad():
        stock = base(x, sampler.model_timestep(step), encoder_hidden_states=cond["prompt_embeds"],
                     global_hidden_states=cond["global_embeds"], encoder_attention_mask=cond["attention_mask"],
                     return_dict=False)[0]
    torch.testing.assert_close(stock, adapted, rtol=1e-5, atol=1e-6)
    fresh = _sampler(sa3_folder, guidance_scale=1.0)
    fresh.load_trainable(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh.velocity(x, step, cond), adapted, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients(sa3_folder: Path) -> None:
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)  # peft draws LoRA A from the global RNG
        sampler = _sampler(sa3_folder, gradient_checkpointing=ckpt)
        with torch.no_grad():
            for n, p in sampler.trainable_module().named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
        cond = sampler.encode_prompts(PROMPTS)
        gens = [sample_generator(1, i) for i in range(2)]
        x, step = sampler.initial_state(gens), torch.tensor([1, 2])
        with torch.no_grad():
            nxt = sampler.transition(x, step, cond, stochastic=True).sample(gens)
        sampler.train(True)
        sampler.transition(x, step, cond, stochastic=True).log_prob(nxt).sum().backward()
        grads.append({n: p.grad.clone() for n, p in sampler.trainable_module().named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    assert any(float(g.abs().max()) > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


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


def test_bad_audio_settings_fail_before_loading(tmp_path: Path) -> None:
    cfg = _backbone(tmp_path / "absent", max_sequence_length=512, vae_tiling=True,
                    lora=LoraConfig(rank=4, alpha=8, target_modules=["to_qkv", "to_k", "to_out.0"]),
                    options={"duration": -1.0, "sample_rate": 44.1, "logsnr_min": 3.0, "shift": 2})
    problems = StableAudio3Sampler.check_config(cfg)
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "backbone.options has unknown keys ['shift']" in problems[0] and "duration" in problems[0]
    assert "backbone.options.duration=-1.0" in problems[1] and "> 0" in problems[1]
    assert "backbone.options.sample_rate=44.1" in problems[2] and "44100" in problems[2]
    assert "logsnr_min=3.0" in problems[3] and "logsnr_max=2.0" in problems[3]
    assert "backbone.max_sequence_length=512" in problems[4] and "256" in problems[4]
    assert "backbone.vae_tiling=true" in problems[5] and "set backbone.vae_tiling=false" in problems[5]
    assert "backbone.lora.target_modules" in problems[6] and "['to_k', 'to_out.0']" in problems[6]
    assert "to_qkv, to_q, to_kv, to_out" in problems[6]
    with pytest.raises(ConfigError, match=r"options.duration=-1.0"):  # not FileNotFoundError: nothing was loaded
        StableAudio3Sampler.from_config(cfg, step_kind="flow_grpo", noise_level=0.7, device="cpu")


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

    # the checkpoint holds the EMA LoRA (trainable/, the recipe trains with EMA) and the trained one
    # (trainable_raw/), each loadable with peft into the stock transformer
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    trained = {plain_lora_name(n): v for n, v in lora1.items()}
    for folder, expected in (("trainable", ema_lora_tensors(trainer)), ("trainable_raw", trained)):
        saved = load_file(str(ckpt / folder / LORA_WEIGHTS_NAME))
        stock = StableAudio3Pipeline.from_pretrained(resolve_pretrained(cfg.backbone.pretrained)).transformer
        inject_adapter_in_model(PeftLoraConfig.from_pretrained(str(ckpt / folder)), stock)
        set_peft_model_state_dict(stock, {k.removeprefix("transformer."): v for k, v in saved.items()})
        loaded = {plain_lora_name(n): p for n, p in stock.named_parameters() if "lora_" in n}
        assert len(loaded) == len(expected) == len(saved)
        assert all(torch.equal(loaded[n].detach(), v) for n, v in expected.items()), folder


def test_stable_audio_3_is_a_registered_sampler() -> None:
    assert SAMPLERS.get("stable_audio_3") is StableAudio3Sampler
