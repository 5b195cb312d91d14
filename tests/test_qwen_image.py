"""Qwen-Image adapter against the diffusers ``QwenImagePipeline`` it wraps, on the tiny offline pipeline."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from diffusers import QwenImagePipeline
from safetensors.torch import load_file
from weight_checks import plain_lora_name

from alignkit.checkpoint import latest_checkpoint
from alignkit.cli import main
from alignkit.config import BackboneConfig, ConfigError, LoraConfig
from alignkit.metrics import read_metrics
from alignkit.modalities.diffusers_common import LORA_WEIGHTS_NAME, resolve_pretrained
from alignkit.modalities.image.qwen_image import QwenImageSampler
from alignkit.modalities.image.tiny import (
    TINY_QWEN_IMAGE_SIZE,
    build_tiny_qwen_image_pipeline,
    build_tiny_qwen_tokenizer,
    load_tiny_pipeline,
    tiny_image_size,
)
from alignkit.plans import AllStochastic, Deterministic
from alignkit.registry import SAMPLERS
from alignkit.rollout import RolloutEngine, RolloutRequest, sample_generator
from alignkit.types import index_batch

# prompts of different token lengths, so the text masks carry padding
PROMPTS = ["a red circle", "two blue squares on the left of a big green tree"]
ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_v_proj"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen_image")
    build_tiny_qwen_image_pipeline(seed=0).save_pretrained(path, safe_serialization=True)
    return path


def _backbone(folder: Path, **kw: object) -> BackboneConfig:
    base = dict(name="qwen_image", pretrained=str(folder), height=32, width=32, num_steps=4, max_sequence_length=32,
                guidance_scale=4.0, negative_prompt=" ", lora=LoraConfig(rank=4, alpha=8, target_modules=ATTENTION))
    base.update(kw)
    return BackboneConfig(**base)  # type: ignore[arg-type]


def _sampler(folder: Path, step_kind: str = "flow_grpo", **kw: object) -> QwenImageSampler:
    return QwenImageSampler.from_config(_backbone(folder, **kw), step_kind=step_kind, noise_level=0.7, device="cpu")


def _pipe(folder: Path) -> QwenImagePipeline:
    pipe = QwenImagePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _request(prompts: list[str], num_seeds: int = 1, seed: int = 7) -> RolloutRequest:
    return RolloutRequest(prompts=prompts, prompt_ids=list(range(len(prompts))), metadata=[{}] * len(prompts),
                          num_seeds=num_seeds, seed=seed, iteration=0)


def _generators(n: int) -> list[torch.Generator]:
    return [sample_generator(7, 0, i, 0) for i in range(n)]  # the rollout's generators of 1 seed per prompt


def _ode(sampler: QwenImageSampler, prompts: list[str] = PROMPTS):
    engine = RolloutEngine(sampler, batch_size=len(prompts))
    return engine.run(_request(prompts), Deterministic().schedule(sampler.num_steps, 0, torch.Generator()))


@pytest.mark.parametrize(("guidance", "height", "width"), [(4.0, 32, 32), (1.0, 32, 32), (4.0, 32, 48)])
def test_ode_rollout_equals_the_stock_pipeline(folder: Path, guidance: float, height: int, width: int) -> None:
    """Noise 0: the rollout is ``QwenImagePipeline.__call__`` for the same generators (true CFG, packing, the
    dynamic-shift schedule with shift_terminal, the 5-D VAE decode), in latents and in images."""
    sampler = _sampler(folder, guidance_scale=guidance, height=height, width=width)
    rollout = _ode(sampler)
    assert rollout.nfe == 2 * 4 and len(rollout.transitions) == 0
    pipe = _pipe(folder)
    kw = dict(prompt=PROMPTS, negative_prompt=" " if guidance > 1 else None, true_cfg_scale=guidance,
              num_inference_steps=4, height=height, width=width, max_sequence_length=32)
    ref_latents = pipe(**kw, generator=_generators(2), output_type="latent").images
    ref_images = pipe(**kw, generator=_generators(2), output_type="pt").images
    torch.testing.assert_close(rollout.final_state, ref_latents, rtol=1e-5, atol=1e-5)
    assert rollout.samples.shape == (2, 3, height, width)
    torch.testing.assert_close(rollout.samples, ref_images, rtol=1e-5, atol=1e-5)


def test_guidance_changes_the_sample(folder: Path) -> None:
    """CFG is live: guided and unguided rollouts differ, and the negative prompt matters."""
    plain = _ode(_sampler(folder, guidance_scale=1.0)).final_state
    guided = _ode(_sampler(folder, guidance_scale=4.0)).final_state
    other_negative = _ode(_sampler(folder, guidance_scale=4.0, negative_prompt="blurry")).final_state
    assert not torch.allclose(plain, guided, atol=1e-4)
    assert not torch.allclose(guided, other_negative, atol=1e-4)


def test_prompts_are_encoded_once_per_rollout(folder: Path) -> None:
    sampler = _sampler(folder)
    calls: list[int] = []
    sampler.pipe.text_encoder.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)
    engine = RolloutEngine(sampler, batch_size=3)
    request = _request(PROMPTS, num_seeds=2)
    rollout = engine.run(request, AllStochastic().schedule(4, 0, torch.Generator()))
    assert rollout.nfe == 2 * 2 * 4
    assert calls == [2, 1]  # the prompts in one batch, then the negative prompt once
    engine.run(request, AllStochastic().schedule(4, 0, torch.Generator()))
    assert calls == [2, 1, 2]  # the negative prompt's encoding is reused
    # the conditioning is the pipeline's own encode_prompt (template, drop index, padding mask)
    emb, mask = _pipe(folder).encode_prompt(PROMPTS, device="cpu", max_sequence_length=32)
    torch.testing.assert_close(rollout.cond["prompt_embeds"], emb)
    assert mask is not None and torch.equal(rollout.cond["prompt_embeds_mask"], mask)
    assert mask[0].sum() < mask[1].sum()


def test_tiny_tokenizer_keeps_the_template_drop_index() -> None:
    """The template's system prefix is exactly the 34 tokens encode_prompt drops, as with the real tokenizer."""
    pipe = build_tiny_qwen_image_pipeline(0)
    tokenizer = pipe.tokenizer
    prefix = pipe.prompt_template_encode.split("{}")[0]
    ids = tokenizer(prefix).input_ids
    assert len(ids) == pipe.prompt_template_encode_start_idx == 34
    assert tokenizer.convert_ids_to_tokens(ids)[-3:] == ["<|im_start|>", "user", "Ċ"]
    assert tokenizer.get_vocab() == build_tiny_qwen_tokenizer().get_vocab()
    assert tiny_image_size(pipe) == TINY_QWEN_IMAGE_SIZE
    assert pipe(prompt="a cat", num_inference_steps=2, output_type="pt").images.shape == (1, 3, 32, 32)


