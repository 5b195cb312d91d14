"""The tones text-to-audio model: a small Stable Audio 3 pipeline built from stock diffusers / transformers parts.

A 2-layer T5Gemma encoder (width 32) over a word-level tokenizer of the world's vocabulary (built in-process,
:data:`TOKEN_LENGTH` tokens), a mono ``AutoencoderSAME`` at 8 kHz with patches of :data:`VAE_PATCH` samples and
stride 1 (one latent frame per 4 ms patch: 1 s -> latents ``[32, 250]``; it does not compress, it re-codes each
patch, so that a few minutes of training reconstruct tones well), a ``StableAudio3DurationEmbedder`` and a
``StableAudio3DiTModel`` over the latents with temporal patches of 2 (125 tokens per clip). It is a stock
``StableAudio3Pipeline`` with the deterministic flow-matching Euler scheduler (as the base checkpoint), so
:class:`~alignkit.modalities.audio.stable_audio.StableAudio3Sampler` serves it unchanged and its ODE reproduces
``pipe(...)``. Pretrained weights ship in ``weights/`` (see :mod:`alignkit.worlds.tones.pretrain`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderSAME,
    FlowMatchEulerDiscreteScheduler,
    StableAudio3DiTModel,
    StableAudio3DurationEmbedder,
    StableAudio3Pipeline,
)

from alignkit.modalities.audio.tiny import randomize_untrained, tiny_t5gemma_encoder
from alignkit.modalities.image.tiny import build_tiny_tokenizer
from alignkit.worlds.common import shipped_folder
from alignkit.worlds.tones.world import CHANNELS, SAMPLE_RATE, VOCAB_WORDS

__all__ = [
    "LATENT_DIM", "TEXT_WIDTH", "TOKEN_LENGTH", "VAE_PATCH", "WEIGHTS_DIR", "build_tones_pipeline", "shipped_weights",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
"""The shipped pretrained pipeline folder (``save_pretrained`` layout, safetensors)."""

TOKEN_LENGTH = 8  # the longest caption is 5 words + start/end tokens
TEXT_WIDTH = 32
VAE_PATCH = 32
LATENT_DIM = 32
MAX_DURATION = 2.0
"""Longest duration (s) the duration embedder distinguishes (the world's clips last 1 s)."""


def build_tones_pipeline(
    seed: int = 0, *, width: int = 64, layers: int = 4, dit_patch: int = 2, vae_width: int = 64, vae_depth: int = 1,
) -> StableAudio3Pipeline:
    """A randomly initialised tones pipeline (the starting point of pretraining).

    Args:
        seed: seed of every module's initialisation; the global RNG state is restored afterwards.
        width: DiT width (attention heads of 16 dims).
        layers: DiT blocks.
        dit_patch: latent frames per DiT token.
        vae_width: the autoencoder's transformer width.
        vae_depth: transformer layers of the autoencoder's encoder and of its decoder.

    Returns:
        The pipeline on CPU in eval mode, progress bar off. Parameters that diffusers initialises to (near) zero
        are drawn at random (:func:`~alignkit.modalities.audio.tiny.randomize_untrained`) so that gradients reach
        every block from the first step.
    """
    if width % 16:
        raise ValueError(f"width={width}: attention heads are 16 wide, so use a multiple of 16 (e.g. 64)")
    if vae_width % 16:
        raise ValueError(f"vae_width={vae_width}: attention heads are 16 wide, so use a multiple of 16 (e.g. 64)")
    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tiny_tokenizer(list(VOCAB_WORDS), model_max_length=TOKEN_LENGTH)
        torch.manual_seed(seed)
        transformer = StableAudio3DiTModel(
            io_channels=LATENT_DIM, patch_size=dit_patch, embed_dim=width, depth=layers, num_heads=width // 16,
            cond_token_dim=TEXT_WIDTH, global_cond_dim=TEXT_WIDTH, local_add_cond_dim=3, timestep_features_dim=32,
            ff_mult=2.0, num_memory_tokens=2,
        )
        randomize_untrained(transformer, std=0.02)
        torch.manual_seed(seed + 1)
        vae = AutoencoderSAME(
            audio_channels=CHANNELS, patch_size=VAE_PATCH, encoder_channels=vae_width, encoder_c_mults=(1,),
            encoder_strides=(1,), encoder_transformer_depths=(vae_depth,), latent_dim=LATENT_DIM, dim_heads=16,
            ff_mult=2, use_differential_attention=False, sampling_rate=SAMPLE_RATE,
        )
        randomize_untrained(vae)
        torch.manual_seed(seed + 2)
        duration_embedder = StableAudio3DurationEmbedder(output_dim=TEXT_WIDTH, fourier_dim=16, max_val=MAX_DURATION)
        torch.manual_seed(seed + 3)
        text_encoder = tiny_t5gemma_encoder(len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
                                            tokenizer.eos_token_id, width=TEXT_WIDTH, text_length=TOKEN_LENGTH)
    # SA3's DiT takes the timestep as sigma in [0, 1]: the pipeline passes the scheduler's timesteps unscaled
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0, stochastic_sampling=False)
    pipe = StableAudio3Pipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                duration_embedder=duration_embedder, transformer=transformer, scheduler=scheduler)
    for module in (text_encoder, vae, transformer, duration_embedder):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shipped_weights() -> Path:
    """The pretrained pipeline folder shipped with the package.

    Raises:
        FileNotFoundError: naming the pretraining command when the folder is missing.
    """
    return shipped_folder(WEIGHTS_DIR, "model_index.json", "tones audio pipeline",
                          "python -m alignkit.worlds.tones.pretrain")
