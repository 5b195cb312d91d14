"""A tiny, randomly initialised Wan text-to-video pipeline built entirely offline.

Component sizes follow diffusers' own Wan pipeline tests (``tests/pipelines/wan/test_wan.py``): a 2-layer
``WanTransformer3DModel`` (2 heads of 12 dims, patch ``(1, 2, 2)``), an ``AutoencoderKLWan`` with base width 3
that compresses 8x in space and 4x in time, and a 2-layer UMT5 encoder of width 32 whose word-level tokenizer
is built in-process (:func:`alignkit.modalities.image.tiny.build_tiny_tokenizer`). Call it with ``height`` and
``width`` multiples of 16 and ``num_frames = 4k + 1`` (e.g. 32 x 32 px, 9 frames: latents ``[B, 16, 3, 4, 4]``).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import UMT5Config, UMT5EncoderModel

from alignkit.modalities.image.tiny import _finalize, build_tiny_tokenizer, tiny_t5_settings

__all__ = ["TINY_WAN_FLOW_SHIFT", "WAN_1_3B", "WAN_MID", "build_tiny_wan_pipeline", "tiny_umt5_encoder"]

TINY_WAN_FLOW_SHIFT = 3.0
"""The schedule shift of the tiny pipeline (Wan2.1's 480p value)."""

_TEXT_DIM = 32
_T5_MAX_LENGTH = 512

WAN_MID: dict[str, dict[str, Any]] = {
    "transformer": {"num_layers": 8, "num_attention_heads": 6, "attention_head_dim": 64, "ffn_dim": 1536,
                    "text_dim": 64},
    "vae": {"base_dim": 16, "dim_mult": [1, 2, 2, 2]},
}
"""A mid-size random Wan (8 blocks of width 384, ~20M-parameter transformer; VAE 8x space, 4x time) for CPU
benchmarks: ``build_tiny_wan_pipeline(transformer_kwargs=WAN_MID["transformer"], vae_kwargs=WAN_MID["vae"])``."""

WAN_1_3B: dict[str, dict[str, Any]] = {
    "transformer": {"num_layers": 30, "num_attention_heads": 12, "attention_head_dim": 128, "ffn_dim": 8960,
                    "text_dim": 4096, "freq_dim": 256, "rope_max_seq_len": 1024},
    "vae": {"base_dim": 96, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2},
}
"""Wan2.1-T2V-1.3B's transformer and VAE sizes (random weights; the text encoder stays a 2-layer UMT5 of width
``text_dim``), for GPU benchmarks at 480 x 832 px, 81 frames."""


def tiny_umt5_encoder(
    vocab_size: int, pad_id: int, eos_id: int, *, seed: int, d_model: int = _TEXT_DIM
) -> UMT5EncoderModel:
    """A 2-layer UMT5 encoder of width ``d_model`` (4 heads of 8 dims, gated-GELU FFN of ``2 d_model``), random
    from ``torch.manual_seed(seed)`` (callers restore the global RNG, see :func:`build_tiny_wan_pipeline`)."""
    torch.manual_seed(seed)
    return UMT5EncoderModel(UMT5Config(**tiny_t5_settings(vocab_size, pad_id, eos_id, d_model)))


def build_tiny_wan_pipeline(
    *, seed: int = 0, scheduler: str = "unipc", dtype: torch.dtype = torch.float32,
    transformer_kwargs: dict[str, Any] | None = None, vae_kwargs: dict[str, Any] | None = None,
) -> WanPipeline:
    """Builds a tiny random Wan2.1-style text-to-video pipeline offline.

    Args:
        seed: Seed for all random weights; the global torch RNG state is restored afterwards.
        scheduler: ``"unipc"``: ``UniPCMultistepScheduler`` with flow sigmas (shift 3), as the released
            Wan2.1 diffusers checkpoints ship it; ``"euler"``: ``FlowMatchEulerDiscreteScheduler`` (shift 3),
            the scheduler whose steps :class:`alignkit.modalities.video.wan.WanSampler`'s ODE reproduces exactly.
        dtype: Dtype of every module.
        transformer_kwargs: ``WanTransformer3DModel`` arguments replacing the tiny ones (e.g.
            ``WAN_MID["transformer"]``); its ``text_dim`` is also the UMT5 encoder's width.
        vae_kwargs: ``AutoencoderKLWan`` arguments replacing the tiny ones (e.g. ``WAN_MID["vae"]``).

    Returns:
        The pipeline on CPU, every module in eval mode (as after ``from_pretrained``), progress bar off.
    """
    if scheduler not in ("unipc", "euler"):
        raise ValueError(f"scheduler={scheduler!r}: use 'unipc' (as the released checkpoints) or 'euler'")
    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tiny_tokenizer(model_max_length=_T5_MAX_LENGTH)
        torch.manual_seed(seed)
        tkw: dict[str, Any] = {
            "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 16,
            "out_channels": 16, "text_dim": _TEXT_DIM, "freq_dim": 256, "ffn_dim": 32, "num_layers": 2,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 32,
            **(transformer_kwargs or {}),
        }
        transformer = WanTransformer3DModel(**tkw)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**{"base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
                                  "temperal_downsample": [False, True, True], **(vae_kwargs or {})})
        text_encoder = tiny_umt5_encoder(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, seed=seed + 2,
                                         d_model=tkw["text_dim"])
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=TINY_WAN_FLOW_SHIFT,
            num_train_timesteps=1000,
        )
    else:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=TINY_WAN_FLOW_SHIFT)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=sched,
                       transformer=transformer)
    _finalize(pipe, dtype)
    return pipe

