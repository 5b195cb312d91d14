"""Pretrain the moving-shapes video model on CPU, reproducibly, and write the shipped weights.

    python -m alignkit.worlds.moving_shapes.pretrain [--out DIR] [--vae-image-steps 500] [--vae-steps 250] \
        [--steps 3500]

Stage 1 trains the Wan autoencoder on rendered still frames, then on 9-frame clips (MSE + a small KL term), then
fixes its
per-channel ``latents_mean`` / ``latents_std`` from latent statistics. Stage 2 encodes a pool of
``--pool`` rendered clips once with the frozen autoencoder and trains the Wan transformer and the UMT5
encoder jointly on it with the rectified-flow loss, dropping 10% of captions (for CFG); the loops are the
image world's (:mod:`alignkit.worlds.pretrain_common`). Only training-split captions are used; held-out
captions (``prompt_set(..., split="heldout")``) never are. Everything random is drawn from generators
seeded by ``--seed``; with the same thread count the result is bit-identical. The run ends by sampling the
held-out prompts of ``recipes/shapes_video_tempflow_grpo.yaml`` deterministically through
:class:`~alignkit.modalities.video.wan.WanSampler` and writing their MotionEval to ``pretrain_info.json``. The step
counts are deliberately short: the shipped model is decent but imperfect, so that reinforcement learning
has something to improve.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import WanPipeline

from alignkit.worlds.moving_shapes.model import NUM_FRAMES, TOKEN_LENGTH, WEIGHTS_DIR, build_shapes_video_pipeline
from alignkit.worlds.moving_shapes.world import prompt_set, render_batch
from alignkit.worlds.pretrain_common import (
    caption_batches,
    save_pretrained_run,
    train_autoencoder,
    train_rectified_flow,
)

__all__ = ["heldout_motioneval", "latent_pool", "pretrain", "train_flow", "train_vae"]

logger = logging.getLogger(__name__)

RECIPE = "shapes_video_tempflow_grpo"
"""The recipe whose backbone and held-out evaluation settings the final evaluation uses."""


def _clips(seed: int, batch: int, num_frames: int) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Endless ``(captions, clips [B, 3, F, H, W] in [-1, 1])`` batches of training-split prompts (VAE layout)."""
    def render(specs: list, s: int) -> torch.Tensor:
        return render_batch(specs, s, num_frames=num_frames).permute(0, 2, 1, 3, 4) * 2 - 1

    return caption_batches(prompt_set, render, seed, batch)


def _latent_stats(pipe: WanPipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [1, C, 1, 1, 1], std [1, C, 1, 1, 1])`` of the VAE's latents as recorded in its config."""
    cfg = pipe.vae.config
    shape = (1, cfg.z_dim, 1, 1, 1)
    return torch.tensor(cfg.latents_mean).view(shape), torch.tensor(cfg.latents_std).view(shape)


def train_vae(pipe: WanPipeline, steps: int, batch: int, lr: float, seed: int, num_frames: int = NUM_FRAMES,
              stats_clips: int = 256, image_steps: int = 0, image_batch: int = 32) -> dict[str, float]:
    """Stage 1: the Wan autoencoder, then its per-channel ``latents_mean`` / ``latents_std`` (from ``stats_clips``
    fresh clips, whose first 64 also give the reconstruction error ``vae_heldout_mse``).

    Like Wan's own VAE, it first trains on still frames (``image_steps`` steps of ``image_batch`` one-frame
    clips ``[B, 3, 1, H, W]``: the causal encoder codes a clip's first frame alone, and still frames are 9x
    cheaper), then on ``num_frames``-frame clips (``steps`` steps of ``batch``). Trained on clips alone for
    the same time, the autoencoder stays colour-blind (every shape decodes olive).
    """
    vae = pipe.vae
    if image_steps:
        frames = (x[:, :, :1] for _, x in _clips(seed + 5, image_batch, 2))
        train_autoencoder(vae, frames, steps=image_steps, lr=2 * lr, seed=seed + 5, log_every=100)
    loss = train_autoencoder(vae, (x for _, x in _clips(seed + 1, batch, num_frames)), steps=steps, lr=lr,
                             seed=seed, log_every=50)
    with torch.no_grad():
        _, x = next(_clips(seed + 2, stats_clips, num_frames))
        lat = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in x.split(32)])  # [256, C, f, h, w]
        rec = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mode()).sample for chunk in x[:64].split(32)])
    mean, std = lat.mean(dim=(0, 2, 3, 4)), lat.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return {"vae_loss": loss, "vae_heldout_mse": float(torch.nn.functional.mse_loss(rec, x[:64])),
            "latent_std_min": float(std.min()), "latent_std_max": float(std.max())}