def test_builder_is_deterministic_and_round_trips(tmp_path: Path) -> None:
    a, b = build_tiny_qwen_image_pipeline(3), build_tiny_qwen_image_pipeline(3)
    for name in ("transformer", "text_encoder", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    a.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_tiny_pipeline(tmp_path)
    assert isinstance(loaded, QwenImagePipeline) and tiny_image_size(loaded) == TINY_QWEN_IMAGE_SIZE


def test_log_prob_recomputation_equals_the_stored_log_prob(folder: Path) -> None:
    sampler = _sampler(folder)
    engine = RolloutEngine(sampler, batch_size=4)
    request = _request(PROMPTS, num_seeds=2, seed=3)
    rollout = engine.run(request, AllStochastic().schedule(4, 0, torch.Generator()))
    tr = rollout.transitions
    assert len(tr) == 4 * 3 and sorted(set(tr.step.tolist())) == [0, 1, 2]
    assert torch.isfinite(tr.log_prob).all() and (tr.scale > 0).all()
    cond = index_batch(rollout.cond, rollout.keys.prompt_index[tr.sample_index])
    with torch.no_grad():
        dist = sampler.transition(tr.state, tr.step, cond, stochastic=True)
    torch.testing.assert_close(dist.log_prob(tr.next_state), tr.log_prob, rtol=0, atol=1e-5)
    # a row's transition does not depend on the batch it is in (trailing text padding is dropped per batch)
    again = RolloutEngine(sampler, batch_size=1).run(request, AllStochastic().schedule(4, 0, torch.Generator()))
    torch.testing.assert_close(again.final_state, rollout.final_state, rtol=1e-5, atol=1e-5)


def test_reference_is_the_base_model_with_the_adapter_disabled(folder: Path) -> None:
    sampler = _sampler(folder)
    base = _sampler(folder, lora=LoraConfig(enabled=False))  # the stock transformer, no adapter
    cond = sampler.encode_prompts(PROMPTS)
    gens = [sample_generator(2, i) for i in range(2)]
    x, step = sampler.initial_state(gens), torch.tensor([0, 2])
    with torch.no_grad():
        for p in sampler.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        after = sampler.transition(x, step, cond, stochastic=True)
        with sampler.reference():
            ref = sampler.transition(x, step, cond, stochastic=True)
        stock = base.transition(x, step, cond, stochastic=True)
    assert not torch.allclose(after.mean, stock.mean)
    torch.testing.assert_close(ref.mean, stock.mean)
    assert (after.kl(ref) > 0).all()


def test_lora_round_trip_and_stock_pipeline_export(folder: Path, tmp_path: Path) -> None:
    """save_trainable / load_trainable restore the adapter; the stock pipeline's load_lora_weights samples the
    same images as the sampler. alpha = rank here: the adapter's alpha reaches the stock loader only through the
    file's lora_adapter_metadata, which the shared save_trainable writes on the export branch (not merged yet)."""
    lora = LoraConfig(rank=4, alpha=4, target_modules=ATTENTION)
    trained = _sampler(folder, lora=lora)
    with torch.no_grad():
        for p in trained.trainable_parameters():
            p.add_(0.1 * torch.randn_like(p))
    trained.save_trainable(tmp_path / "lora")
    assert (tmp_path / "lora" / LORA_WEIGHTS_NAME).is_file()

    fresh = _sampler(folder, lora=lora)
    assert not torch.allclose(_ode(fresh).final_state, _ode(trained).final_state, atol=1e-4)
    fresh.load_trainable(tmp_path / "lora")
    ours = _ode(trained)
    torch.testing.assert_close(_ode(fresh).final_state, ours.final_state)
    names = {plain_lora_name(n) for n, _ in fresh.trainable_module().named_parameters() if "lora_" in n}
    assert len(load_file(str(tmp_path / "lora" / LORA_WEIGHTS_NAME))) == len(names)

    pipe = _pipe(folder)
    pipe.load_lora_weights(tmp_path / "lora")
    images = pipe(prompt=PROMPTS, negative_prompt=" ", true_cfg_scale=4.0, num_inference_steps=4, height=32,
                  width=32, max_sequence_length=32, generator=_generators(2), output_type="pt").images
    torch.testing.assert_close(ours.samples, images, rtol=1e-5, atol=1e-5)


def test_training_gradients_reach_only_the_adapter(folder: Path) -> None:
    sampler = _sampler(folder)
    cond = sampler.encode_prompts(PROMPTS)
    gens = [sample_generator(1, i) for i in range(2)]
    x, step = sampler.initial_state(gens), torch.tensor([1, 2])
    with torch.no_grad():
        nxt = sampler.transition(x, step, cond, stochastic=True).sample(gens)
    sampler.transition(x, step, cond, stochastic=True).log_prob(nxt).sum().backward()
    grads = {n: p.grad for n, p in sampler.trainable_module().named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for name in ("text_encoder", "vae") for p in getattr(sampler.pipe, name).parameters())


def _lora_grads(sampler: QwenImageSampler) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    for p in sampler.trainable_parameters():  # LoRA B starts at zero: give every adapter an effect
        p.data.normal_(0, 0.05)
    cond = sampler.encode_prompts(PROMPTS)
    gens = [sample_generator(1, i) for i in range(2)]
    x, step = sampler.initial_state(gens), torch.tensor([1, 2])
    with torch.no_grad():
        nxt = sampler.transition(x, step, cond, stochastic=True).sample(gens)
    sampler.train(True)
    sampler.transition(x, step, cond, stochastic=True).log_prob(nxt).sum().backward()
    sampler.train(False)
    return {n: p.grad.clone() for n, p in sampler.trainable_module().named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients(folder: Path) -> None:
    plain = _lora_grads(_sampler(folder))
    checkpointed = _lora_grads(_sampler(folder, gradient_checkpointing=True))
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-4, atol=1e-7)


def test_bfloat16_backbone_samples_close_to_float32(folder: Path) -> None:
    """bf16 frozen weights (the GPU recipe's dtype): float32 LoRA and states, images near the float32 ones."""
    sampler = _sampler(folder, dtype="bfloat16")
    assert sampler.pipe.transformer.img_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in sampler.trainable_parameters())
    rollout = _ode(sampler)
    assert rollout.final_state.dtype == torch.float32 and torch.isfinite(rollout.samples).all()
    reference = _ode(_sampler(folder)).samples
    assert (rollout.samples - reference).abs().mean() < 0.01  # measured 0.001


