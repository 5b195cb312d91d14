"""A tiny, randomly initialised Stable Audio 3 text-to-audio pipeline built entirely offline.

Components (all random, seeded): a 2-layer ``StableAudio3DiTModel`` of width 32 (2 heads, 2 memory tokens, 8 latent
channels), a ``StableAudio3DurationEmbedder`` of width 32, a 2-layer T5Gemma encoder of width 32 over the in-process
word-level tokenizer (:func:`alignkit.modalities.image.tiny.build_tiny_tokenizer`, 16 tokens) and a 1-level
``AutoencoderSAME``
(patch 16 x stride 4: 64 audio samples per latent frame, stereo) at :data:`TINY_SAMPLE_RATE` Hz. One second of audio
is 8000 samples per channel, latents ``[8, 125]``. Meant for tests, demos and benchmarks, not for meaningful audio.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderSAME,
    FlowMatchEulerDiscreteScheduler,
    StableAudio3DiTModel,
    StableAudio3DurationEmbedder,
    StableAudio3Pipeline,
)
from transformers import T5GemmaConfig, T5GemmaEncoderModel

from alignkit.modalities.image.tiny import _finalize, build_tiny_tokenizer

__all__ = [
    "TINY_MAX_DURATION", "TINY_SAMPLE_RATE", "build_tiny_stable_audio3_pipeline", "randomize_untrained",
    "tiny_t5gemma_encoder",
]

TINY_SAMPLE_RATE = 8000
"""Sample rate (Hz) of the tiny pipeline's VAE."""

TINY_MAX_DURATION = 30.0
"""Longest duration (s) the tiny duration embedder distinguishes (its ``max_val``)."""

_WIDTH = 32
_TEXT_LENGTH = 16


def tiny_t5gemma_encoder(
    vocab_size: int, pad_id: int, bos_id: int, eos_id: int, *, width: int = _WIDTH, text_length: int = _TEXT_LENGTH
) -> T5GemmaEncoderModel:
    """A random 2-layer T5Gemma encoder of ``width`` (heads of 16 dims) for prompts of ``text_length`` tokens."""
    module = dict(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=width // 16, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        max_position_embeddings=4 * text_length, sliding_window=text_length, pad_token_id=pad_id,
        bos_token_id=bos_id, eos_token_id=eos_id,
    )
    config = T5GemmaConfig(encoder=module, decoder=module, vocab_size=vocab_size, is_encoder_decoder=False)
    return T5GemmaEncoderModel(config)


def randomize_untrained(module: torch.nn.Module, std: float = 0.1) -> None:
    """Give the parameters diffusers initialises to (near) zero random values, as training would.

    diffusers zero-initialises residual output projections (the SAME blocks' attention / feed-forward outputs, the
    DiT's 1x1 convs) and draws the SAME resampling blocks' output tokens at 1e-5: at random init their queries are
    ~0, so the differential attention ``Attn(q1, k1, v) - Attn(q2, k2, v)`` of both uniform softmaxes cancels and the
    decoded audio would not depend on the latents at all. Zero weight matrices and the DiT's padding embedding are
    drawn from ``N(0, std^2)``, the output tokens from ``N(0, 1)``.
    """
    for name, p in module.named_parameters():
        if name.endswith("new_tokens"):
            torch.nn.init.normal_(p, std=1.0)
        elif (p.dim() >= 2 or name == "prompt_padding_embedding") and not p.detach().any():
            torch.nn.init.normal_(p, std=std)


def build_tiny_stable_audio3_pipeline(
    *, seed: int = 0, sample_rate: int = TINY_SAMPLE_RATE, stochastic_sampling: bool = False,
    dtype: torch.dtype = torch.float32,
) -> StableAudio3Pipeline:
    """Builds a tiny random Stable Audio 3 pipeline offline.

    Args:
        seed: Seed for all random weights; the global torch RNG state is restored afterwards.
        sample_rate: The VAE's ``sampling_rate`` (Hz).
        stochastic_sampling: The scheduler's ``stochastic_sampling``: ``False`` as the non-distilled
            ``stable-audio-3-medium-base`` checkpoint (Euler ODE), ``True`` as the distilled ``stable-audio-3-medium``
            (ping-pong re-noising).
        dtype: Dtype of every module.

    Returns:
        The pipeline on CPU, every module in eval mode (as after ``from_pretrained``), progress bar off.
    """
    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tiny_tokenizer(model_max_length=_TEXT_LENGTH)
        torch.manual_seed(seed)
        transformer = StableAudio3DiTModel(
            io_channels=8, embed_dim=_WIDTH, depth=2, num_heads=2, cond_token_dim=_WIDTH, global_cond_dim=_WIDTH,
            local_add_cond_dim=3, timestep_features_dim=16, ff_mult=2.0, num_memory_tokens=2,
        )
        randomize_untrained(transformer)
        torch.manual_seed(seed + 1)
        vae = AutoencoderSAME(
            audio_channels=2, patch_size=16, encoder_channels=8, encoder_c_mults=(2,), encoder_strides=(4,),
            encoder_transformer_depths=(1,), latent_dim=8, dim_heads=8, ff_mult=2, sampling_rate=sample_rate,
        )
        randomize_untrained(vae)
        torch.manual_seed(seed + 2)
        duration_embedder = StableAudio3DurationEmbedder(output_dim=_WIDTH, fourier_dim=16, max_val=TINY_MAX_DURATION)
        torch.manual_seed(seed + 3)
        text_encoder = tiny_t5gemma_encoder(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                                        tokenizer.eos_token_id)
    # SA3's DiT takes the timestep as sigma in [0, 1]: the pipeline passes the scheduler's timesteps unscaled
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0,
                                                stochastic_sampling=stochastic_sampling)
    pipe = StableAudio3Pipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                duration_embedder=duration_embedder, transformer=transformer, scheduler=scheduler)
    _finalize(pipe, dtype)
    return pipe