@torch.no_grad()
def latent_pool(pipe: WanPipeline, size: int, seed: int, num_frames: int = NUM_FRAMES,
                chunk: int = 64) -> tuple[list[str], torch.Tensor]:
    """``size`` training-split captions and their clips' normalised latents ``[size, C, f, h, w]``.

    Latents are the posterior modes, normalised as ``WanPipeline`` expects them: ``(z - latents_mean) /
    latents_std`` (the sampler decodes ``x * latents_std + latents_mean``).
    """
    mean, std = _latent_stats(pipe)
    captions: list[str] = []
    latents: list[torch.Tensor] = []
    data = _clips(seed, min(chunk, size), num_frames)
    while len(captions) < size:
        caps, x = next(data)
        captions += caps
        latents.append((pipe.vae.encode(x).latent_dist.mode() - mean) / std)
    return captions[:size], torch.cat(latents)[:size]


def train_flow(pipe: WanPipeline, steps: int, batch: int, lr: float, seed: int, pool: int,
               cfg_dropout: float = 0.1, num_frames: int = NUM_FRAMES) -> dict[str, float]:
    """Stage 2: the Wan transformer and the UMT5 encoder on a pool of latents ``[pool, 8, 5, 8, 8]``."""
    t0 = time.perf_counter()
    captions, latents = latent_pool(pipe, pool, seed + 3, num_frames)
    logger.info("encoded a pool of %d clips in %.0f s", pool, time.perf_counter() - t0)
    tr = pipe.transformer
    pick = torch.Generator().manual_seed(seed + 4)

    def data() -> Iterator[tuple[list[str], torch.Tensor]]:
        while True:
            rows = torch.randint(0, pool, (batch,), generator=pick)
            yield [captions[i] for i in rows.tolist()], latents[rows]

    def encode_text(caps: list[str]) -> dict[str, torch.Tensor]:
        emb, _ = pipe.encode_prompt(prompt=caps, do_classifier_free_guidance=False,
                                    max_sequence_length=TOKEN_LENGTH, device=torch.device("cpu"))
        return {"encoder_hidden_states": emb}

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return tr(hidden_states=x, timestep=t, return_dict=False, **cond)[0]

    ema = train_rectified_flow([tr, pipe.text_encoder], data(), encode_text, velocity, steps=steps, lr=lr,
                               seed=seed, cfg_dropout=cfg_dropout)
    return {"flow_loss_ema": ema}


def _reuse_vae(pipe: WanPipeline, folder: Path, info: dict[str, float]) -> dict[str, float]:
    """Load ``folder``'s stage-1 VAE into ``pipe``; its recorded VAE summary, after checking the settings match.

    Raises:
        ValueError: naming the setting that differs from the run that trained ``folder``'s VAE.
    """
    from diffusers import AutoencoderKLWan

    prior = json.loads((folder / "pretrain_info.json").read_text())
    for key in ("seed", "vae_image_steps", "vae_steps", "vae_batch"):
        if prior.get(key) != info[key]:
            raise ValueError(f"--vae-from {folder}: it was trained with {key}={prior.get(key)}, this run has "
                             f"{key}={info[key]}; use the same VAE settings or drop --vae-from")
    vae = AutoencoderKLWan.from_pretrained(folder / "vae")
    fresh = {k: v for k, v in pipe.vae.config.items() if k not in ("latents_mean", "latents_std")}
    if any(vae.config.get(k) != v for k, v in fresh.items() if not k.startswith("_")):
        raise ValueError(f"--vae-from {folder}: its VAE architecture differs from this build's; drop --vae-from")
    pipe.vae = vae.eval().requires_grad_(False)
    pipe.register_modules(vae=pipe.vae)
    keys = ("vae_loss", "vae_heldout_mse", "latent_std_min", "latent_std_max", "vae_seconds")
    return {k: prior[k] for k in keys} | {"vae_from": str(folder)}


