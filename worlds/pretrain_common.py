"""What the worlds' pretraining commands share: captioned batches, the autoencoder, flow and masked diffusion loops.

The image world (:mod:`alignkit.worlds.shapes.pretrain`) and the video world
(:mod:`alignkit.worlds.moving_shapes.pretrain`) train an autoencoder on rendered samples, then a text-conditioned
velocity model with the rectified-flow loss on its latents. The loops are the same for both; each world
passes its renderer, its tensor layout and how its pipeline encodes captions and calls its transformer.
Everything random is drawn from generators seeded by the caller, so a run is reproducible bit for bit at a
fixed thread count.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["caption_batches", "save_pretrained_run", "train_autoencoder", "train_masked_diffusion",
           "train_rectified_flow"]

logger = logging.getLogger(__name__)

Conditioning = dict[str, torch.Tensor]


def caption_batches(
    draw: Callable[[int, int, str], Sequence[Any]],
    render: Callable[[Sequence[Any], int], torch.Tensor],
    seed: int,
    batch: int,
    pool: int = 20000,
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Endless ``(captions, samples)`` batches of training-split prompts.

    Args:
        draw: ``draw(n, seed, split)`` -> ``n`` prompt specs of ``split`` (a world's ``prompt_set``); only
            ``"train"`` is drawn.
        render: ``render(specs, seed)`` -> the samples of ``specs`` (``[B, ...]``), deterministic from ``seed``.
        seed: seed of the prompt pool, of the choice of prompts and of every render.
        batch: prompts per batch (with repeats).
        pool: size of the prompt pool drawn once (captions repeat within it).
    """
    specs = draw(pool, seed, "train")
    rng = random.Random(seed)
    step = 0
    while True:
        chosen = [specs[rng.randrange(len(specs))] for _ in range(batch)]
        yield [s.caption() for s in chosen], render(chosen, seed * 1_000_003 + step)
        step += 1


def train_autoencoder(
    vae: torch.nn.Module, data: Iterator[torch.Tensor], *, steps: int, lr: float, seed: int,
    kl_weight: float = 1e-6, log_every: int = 250,
) -> float:
    """Train a diffusers KL autoencoder on batches in [-1, 1]; returns the last loss.

    Loss: ``mse(decode(z), x) + kl_weight * KL`` with ``z = mean + std * eps`` drawn from the posterior
    (reparameterised, ``eps`` from a generator seeded by ``seed``). ``data`` yields the VAE's input layout:
    ``[B, 3, H, W]`` images for ``AutoencoderKL``, ``[B, 3, F, H, W]`` clips for ``AutoencoderKLWan``. The
    VAE is left frozen in eval mode.
    """
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        x = next(data)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            logger.info("vae step %d/%d loss %.5f", step, steps, loss.item())
    vae.eval().requires_grad_(False)
    return float(loss.detach())