def test_bad_resolution_and_settings_are_refused_before_loading(folder: Path, tmp_path: Path) -> None:
    hub = _backbone(Path("Qwen/Qwen-Image"), height=520, width=512, max_sequence_length=2000, options={"shift": 3})
    problems = QwenImageSampler.check_config(hub)
    assert any("backbone.height=520" in p and "multiple of 16" in p and "512" in p for p in problems)
    assert not any("backbone.width" in p for p in problems)
    assert any("backbone.max_sequence_length=2000" in p and "1024" in p for p in problems)
    assert any("backbone.options" in p and "shift" in p for p in problems)
    # the tiny VAE downsamples 4x: any multiple of 8 px, read from the folder without loading it
    assert QwenImageSampler.check_config(_backbone(folder, height=40, width=24)) == []
    assert _sampler(folder, height=40, width=24).initial_state(_generators(1)).shape == (1, 5 * 3, 16)
    with pytest.raises(ConfigError, match=r"backbone\.height=36"):
        QwenImageSampler.from_config(_backbone(folder, height=36), step_kind="ode", noise_level=0.7, device="cpu")
    with pytest.raises(FileNotFoundError, match=r"backbone\.pretrained"):
        _sampler(tmp_path / "nope")
    with pytest.raises(ValueError, match="target_modules"):
        _sampler(folder, lora=LoraConfig(target_modules=["no_such_layer"]))


