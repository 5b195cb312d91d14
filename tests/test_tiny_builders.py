"""Tests for the offline tiny diffusers pipeline builders in ``alignkit.modalities.image.tiny``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline
from peft import LoraConfig
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from alignkit.modalities.image.tiny import (
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_tokenizer,
    load_tiny_pipeline,
    save_tiny_pipeline,
    tiny_image_size,
)

PROMPTS = ["a red circle", "two blue squares"]
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

# name -> (builder, pipeline class, extra kwargs that class's from_pretrained needs for the saved folder)
FAMILIES: dict[str, tuple[Callable[..., DiffusionPipeline], type[DiffusionPipeline], dict[str, Any]]] = {
    # Without T5, text_encoder_3/tokenizer_3 are saved as [null, null] but are not optional components of
    # StableDiffusion3Pipeline, so from_pretrained needs them passed explicitly as None.
    "sd3": (build_tiny_sd3_pipeline, StableDiffusion3Pipeline, {"text_encoder_3": None, "tokenizer_3": None}),
    "sd3_t5": (lambda **kw: build_tiny_sd3_pipeline(with_t5=True, **kw), StableDiffusion3Pipeline, {}),
    "flux": (build_tiny_flux_pipeline, FluxPipeline, {}),
}


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Runs on one intra-op thread: the models are too small to gain from more, and on a busy 2-core box
    two threads contending with another process make each test ~5-10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forbids Hub access (env var, plus the constant huggingface_hub read at import time)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _generate(pipe: DiffusionPipeline, size: int) -> torch.Tensor:
    return pipe(
        prompt=PROMPTS,
        num_inference_steps=2,
        height=size,
        width=size,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images


def test_tokenizer_pads_truncates_and_round_trips(tmp_path: Path, hub_offline: None) -> None:
    tokenizer = build_tiny_tokenizer()
    prompts = ["A red circle!", "Two BLUE squares, 3 zebras"]
    batch = tokenizer(prompts, padding="max_length", max_length=10, truncation=True, return_tensors="pt")

    assert batch.input_ids.shape == (2, 10)
    tokens = tokenizer.convert_ids_to_tokens(batch.input_ids[1].tolist())
    words = ["two", "blue", "squares", ",", "3", UNK_TOKEN]  # "zebras" is out of vocabulary
    assert tokens == [BOS_TOKEN, *words, EOS_TOKEN, PAD_TOKEN, PAD_TOKEN]
    assert batch.attention_mask[1].tolist() == [1] * 8 + [0] * 2
    assert tokenizer.eos_token_id == len(tokenizer) - 1  # highest id, as in CLIP
    assert tokenizer.pad_token_id == 0

    truncated = tokenizer("one two three four five", max_length=4, truncation=True).input_ids
    assert tokenizer.convert_ids_to_tokens(truncated) == [BOS_TOKEN, "one", "two", EOS_TOKEN]

    tokenizer.save_pretrained(tmp_path)
    for cls in (PreTrainedTokenizerFast, AutoTokenizer):
        loaded = cls.from_pretrained(tmp_path)
        assert loaded.model_max_length == 77
        assert loaded.get_vocab() == tokenizer.get_vocab()
        again = loaded(prompts, padding="max_length", max_length=10, truncation=True, return_tensors="pt")
        assert torch.equal(again.input_ids, batch.input_ids)


def test_tokenizer_custom_vocabulary() -> None:
    tokenizer = build_tiny_tokenizer(["Hello", "world", "hello"], model_max_length=8)
    assert len(tokenizer) == 6  # <pad>, <unk>, hello, world, bos, eos
    assert tokenizer.model_max_length == 8
    ids = tokenizer("Hello, World").input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == [BOS_TOKEN, "hello", UNK_TOKEN, "world", EOS_TOKEN]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pipeline_runs_saves_and_reloads(family: str, tmp_path: Path, hub_offline: None) -> None:
    build, pipeline_cls, load_kwargs = FAMILIES[family]
    pipe = build(seed=0)
    size = tiny_image_size(pipe)
    assert size == tiny_image_size(32) == 64
    assert pipe.vae_scale_factor == 2

    images = _generate(pipe, size)
    assert images.shape == (2, 3, size, size)
    assert torch.isfinite(images).all()
    assert not torch.equal(images[0], images[1])

    folder = save_tiny_pipeline(pipe, tmp_path / family)
    assert (folder / "model_index.json").is_file()
    assert not list(folder.rglob("*.bin"))  # safetensors only

    loaded = pipeline_cls.from_pretrained(folder, **load_kwargs)
    loaded.set_progress_bar_config(disable=True)
    assert tiny_image_size(loaded) == size
    assert torch.equal(_generate(loaded, size), images)

    # The helper works without knowing the class or which components are absent.
    helper_loaded = load_tiny_pipeline(folder)
    assert type(helper_loaded) is pipeline_cls
    assert torch.equal(_generate(helper_loaded, size), images)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_builders_are_deterministic_and_keep_global_rng(family: str) -> None:
    build = FAMILIES[family][0]
    torch.manual_seed(1234)
    expected_next = torch.rand(3)
    torch.manual_seed(1234)
    first, second, other = build(seed=0), build(seed=0), build(seed=1)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG state untouched

    first_state, second_state = first.transformer.state_dict(), second.transformer.state_dict()
    assert all(torch.equal(first_state[k], second_state[k]) for k in first_state)
    other_state = other.transformer.state_dict()
    assert any(not torch.equal(first_state[k], other_state[k]) for k in first_state)


def test_sd3_shapes_line_up() -> None:
    pipe = build_tiny_sd3_pipeline(sample_size=16)
    cfg = pipe.transformer.config
    clip_hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    clip_proj = pipe.text_encoder.config.projection_dim + pipe.text_encoder_2.config.projection_dim
    assert clip_hidden <= cfg.joint_attention_dim
    assert clip_proj == cfg.pooled_projection_dim
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    assert pipe.text_encoder_3 is None
    assert pipe.tokenizer_3 is None
    assert pipe.scheduler.config.shift == 3.0
    assert tiny_image_size(pipe) == 32

    with_t5 = build_tiny_sd3_pipeline(with_t5=True)
    assert with_t5.text_encoder_3.config.d_model == cfg.joint_attention_dim


def test_flux_shapes_line_up() -> None:
    pipe = build_tiny_flux_pipeline(guidance_embeds=False)
    cfg = pipe.transformer.config
    assert cfg.in_channels == 4 * pipe.vae.config.latent_channels
    assert cfg.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert cfg.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert sum(cfg.axes_dims_rope) == cfg.attention_head_dim
    assert not cfg.guidance_embeds
    assert pipe.scheduler.config.use_dynamic_shifting
    assert pipe.default_sample_size == 32
    images = _generate(pipe, tiny_image_size(pipe))
    assert images.shape == (2, 3, 64, 64)


def test_bfloat16_pipeline() -> None:
    pipe = build_tiny_flux_pipeline(dtype=torch.bfloat16)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            assert {p.dtype for p in component.parameters()} == {torch.bfloat16}, name
    images = _generate(pipe, tiny_image_size(pipe))
    assert images.dtype == torch.bfloat16
    assert torch.isfinite(images).all()


def test_odd_sample_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="even"):
        build_tiny_sd3_pipeline(sample_size=15)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_lora_adapter_on_attention_projections(family: str) -> None:
    pipe = FAMILIES[family][0]()
    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS)
    )
    assert "default" in pipe.transformer.peft_config
    lora_names = [name for name, _ in pipe.transformer.named_parameters() if "lora_" in name]
    assert any(".to_q.lora_A" in name for name in lora_names)
    assert any(".to_out.0.lora_B" in name for name in lora_names)
    images = _generate(pipe, tiny_image_size(pipe))
    assert torch.isfinite(images).all()
