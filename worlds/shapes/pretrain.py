"""Pretrain the shapes-world model on CPU, reproducibly, and write the shipped weights.

    python -m alignkit.worlds.shapes.pretrain [--out DIR] [--vae-steps 600] [--steps 4000] [--batch 32]

Stage 1 trains the KL autoencoder on rendered images (MSE + a small KL term), then fixes the latent
``shift_factor`` / ``scaling_factor`` from latent statistics. Stage 2 trains the MMDiT and both text
encoders jointly with the rectified-flow loss ``|v(x_sigma, sigma) - (eps - x0)|^2`` on the frozen
autoencoder's latents, sigma from a logit-normal, dropping 10% of captions (for CFG). Only training-split
captions are used; held-out captions (``prompt_set(..., split="heldout")``) never are. Everything random
is drawn from generators seeded by ``--seed``; with the same thread count the result is bit-identical. The
loops are shared with the video world (:mod:`alignkit.worlds.pretrain_common`).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline

from alignkit.worlds.pretrain_common import caption_batches, train_autoencoder, train_rectified_flow
from alignkit.worlds.shapes.model import T5_TOKENS, WEIGHTS_DIR, build_shapes_pipeline
from alignkit.worlds.shapes.world import prompt_set, render_batch

logger = logging.getLogger(__name__)


def _batches(seed: int, batch: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Endless ``(captions, images [B, 3, H, W] in [0, 1])`` batches of training-split prompts."""
    return caption_batches(prompt_set, lambda specs, s: render_batch(specs, seed=s), seed, batch)


def train_vae(pipe: StableDiffusion3Pipeline, steps: int, batch: int, lr: float, seed: int) -> dict[str, float]:
    """Stage 1: the KL autoencoder, then its latent ``shift_factor`` / ``scaling_factor``."""
    vae = pipe.vae
    loss = train_autoencoder(vae, (images * 2 - 1 for _, images in _batches(seed + 1, batch)), steps=steps, lr=lr,
                             seed=seed)
    with torch.no_grad():
        _, images = next(_batches(seed + 2, 512))
        lat = vae.encode(images * 2 - 1).latent_dist.mode()
    shift, scale = float(lat.mean()), float(1.0 / lat.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return {"vae_loss": loss, "shift_factor": shift, "scaling_factor": scale}


def train_flow(pipe: StableDiffusion3Pipeline, steps: int, batch: int, lr: float, seed: int,
               cfg_dropout: float = 0.1) -> dict[str, float]:
    """Stage 2: the MMDiT and both CLIP encoders on the frozen autoencoder's latents ``[B, 4, 16, 16]``."""
    vae, tr = pipe.vae, pipe.transformer
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor

    def latents(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (vae.encode(images * 2 - 1).latent_dist.mode() - shift) * scale

    def encode_text(captions: list[str]) -> dict[str, torch.Tensor]:
        pe, _, pooled, _ = pipe.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=T5_TOKENS, device=torch.device("cpu"),
        )
        return {"encoder_hidden_states": pe, "pooled_projections": pooled}

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return tr(hidden_states=x, timestep=t, return_dict=False, **cond)[0]

    data = ((c, latents(images)) for c, images in _batches(seed + 3, batch))
    ema = train_rectified_flow([tr, pipe.text_encoder, pipe.text_encoder_2], data, encode_text, velocity,
                               steps=steps, lr=lr, seed=seed, cfg_dropout=cfg_dropout)
    return {"flow_loss_ema": ema}


def pretrain(out: Path, *, seed: int = 0, vae_steps: int = 600, steps: int = 4000, batch: int = 32,
             width: int = 96, layers: int = 4, lr: float = 6e-4) -> dict[str, float]:
    """Build, train and save the shapes-world pipeline into ``out``; returns the training summary."""
    t0 = time.perf_counter()
    pipe = build_shapes_pipeline(seed, width=width, layers=layers)
    info: dict[str, float] = {"seed": seed, "vae_steps": vae_steps, "steps": steps, "batch": batch,
                              "width": width, "layers": layers, "threads": torch.get_num_threads()}
    info |= train_vae(pipe, vae_steps, batch, 1e-3, seed)
    info |= train_flow(pipe, steps, batch, lr, seed)
    info["seconds"] = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    (out / "pretrain_info.json").write_text(json.dumps(info, indent=1))
    logger.info("saved %s in %.0f s", out, info["seconds"])
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    pretrain(args.out, seed=args.seed, vae_steps=args.vae_steps, steps=args.steps, batch=args.batch,
             width=args.width, layers=args.layers, lr=args.lr)


if __name__ == "__main__":
    main()