def test_registered_by_name_and_builtin() -> None:
    assert SAMPLERS.get("qwen_image") is QwenImageSampler
    assert (Path(resolve_pretrained("builtin:tiny-qwen-image")) / "model_index.json").is_file()


@pytest.mark.integration
def test_cli_trains_the_tiny_recipe_one_epoch(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "train.epochs=1", "train.prompts_per_epoch=2", "algo.num_seeds=2",
                 "train.rollout_batch_size=4", "train.train_batch_size=3", "backbone.num_steps=4",
                 "train.checkpoint_every=1", "train.sample_every=1"]
    pipe = QwenImagePipeline.from_pretrained(resolve_pretrained("builtin:tiny-qwen-image"))
    with caplog.at_level(logging.INFO):
        assert main(["train", "qwen_image_tiny_flow_grpo", *overrides]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1.0]
    assert math.isfinite(rows[0]["train/loss"]) and math.isfinite(rows[0]["train/kl"])
    assert rows[0]["rollout/nfe"] == 4 * 4 and rows[0]["rollout/transitions"] == 4 * 3
    assert (out / "samples" / "epoch_00000.png").is_file()

    # the checkpoint is a LoRA the stock pipeline loads; every adapted layer that reaches the image moved away
    # from its zero init. The last block's text-stream output is discarded, so its text queries (add_q_proj) and
    # text output projection (to_add_out) get no gradient and stay at zero.
    ckpt = latest_checkpoint(out)
    assert ckpt is not None
    pipe.load_lora_weights(ckpt / "trainable")
    lora_b = {plain_lora_name(n): p for n, p in pipe.transformer.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 2 * 8  # 2 blocks x the recipe's 8 attention projections
    unused = {f"transformer_blocks.1.attn.{name}.lora_B.weight" for name in ("add_q_proj", "to_add_out")}
    assert {n for n, p in lora_b.items() if not p.abs().sum() > 0} == unused


def test_bad_recipe_override_exits_2_without_a_run_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = main(["train", "qwen_image_tiny_flow_grpo", f"output_dir={tmp_path / 'run'}",
                 "backbone.max_sequence_length=2000", "backbone.options={shift: 3}"])
    assert code == 2
    assert "backbone.max_sequence_length=2000" in caplog.text and "backbone.options" in caplog.text
    assert not (tmp_path / "run").exists()
