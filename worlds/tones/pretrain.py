"""Pretrain the tones text-to-audio model on CPU, reproducibly, and write the shipped weights.

    python -m alignkit.worlds.tones.pretrain [--out DIR] [--vae-steps 800] [--steps 2000] [--seed 0] [--threads 1]

Stage 1 trains the SAME autoencoder to reconstruct rendered clips (waveform MSE), then sets its bottleneck's
``running_std`` to the latents' standard deviation, so that the latents the DiT sees have unit variance (the
decoder multiplies it back: reconstructions are unchanged). Stage 2 encodes a pool of ``--pool`` rendered clips
once with the frozen autoencoder and trains the DiT and the T5Gemma encoder jointly on it with the rectified-flow
loss, dropping 10% of captions (for CFG); the loop is the shapes worlds'
(:func:`alignkit.worlds.pretrain_common.train_rectified_flow`). Only training-split captions are used; held-out
captions (``prompt_set(..., split="heldout")``) never are. Everything random is drawn from generators seeded by
``--seed``; with the same thread count the result is bit-identical. The run ends by sampling the held-out prompts
of ``recipes/tones_tempflow_grpo.yaml`` deterministically through
:class:`~alignkit.modalities.audio.stable_audio.StableAudio3Sampler` and writing their ToneEval to
``pretrain_info.json``. The step counts are deliberately short: the shipped model gets the easy attributes right
often but not always, so that reinforcement learning has something to improve.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import StableAudio3Pipeline

from alignkit.worlds.pretrain_common import caption_batches, save_pretrained_run, train_rectified_flow
from alignkit.worlds.tones.model import WEIGHTS_DIR, build_tones_pipeline
from alignkit.worlds.tones.world import CLIP_SECONDS, NUM_SAMPLES, prompt_set, render_batch

__all__ = ["heldout_toneeval", "latent_pool", "pretrain", "train_flow", "train_vae"]

logger = logging.getLogger(__name__)

RECIPE = "tones_tempflow_grpo"
"""The recipe whose backbone and held-out evaluation settings the final evaluation uses."""


def _clips(seed: int, batch: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Endless ``(captions, clips [B, 1, T] in [-1, 1])`` batches of training-split prompts."""
    return caption_batches(prompt_set, render_batch, seed, batch)


