"""SD3 and FLUX adapters against the diffusers pipelines they wrap."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from alignkit.config import BackboneConfig, LoraConfig
from alignkit.modalities.image.flux import FluxSampler
from alignkit.modalities.image.sd3 import SD3Sampler
from alignkit.modalities.image.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from alignkit.plans import AllStochastic, Deterministic
from alignkit.rollout import RolloutEngine, RolloutRequest

PROMPTS = ["a red circle", "two blue squares"]


def _backbone(name: str, folder: Path, **kw: object) -> BackboneConfig:
    base = dict(name=name, pretrained=str(folder), height=32, width=32, num_steps=4, max_sequence_length=16,
                lora=LoraConfig(rank=4, alpha=8))
    base.update(kw)
    return BackboneConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd3")
    build_tiny_sd3_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flux")
    build_tiny_flux_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


def _ode_rollout(sampler, prompts):
    engine = RolloutEngine(sampler, batch_size=len(prompts))
    req = RolloutRequest(prompts=prompts, prompt_ids=list(range(len(prompts))), metadata=[{}] * len(prompts),
                         num_seeds=1, seed=7, iteration=0)
    return engine.run(req, Deterministic().schedule(sampler.num_steps, 0, torch.Generator()))


def _initial(sampler, n):
    from alignkit.rollout import sample_generator

    return sampler.initial_state([sample_generator(7, 0, i, 0) for i in range(n)])


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_sd3_ode_rollout_equals_pipeline(sd3_folder: Path, guidance: float) -> None:
    sampler = SD3Sampler.from_config(_backbone("sd3", sd3_folder, guidance_scale=guidance),
                                     step_kind="flow_grpo", noise_level=0.7, device="cpu")
    rollout = _ode_rollout(sampler, PROMPTS)
    assert rollout.nfe == 2 * 4 and len(rollout.transitions) == 0
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    latents = _initial(sampler, 2)
    kw = dict(prompt=PROMPTS, latents=latents, num_inference_steps=4, guidance_scale=guidance, height=32,
              width=32, max_sequence_length=16)
    ref_latents = pipe(**kw, output_type="latent").images
    ref_images = pipe(**kw, output_type="pt").images
    torch.testing.assert_close(rollout.final_state, ref_latents, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rollout.samples, ref_images, rtol=1e-5, atol=1e-5)


def test_flux_ode_rollout_equals_pipeline(flux_folder: Path) -> None:
    sampler = FluxSampler.from_config(_backbone("flux", flux_folder, guidance_scale=3.5),
                                      step_kind="flow_grpo", noise_level=0.7, device="cpu")
    rollout = _ode_rollout(sampler, PROMPTS)
    pipe = FluxPipeline.from_pretrained(flux_folder)
    pipe.set_progress_bar_config(disable=True)
    latents = _initial(sampler, 2)
    ref = pipe(prompt=PROMPTS, latents=latents, num_inference_steps=4, guidance_scale=3.5, height=32, width=32,
               max_sequence_length=16, output_type="pt").images
    torch.testing.assert_close(rollout.samples, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step_kind", ["flow_grpo", "cps", "dance_grpo"])
def test_sde_rollout_stores_every_step_but_the_last(sd3_folder: Path, step_kind: str) -> None:
    sampler = SD3Sampler.from_config(_backbone("sd3", sd3_folder), step_kind=step_kind, noise_level=0.5,
                                     device="cpu")
    engine = RolloutEngine(sampler, batch_size=4)
    req = RolloutRequest(prompts=PROMPTS, prompt_ids=[0, 1], metadata=[{}, {}], num_seeds=2, seed=3, iteration=1)
    rollout = engine.run(req, AllStochastic().schedule(4, 0, torch.Generator()))
    tr = rollout.transitions
    assert len(tr) == 4 * 3 and sorted(set(tr.step.tolist())) == [0, 1, 2]
    assert torch.isfinite(tr.log_prob).all() and (tr.scale > 0).all()
    # the stored log-prob is the transition's own log-density: recomputing it gives the same value
    idx = torch.arange(4)
    from alignkit.types import index_batch

    dist = sampler.transition(tr.state[idx], tr.step[idx], index_batch(rollout.cond, rollout.keys.prompt_index[
        tr.sample_index[idx]]), stochastic=True)
    torch.testing.assert_close(dist.log_prob(tr.next_state[idx]), tr.log_prob[idx], rtol=0, atol=1e-5)
    # same seeds -> same rollout; the noise of a sample does not depend on the batch layout
    again = RolloutEngine(sampler, batch_size=1).run(req, AllStochastic().schedule(4, 0, torch.Generator()))
    torch.testing.assert_close(again.final_state, rollout.final_state, rtol=1e-5, atol=1e-5)


def test_missing_folder_and_bad_lora_targets(sd3_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"backbone\.pretrained"):
        SD3Sampler.from_config(_backbone("sd3", tmp_path / "nope"), step_kind="ode", noise_level=0.7, device="cpu")
    with pytest.raises(ValueError, match="target_modules"):
        SD3Sampler.from_config(_backbone("sd3", sd3_folder, lora=LoraConfig(target_modules=["no_such_layer"])),
                               step_kind="ode", noise_level=0.7, device="cpu")


def _grad_of_log_prob(sampler) -> dict[str, torch.Tensor]:
    """Gradient of one stochastic transition's log-prob w.r.t. the trainable parameters."""
    from alignkit.rollout import sample_generator

    cond = sampler.encode_prompts(PROMPTS)
    gens = [sample_generator(1, i) for i in range(2)]
    x = sampler.initial_state(gens)
    step = torch.tensor([1, 2])
    with torch.no_grad():
        nxt = sampler.transition(x, step, cond, stochastic=True).sample(gens)
    sampler.train(True)
    sampler.transition(x, step, cond, stochastic=True).log_prob(nxt).sum().backward()
    sampler.train(False)
    return {n: p.grad.clone() for n, p in sampler.trainable_module().named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients(sd3_folder: Path) -> None:
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        sampler = SD3Sampler.from_config(_backbone("sd3", sd3_folder, gradient_checkpointing=ckpt),
                                         step_kind="flow_grpo", noise_level=0.7, device="cpu")
        grads.append(_grad_of_log_prob(sampler))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


def test_reference_is_the_base_model(sd3_folder: Path) -> None:
    """With the adapter disabled (LoRA) or a frozen copy (full fine-tuning), the reference ignores updates."""
    from alignkit.rollout import sample_generator

    for lora in (True, False):
        sampler = SD3Sampler.from_config(_backbone("sd3", sd3_folder, lora=LoraConfig(enabled=lora, rank=4)),
                                         step_kind="flow_grpo", noise_level=0.7, device="cpu")
        cond = sampler.encode_prompts(PROMPTS)
        gens = [sample_generator(2, i) for i in range(2)]
        x, step = sampler.initial_state(gens), torch.tensor([0, 3])
        with torch.no_grad():
            before = sampler.transition(x, step, cond, stochastic=True)
            for p in sampler.trainable_parameters():
                p.add_(0.05 * torch.randn_like(p))
            after = sampler.transition(x, step, cond, stochastic=True)
            with sampler.reference():
                ref = sampler.transition(x, step, cond, stochastic=True)
        assert not torch.allclose(after.mean, before.mean)
        torch.testing.assert_close(ref.mean, before.mean)
        assert (after.kl(ref) > 0).all() and torch.equal(before.kl(ref), torch.zeros(2))