def train_rectified_flow(
    modules: Iterable[torch.nn.Module],
    data: Iterator[tuple[list[str], torch.Tensor]],
    encode_text: Callable[[list[str]], Conditioning],
    velocity: Callable[[torch.Tensor, torch.Tensor, Conditioning], torch.Tensor],
    *,
    steps: int,
    lr: float,
    seed: int,
    cfg_dropout: float = 0.1,
    warmup: int = 200,
    log_every: int = 250,
) -> float:
    """Train a text-conditioned velocity model with the rectified-flow loss; returns the loss EMA (0.98).

    Per step: ``(captions, x0)`` from ``data`` (``x0``: normalised latents ``[B, ...]``), each caption replaced
    by ``""`` with probability ``cfg_dropout`` (so that the model also learns the unconditional velocity for
    CFG), ``sigma ~ logit-normal(0, 1)`` ``[B]``, ``eps ~ N(0, 1)``, ``x = (1 - sigma) x0 + sigma eps`` and the
    loss ``mse(velocity(x, 1000 sigma, encode_text(captions)), eps - x0)``. AdamW (weight decay 1e-4), linear
    warm-up over ``warmup`` steps then linear decay to 10%, gradients clipped at norm 1. Every module in
    ``modules`` trains (a transformer and its text encoders) and is left frozen in eval mode.

    Args:
        modules: the modules whose parameters train.
        data: endless ``(captions, x0)`` batches.
        encode_text: captions -> the conditioning passed to ``velocity`` (with gradients).
        velocity: ``(x [B, ...], timestep [B], conditioning)`` -> predicted velocity, shaped like ``x``.
        steps, lr, seed: optimiser steps, peak learning rate, seed of the caption dropout and the noise.
    """
    modules = list(modules)
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1 - s / steps)
    )
    gen = torch.Generator().manual_seed(seed)
    drop = random.Random(seed)
    ema = 0.0
    for step in range(steps):
        captions, x0 = next(data)
        captions = ["" if drop.random() < cfg_dropout else c for c in captions]
        cond = encode_text(captions)
        sigma = torch.sigmoid(torch.randn(len(captions), generator=gen))  # [B] logit-normal(0, 1)
        eps = torch.randn(x0.shape, generator=gen)
        s = sigma.view(-1, *(1,) * (x0.dim() - 1))
        xt = (1 - s) * x0 + s * eps
        loss = F.mse_loss(velocity(xt, sigma * 1000, cond), eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if step == 0 else 0.98 * ema + 0.02 * loss.item()
        if step % log_every == 0 or step == steps - 1:
            logger.info("flow step %d/%d loss %.4f (ema %.4f)", step, steps, loss.item(), ema)
    for m in modules:
        m.eval().requires_grad_(False)
    return ema


def train_masked_diffusion(
    model: torch.nn.Module,
    batch: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    mask_id: int,
    steps: int,
    lr: float,
    seed: int,
    warmup: int,
    allowed: torch.Tensor | None = None,
    log_every: int = 250,
) -> tuple[float, float]:
    """Train a masked LM with the masked diffusion loss; returns the last step's loss and its EMA (0.99).

    Per step: ``batch(gen)`` gives ``(prefix ids [b, L], prefix mask [b, L], target ids [b, G])`` (it may draw from
    ``gen``, before the masking does); a masking rate ``t ~ U(0, 1)`` per example, each target position masked with
    probability ``t`` and one more at random (so at least one), cross-entropy on the masked positions (over the
    ``allowed`` token ids only when given); the prefix is never masked. AdamW (weight decay 1e-2), linear warm-up
    over ``warmup`` steps then linear decay to 5%, gradients clipped at norm 1. The model is left in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.05, 1 - s / steps))
    model.train()
    loss_value, ema = float("nan"), float("nan")
    for step in range(steps):
        ids, pmask, y = batch(gen)
        b, g = y.shape
        t = torch.rand(b, 1, generator=gen)  # [b, 1]
        masked = torch.rand(b, g, generator=gen) < t  # [b, G]
        masked[torch.arange(b), torch.randint(0, g, (b,), generator=gen)] = True
        x = torch.where(masked, torch.full_like(y, mask_id), y)
        logits = model(input_ids=torch.cat([ids, x], 1),
                       attention_mask=torch.cat([pmask, torch.ones_like(x)], 1)).logits[:, -g:]
        if allowed is None:
            loss = F.cross_entropy(logits[masked], y[masked])
        else:  # over the allowed tokens: the target's index among them
            loss = F.cross_entropy(logits[masked][:, allowed], (y[masked][:, None] == allowed).int().argmax(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        ema = loss_value if step == 0 else 0.99 * ema + 0.01 * loss_value
        if step % log_every == 0 or step == steps - 1:
            logger.info("step %d/%d loss %.4f (ema %.4f)", step, steps, loss_value, ema)
    model.eval()
    return loss_value, ema


def save_pretrained_run(pipe: Any, out: Path, info: dict[str, Any], started: float, cpu_started: float,
                        evaluate: Callable[[Path], dict[str, Any]] | None) -> dict[str, Any]:
    """The end of a world's pretraining: ``train_seconds`` / ``train_cpu_seconds`` since ``started``
    (``time.perf_counter``) / ``cpu_started`` (``time.process_time``) into ``info``, the pipeline saved to ``out``
    (safetensors), ``evaluate(out)``'s held-out scores added, and ``info`` written to ``out/pretrain_info.json``."""
    info["train_seconds"] = time.perf_counter() - started
    info["train_cpu_seconds"] = time.process_time() - cpu_started
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(out, safe_serialization=True)
    logger.info("saved %s after %.0f s (%.0f s CPU)", out, info["train_seconds"], info["train_cpu_seconds"])
    if evaluate is not None:
        info |= evaluate(out)
    (out / "pretrain_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