def train_vae(pipe: StableAudio3Pipeline, steps: int, batch: int, lr: float, seed: int, latent_noise: float = 0.25,
              stats_clips: int = 256, log_every: int = 100) -> dict[str, float]:
    """Stage 1: the SAME autoencoder (waveform MSE, AdamW, linear decay to 10%), then its latent scale.

    SAME is deterministic (no posterior to sample); trained on the plain reconstruction error its decoder turns
    small latent errors into loud noise (a latent error of 0.3 latent std decoded silence at -15 dBFS, as loud as
    the tones), which a generator's errors then fill every clip with. So, like a VAE's posterior noise, Gaussian
    noise of ``latent_noise`` times the batch's latent std is added before decoding:
    ``mse(decode(z + latent_noise * std(z) * eps)[..., :T], x)``, ``eps`` from a generator seeded by ``seed``.
    Afterwards ``bottleneck.running_std`` is set to the standard deviation of the latents of ``stats_clips`` fresh
    clips, whose first 64 also give ``vae_heldout_mse`` / ``vae_heldout_snr_db`` (clean latents) and
    ``vae_noisy_snr_db`` (latents plus noise of 0.1 std).
    """
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.1, 1 - s / steps))
    data = _clips(seed + 1, batch)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        _, x = next(data)
        z = vae.encode(x).latents  # [B, D, L]
        z = z + latent_noise * z.detach().std() * torch.randn(z.shape, generator=gen)
        rec = vae.decode(z).sample[..., :NUM_SAMPLES]
        loss = F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            logger.info("vae step %d/%d loss %.6f", step, steps, loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        _, x = next(_clips(seed + 2, stats_clips))
        lat = torch.cat([vae.encode(chunk).latents for chunk in x.split(64)])  # [N, D, L]
        std = lat.std()
        vae.bottleneck.running_std.mul_(std)
        z = vae.encode(x[:64]).latents  # [64, D, L], unit std now
        rec = vae.decode(z).sample[..., :NUM_SAMPLES]
        noisy = vae.decode(z + 0.1 * torch.randn(z.shape, generator=gen)).sample[..., :NUM_SAMPLES]
    power = x[:64].pow(2).mean()
    mse, noisy_mse = float(F.mse_loss(rec, x[:64])), float(F.mse_loss(noisy, x[:64]))
    return {"vae_loss": float(loss.detach()), "vae_heldout_mse": mse,
            "vae_heldout_snr_db": float(10 * torch.log10(power / max(mse, 1e-12))),
            "vae_noisy_snr_db": float(10 * torch.log10(power / max(noisy_mse, 1e-12))), "latent_std": float(std)}


def _conditioning(pipe: StableAudio3Pipeline, captions: list[str]) -> dict[str, torch.Tensor]:
    """The DiT's conditioning of ``captions``, built as ``StableAudio3Pipeline`` builds it (text with grad)."""
    cpu = torch.device("cpu")
    emb, mask = pipe.encode_prompt(captions, cpu, 1)
    with torch.no_grad():
        g = pipe.encode_duration(CLIP_SECONDS, cpu, 1, len(captions))  # [B, G]
    ctx, ctx_mask = pipe.prepare_cross_attention(emb, mask, g)
    return {"encoder_hidden_states": ctx, "encoder_attention_mask": ctx_mask, "global_hidden_states": g}


@torch.no_grad()
def latent_pool(pipe: StableAudio3Pipeline, size: int, seed: int, chunk: int = 64) -> tuple[list[str], torch.Tensor]:
    """``size`` training-split captions and their clips' latents ``[size, D, L]`` (what the pipeline decodes)."""
    captions: list[str] = []
    latents: list[torch.Tensor] = []
    data = _clips(seed, min(chunk, size))
    while len(captions) < size:
        caps, x = next(data)
        captions += caps
        latents.append(pipe.vae.encode(x).latents)
    return captions[:size], torch.cat(latents)[:size]


def train_flow(pipe: StableAudio3Pipeline, steps: int, batch: int, lr: float, seed: int, pool: int,
               cfg_dropout: float = 0.1) -> dict[str, float]:
    """Stage 2: the DiT and the T5Gemma encoder on a pool of latents ``[pool, 32, 250]``."""
    t0 = time.perf_counter()
    captions, latents = latent_pool(pipe, pool, seed + 3)
    logger.info("encoded a pool of %d clips in %.0f s", pool, time.perf_counter() - t0)
    tr = pipe.transformer
    pick = torch.Generator().manual_seed(seed + 4)

    def data() -> Iterator[tuple[list[str], torch.Tensor]]:
        while True:
            rows = torch.randint(0, pool, (batch,), generator=pick)
            yield [captions[i] for i in rows.tolist()], latents[rows]

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        # train_rectified_flow passes 1000 sigma; SA3's DiT takes sigma in [0, 1], as the pipeline feeds it
        return tr(x, t / 1000, return_dict=False, **cond)[0]

    ema = train_rectified_flow([tr, pipe.text_encoder], data(), lambda caps: _conditioning(pipe, caps), velocity,
                               steps=steps, lr=lr, seed=seed, cfg_dropout=cfg_dropout)
    return {"flow_loss_ema": ema}


def heldout_toneeval(folder: Path, *, num_prompts: int | None = None) -> dict[str, float]:
    """Held-out ToneEval (partial, strict) of the model in ``folder``, sampled deterministically.

    Uses the backbone and evaluation settings of :data:`RECIPE` (prompts, seeds per prompt, evaluation seed,
    steps, guidance), so the numbers equal that recipe's "before training" evaluation.
    """
    from alignkit.compose import load_run_config
    from alignkit.modalities.audio.stable_audio import StableAudio3Sampler
    from alignkit.reward_set import RewardSet, RewardTerm
    from alignkit.trainer import evaluate
    from alignkit.worlds.tones.prompts import tones_source
    from alignkit.worlds.tones.toneeval import ToneEval

    cfg = load_run_config(RECIPE, [f"backbone.pretrained={folder}"])
    sampler = StableAudio3Sampler.from_config(cfg.backbone, step_kind=cfg.algo.step_kind,
                                              noise_level=cfg.algo.noise_level, device="cpu")
    _, heldout = tones_source(cfg.prompts)
    rate = sampler.sample_rate
    rewards = RewardSet([RewardTerm("partial", ToneEval("partial", rate), 1.0),
                         RewardTerm("strict", ToneEval("strict", rate), 0.0)])
    e = cfg.eval
    _, table = evaluate(sampler, rewards, heldout, seed=e.seed, seeds_per_prompt=e.seeds_per_prompt,
                        batch_size=e.batch_size, limit=num_prompts or e.num_prompts)
    return {"heldout_toneeval_partial": float(table.raw["partial"].mean()),
            "heldout_toneeval_strict": float(table.raw["strict"].mean())}


def pretrain(out: Path, *, seed: int = 0, vae_steps: int = 800, vae_batch: int = 16, steps: int = 2000,
             batch: int = 32, pool: int = 4096, width: int = 64, layers: int = 4, lr: float = 1e-3,
             vae_lr: float = 2e-3, latent_noise: float = 0.25, evaluate: bool = True) -> dict[str, float]:
    """Build, train and save the tones pipeline into ``out``; returns the summary in ``pretrain_info.json``."""
    t0, c0 = time.perf_counter(), time.process_time()
    pipe = build_tones_pipeline(seed, width=width, layers=layers)
    info: dict[str, float] = {"seed": seed, "vae_steps": vae_steps, "vae_batch": vae_batch, "vae_lr": vae_lr,
                              "latent_noise": latent_noise,
                              "steps": steps, "batch": batch, "pool": pool, "width": width, "layers": layers, "lr": lr,
                              "threads": torch.get_num_threads(),
                              "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
                              "vae_parameters": sum(p.numel() for p in pipe.vae.parameters())}
    info |= train_vae(pipe, vae_steps, vae_batch, vae_lr, seed, latent_noise)
    info["vae_seconds"] = time.perf_counter() - t0
    info |= train_flow(pipe, steps, batch, lr, seed, pool)
    return save_pretrained_run(pipe, out, info, t0, c0, heldout_toneeval if evaluate else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=800)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--latent-noise", type=float, default=0.25,
                        help="latent noise (times the latent std) the decoder is trained to ignore")
    parser.add_argument("--steps", type=int, default=2000, help="DiT steps (batch --batch)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pool", type=int, default=4096, help="rendered clips encoded once for stage 2")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out ToneEval at the end")
    args = parser.parse_args(argv)
    for name in ("vae_steps", "vae_batch", "steps", "batch", "pool", "threads", "layers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: must be at least 1")
    if args.latent_noise < 0:
        parser.error(f"--latent-noise={args.latent_noise}: must be >= 0 (0 trains on clean latents)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    info = pretrain(args.out, seed=args.seed, vae_steps=args.vae_steps, vae_batch=args.vae_batch, steps=args.steps,
                    batch=args.batch, pool=args.pool, width=args.width, layers=args.layers, lr=args.lr,
                    vae_lr=args.vae_lr, latent_noise=args.latent_noise, evaluate=not args.no_eval)
    logger.info("wrote %s: %s", args.out, json.dumps(info))


if __name__ == "__main__":
    main()
