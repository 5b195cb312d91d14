"""The moving-shapes text-to-video model: a small Wan2.1-family pipeline built from diffusers parts.

A 2-layer UMT5 encoder over a word-level tokenizer of the world's vocabulary (built in-process), a Wan
causal 3-D autoencoder (``AutoencoderKLWan``) that compresses 4x in space and 2x in time (32 px, 9 frames ->
8 channels x 5 x 8 x 8 latents: Wan's released 8x / 4x would leave a 4 px shape one latent cell) and a
``WanTransformer3DModel`` over the latents (patch ``(1, 2, 2)``: 5 x 4 x 4 = 80 tokens per clip). It is a
stock ``WanPipeline`` with the flow-matching Euler scheduler, so :class:`~alignkit.modalities.video.wan.WanSampler`
serves it unchanged and its ODE reproduces ``pipe(...)``; the pipeline reads the compression from the VAE's
``scale_factor_temporal`` / ``scale_factor_spatial``, so ``num_frames`` must be ``2k + 1`` (e.g. 9).
Pretrained weights ship in ``weights/`` (see :mod:`alignkit.worlds.moving_shapes.pretrain`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from alignkit.modalities.image.tiny import build_tiny_tokenizer
from alignkit.modalities.video.tiny import tiny_umt5_encoder
from alignkit.worlds.common import shipped_folder
from alignkit.worlds.moving_shapes.world import IMAGE_SIZE, VOCAB_WORDS

__all__ = [
    "LATENT_CHANNELS", "NUM_FRAMES", "SCALE_SPATIAL", "SCALE_TEMPORAL", "TOKEN_LENGTH", "WEIGHTS_DIR",
    "build_shapes_video_pipeline", "shipped_weights",
]

WEIGHTS_DIR = Path(__file__).parent / "weights"
"""The shipped pretrained pipeline folder (``save_pretrained`` layout, safetensors)."""

NUM_FRAMES = 9
"""Frames per clip the model is trained on (``2k + 1`` for the 2x temporal VAE)."""
TOKEN_LENGTH = 16  # the longest caption is 11 words + start/end tokens
TEXT_DIM = 32
LATENT_CHANNELS = 8
SCALE_SPATIAL, SCALE_TEMPORAL = 4, 2
FLOW_SHIFT = 1.0


def build_shapes_video_pipeline(
    seed: int = 0, *, width: int = 96, layers: int = 4, ffn: int = 256, vae_dim: int = 8
) -> WanPipeline:
    """A randomly initialised moving-shapes pipeline (the starting point of pretraining).

    Args:
        seed: seed of every module's initialisation; the global RNG state is restored afterwards.
        width: transformer width (attention heads of 32 dims).
        layers: transformer blocks.
        ffn: transformer feed-forward width.
        vae_dim: autoencoder base width (channels ``vae_dim x (1, 2, 2)`` over its two stages).

    Returns:
        The pipeline on CPU in eval mode; the VAE's ``latents_mean`` / ``latents_std`` are placeholders
        (0 / 1) until pretraining fixes them from latent statistics.
    """
    if width % 32:
        raise ValueError(f"width={width}: attention heads are 32 wide, so use a multiple of 32 (e.g. 96)")
    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tiny_tokenizer(list(VOCAB_WORDS), model_max_length=TOKEN_LENGTH)
        text_encoder = tiny_umt5_encoder(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id,
                                         seed=seed, d_model=TEXT_DIM)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(
            base_dim=vae_dim, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 2], num_res_blocks=1,
            temperal_downsample=[False, True], latents_mean=[0.0] * LATENT_CHANNELS,
            latents_std=[1.0] * LATENT_CHANNELS, scale_factor_temporal=SCALE_TEMPORAL,
            scale_factor_spatial=SCALE_SPATIAL,
        )
        torch.manual_seed(seed + 2)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=width // 32, attention_head_dim=32,
            in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, freq_dim=64,
            ffn_dim=ffn, num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            rope_max_seq_len=IMAGE_SIZE,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                       transformer=transformer)
    for module in (text_encoder, vae, transformer):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shipped_weights() -> Path:
    """The pretrained pipeline folder shipped with the package.

    Raises:
        FileNotFoundError: naming the pretraining command when the folder is missing.
    """
    return shipped_folder(WEIGHTS_DIR, "model_index.json", "moving-shapes video pipeline",
                          "python -m alignkit.worlds.moving_shapes.pretrain")
