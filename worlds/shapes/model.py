"""The shapes-world text-to-image model: a small SD3-family pipeline built from diffusers parts.

Two CLIP text encoders over a word-level tokenizer of the world's vocabulary (built in-process), a
4-channel KL autoencoder (32 px -> 16 x 16 latents) and an MMDiT (``SD3Transformer2DModel``) over the
latents. It is a stock ``StableDiffusion3Pipeline`` (without T5), so the SD3 adapter serves it unchanged.
Pretrained weights ship in ``weights/`` (see :mod:`alignkit.worlds.shapes.pretrain`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection

from alignkit.modalities.image.tiny import build_tiny_tokenizer, clip_text_config
from alignkit.worlds.common import shipped_folder
from alignkit.worlds.shapes.world import IMAGE_SIZE, VOCAB_WORDS

WEIGHTS_DIR = Path(__file__).parent / "weights"
"""The shipped pretrained pipeline folder (``save_pretrained`` layout, safetensors)."""

TOKEN_LENGTH = 12  # the longest caption is 8 words + start/end tokens
T5_TOKENS = 1  # the pipeline feeds zeros for the absent T5 encoder; one zero token is enough
CLIP_DIMS = (32, 32)
JOINT_DIM = 64
LATENT_SIZE = IMAGE_SIZE // 2


def build_shapes_pipeline(seed: int = 0, *, width: int = 96, layers: int = 4) -> StableDiffusion3Pipeline:
    """A randomly initialised shapes-world pipeline (the starting point of pretraining).

    Args:
        seed: seed of every module's initialisation.
        width: transformer width (attention heads of 32 dims).
        layers: transformer blocks.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tiny_tokenizer(list(VOCAB_WORDS), model_max_length=TOKEN_LENGTH)
        tokenizer_2 = build_tiny_tokenizer(list(VOCAB_WORDS), model_max_length=TOKEN_LENGTH)
        text_encoder = CLIPTextModelWithProjection(clip_text_config(tokenizer, hidden_size=CLIP_DIMS[0]))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2, hidden_size=CLIP_DIMS[1]))
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8,
            sample_size=IMAGE_SIZE, scaling_factor=1.0, shift_factor=0.0, mid_block_add_attention=False,
        )
        transformer = SD3Transformer2DModel(
            sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
            attention_head_dim=32, num_attention_heads=width // 32, joint_attention_dim=JOINT_DIM,
            caption_projection_dim=width, pooled_projection_dim=sum(CLIP_DIMS), pos_embed_max_size=LATENT_SIZE,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shipped_weights() -> Path:
    """The pretrained pipeline folder shipped with the package.

    Raises:
        FileNotFoundError: naming the pretraining command when the folder is missing.
    """
    return shipped_folder(WEIGHTS_DIR, "model_index.json", "shapes-world pipeline",
                          "python -m alignkit.worlds.shapes.pretrain")