def heldout_motioneval(folder: Path, *, num_prompts: int | None = None) -> dict[str, float]:
    """Held-out MotionEval (partial, strict) of the model in ``folder``, sampled deterministically.

    Uses the backbone and evaluation settings of :data:`RECIPE` (prompts, seeds per prompt, evaluation seed,
    steps, guidance), so the numbers equal that recipe's "before training" evaluation.
    """
    from alignkit.compose import load_run_config
    from alignkit.modalities.video.wan import WanSampler
    from alignkit.reward_set import RewardSet, RewardTerm
    from alignkit.trainer import evaluate
    from alignkit.worlds.moving_shapes.motioneval import MotionEval
    from alignkit.worlds.moving_shapes.prompts import shapes_video

    cfg = load_run_config(RECIPE, [f"backbone.pretrained={folder}"])
    sampler = WanSampler.from_config(cfg.backbone, step_kind=cfg.algo.step_kind, noise_level=cfg.algo.noise_level,
                                     device="cpu")
    _, heldout = shapes_video(cfg.prompts)
    rewards = RewardSet([RewardTerm("partial", MotionEval("partial"), 1.0),
                         RewardTerm("strict", MotionEval("strict"), 0.0)])
    e = cfg.eval
    _, table = evaluate(sampler, rewards, heldout, seed=e.seed, seeds_per_prompt=e.seeds_per_prompt,
                        batch_size=e.batch_size, limit=num_prompts or e.num_prompts)
    return {"heldout_motioneval_partial": float(table.raw["partial"].mean()),
            "heldout_motioneval_strict": float(table.raw["strict"].mean())}


def pretrain(out: Path, *, seed: int = 0, vae_image_steps: int = 500, vae_steps: int = 250, vae_batch: int = 8,
             steps: int = 3500,
             batch: int = 32, pool: int = 8192, width: int = 96, layers: int = 4, lr: float = 1e-3,
             stats_clips: int = 256, evaluate: bool = True, vae_from: Path | None = None) -> dict[str, float]:
    """Build, train and save the moving-shapes pipeline into ``out``; returns the summary in ``pretrain_info.json``.

    ``vae_from``: a folder written by an earlier run with the same seed and VAE settings; its stage-1
    autoencoder is loaded instead of retrained (retraining gives the same weights at the same thread count).
    """
    t0, c0 = time.perf_counter(), time.process_time()
    pipe = build_shapes_video_pipeline(seed, width=width, layers=layers)
    info: dict[str, float] = {"seed": seed, "vae_image_steps": vae_image_steps, "vae_steps": vae_steps,
                              "vae_batch": vae_batch, "steps": steps,
                              "batch": batch, "pool": pool, "width": width, "layers": layers, "lr": lr,
                              "threads": torch.get_num_threads(),
                              "transformer_parameters": sum(p.numel() for p in pipe.transformer.parameters())}
    if vae_from is None:
        info |= train_vae(pipe, vae_steps, vae_batch, 1e-3, seed, stats_clips=stats_clips,
                          image_steps=vae_image_steps)
        info["vae_seconds"] = time.perf_counter() - t0
    else:
        info |= _reuse_vae(pipe, Path(vae_from), info)
    info |= train_flow(pipe, steps, batch, lr, seed, pool)
    return save_pretrained_run(pipe, out, info, t0, c0, heldout_motioneval if evaluate else None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-image-steps", type=int, default=500, help="still-frame steps (batch 32) first")
    parser.add_argument("--vae-steps", type=int, default=250, help="9-frame clip steps (batch --vae-batch)")
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pool", type=int, default=8192, help="rendered clips encoded once for stage 2")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=96)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out MotionEval at the end")
    parser.add_argument("--vae-from", type=Path, default=None,
                        help="reuse the stage-1 VAE of an earlier run's folder (same seed and VAE settings)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    info = pretrain(args.out, seed=args.seed, vae_image_steps=args.vae_image_steps, vae_steps=args.vae_steps,
                    vae_batch=args.vae_batch, steps=args.steps,
                    batch=args.batch, pool=args.pool, width=args.width, layers=args.layers, lr=args.lr,
                    evaluate=not args.no_eval, vae_from=args.vae_from)
    logger.info("wrote %s: %s", args.out, json.dumps(info))


if __name__ == "__main__":
    main()
