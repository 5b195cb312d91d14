"""Pretrain the shapes-world model on CPU, reproducibly, and write the shipped weights.

    python -m modalities.image.shapes.pretrain [--out DIR] [--vae-steps 600] [--steps 4000] [--batch 32]

Stage 1 trains the KL autoencoder on rendered images (MSE + a small KL term), then fixes the latent
``shift_factor`` / ``scaling_factor`` from latent statistics. Stage 2 trains the MMDiT and both text
encoders jointly with the rectified-flow loss ``|v(x_sigma, sigma) - (eps - x0)|^2`` on the frozen
autoencoder's latents, sigma from a logit-normal, dropping 10% of captions (for CFG). Only training-split
captions are used; held-out captions (``prompt_set(..., split="heldout")``) never are. Everything random
is drawn from generators seeded by ``--seed``; with the same thread count the result is bit-identical.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from modalities.image.shapes.model import T5_TOKENS, WEIGHTS_DIR, build_shapes_pipeline
from modalities.image.shapes.world import prompt_set, render_batch

logger = logging.getLogger(__name__)


def _batches(seed: int, batch: int, pool: int = 20000):
    """Endless ``(captions, images [B, 3, H, W] in [0, 1])`` batches of training-split prompts."""
    specs = prompt_set(pool, seed, "train")
    rng = random.Random(seed)
    step = 0
    while True:
        chosen = [specs[rng.randrange(len(specs))] for _ in range(batch)]
        yield [s.caption() for s in chosen], render_batch(chosen, seed=seed * 1_000_003 + step)
        step += 1


def train_vae(pipe, steps: int, batch: int, lr: float, seed: int) -> dict[str, float]:
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    data = _batches(seed + 1, batch)
    loss = torch.tensor(0.0)
    for step in range(steps):
        _, images = next(data)
        x = images * 2 - 1
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 250 == 0 or step == steps - 1:
            logger.info("vae step %d/%d loss %.5f", step, steps, loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        _, images = next(_batches(seed + 2, 512))
        lat = vae.encode(images * 2 - 1).latent_dist.mode()
    shift, scale = float(lat.mean()), float(1.0 / lat.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return {"vae_loss": float(loss.detach()), "shift_factor": shift, "scaling_factor": scale}


def train_flow(pipe, steps: int, batch: int, lr: float, seed: int, cfg_dropout: float = 0.1) -> dict[str, float]:
    vae, tr = pipe.vae, pipe.transformer
    modules = [tr, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * max(0.1, 1 - s / steps)
    )
    gen = torch.Generator().manual_seed(seed)
    drop = random.Random(seed)
    data = _batches(seed + 3, batch)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    ema = 0.0
    for step in range(steps):
        captions, images = next(data)
        captions = ["" if drop.random() < cfg_dropout else c for c in captions]
        with torch.no_grad():
            x0 = (vae.encode(images * 2 - 1).latent_dist.mode() - shift) * scale
        pe, _, pooled, _ = pipe.encode_prompt(
            prompt=captions, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False,
            max_sequence_length=T5_TOKENS, device=torch.device("cpu"),
        )
        sigma = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal(0, 1)
        eps = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * eps
        v = tr(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=pe, pooled_projections=pooled,
               return_dict=False)[0]
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if step == 0 else 0.98 * ema + 0.02 * loss.item()
        if step % 250 == 0 or step == steps - 1:
            logger.info("flow step %d/%d loss %.4f (ema %.4f)", step, steps, loss.item(), ema)
    for m in modules:
        m.eval().requires_grad_(False)
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
