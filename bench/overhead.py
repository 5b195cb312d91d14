"""Framework overhead: one alignkit training iteration vs. the raw model work it contains.

For a tiny and a mid-size (~41M parameter transformer) random SD3 pipeline, one epoch of the Flow-GRPO
recipe (rollout, reward, credit, clipped updates) is timed through :class:`alignkit.trainer.Trainer`,
and the same model work is timed in a plain loop written directly against the diffusers modules:
prompt encoding, the CFG transformer forwards of the rollout, the VAE decode, the reward, and for every
training minibatch the policy forward with grad, the reference forward (adapter disabled), backward
and the optimizer step. Both run side by side in one process, alternating, and the ratio of medians
is reported (target: <= 1.15).

    python bench/overhead.py [--reps 3] [--sizes tiny mid] [--out bench/results/overhead.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from alignkit.compose import load_run_config
from alignkit.modalities.image.tiny import SD3_MID_TRANSFORMER, build_tiny_sd3_pipeline
from alignkit.rewards.compression import JpegCompressibility
from alignkit.trainer import Trainer

logger = logging.getLogger("bench.overhead")

SIZES = {
    "tiny": {"transformer_kwargs": None, "height": 32, "prompts": 4, "seeds": 4, "batch": 16},
    "mid": {"transformer_kwargs": SD3_MID_TRANSFORMER, "height": 32, "prompts": 2, "seeds": 4, "batch": 8},
}


def make_trainer(size: str, workdir: Path) -> Trainer:
    spec = SIZES[size]
    folder = workdir / f"sd3_{size}"
    build_tiny_sd3_pipeline(seed=0, transformer_kwargs=spec["transformer_kwargs"]).save_pretrained(
        folder, safe_serialization=True
    )
    cfg = load_run_config("sd3_tiny_flow_grpo", [
        f"backbone.pretrained={folder}", f"backbone.height={spec['height']}", f"backbone.width={spec['height']}",
        f"output_dir={workdir / ('run_' + size)}", f"train.prompts_per_epoch={spec['prompts']}",
        f"algo.num_seeds={spec['seeds']}", f"train.rollout_batch_size={spec['batch']}",
        f"train.train_batch_size={spec['batch']}", "train.ema.enabled=false", "train.resume=false",
    ])
    return Trainer(cfg, tensorboard=False)


def framework_epoch(trainer: Trainer, epoch: int) -> float:
    t0 = time.perf_counter()
    rolled = trainer.rollout(epoch)
    gathered = trainer.score(rolled)
    trainer.optimize(rolled.rollout, gathered, trainer.assign_credit(gathered).credit, epoch)
    return time.perf_counter() - t0


def raw_epoch(trainer: Trainer) -> float:
    """The same model work as one epoch, written directly against the diffusers modules."""
    cfg = trainer.cfg
    pipe = trainer.sampler.pipe
    tr = pipe.transformer
    g = cfg.backbone.guidance_scale
    n_prompts, n_seeds, batch = cfg.train.prompts_per_epoch, cfg.algo.num_seeds, cfg.train.rollout_batch_size
    prompts = trainer.train_prompts.prompts[:n_prompts]
    steps = cfg.backbone.num_steps
    h = cfg.backbone.height // pipe.vae_scale_factor
    reward = JpegCompressibility()
    params = [p for p in tr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-12)  # a real step of the same size; lr ~0 keeps the model fixed
    t0 = time.perf_counter()
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True,
            negative_prompt=[""] * len(prompts), max_sequence_length=cfg.backbone.max_sequence_length,
        )
    s_total = n_prompts * n_seeds
    emb = torch.cat([npe, pe]).repeat_interleave(n_seeds, 0)[: 2 * s_total]
    pool = torch.cat([npooled, pooled]).repeat_interleave(n_seeds, 0)[: 2 * s_total]
    latents = torch.randn(s_total, 4, h, h)
    finals = []
    with torch.no_grad():
        for start in range(0, s_total, batch):
            x = latents[start : start + batch]
            b = x.shape[0]
            e, p = emb[: 2 * b], pool[: 2 * b]
            for i in range(steps):
                t = torch.full((2 * b,), 1000.0 * (1 - i / steps))
                out = tr(hidden_states=torch.cat([x, x]), timestep=t, encoder_hidden_states=e,
                         pooled_projections=p, return_dict=False)[0]
                u, c = out.chunk(2)
                x = x - (u + g * (c - u)) / steps
            finals.append(x)
        images = pipe.vae.decode(torch.cat(finals) / pipe.vae.config.scaling_factor, return_dict=False)[0]
        images = (images / 2 + 0.5).clamp(0, 1)
    reward(images, [""] * s_total, [{}] * s_total)
    n_transitions = s_total * (steps - 1)
    tb = cfg.train.train_batch_size
    tr.train()
    for start in range(0, n_transitions, tb):
        b = min(tb, n_transitions - start)
        x = torch.randn(2 * b, 4, h, h)
        t = torch.full((2 * b,), 500.0)
        out = tr(hidden_states=x, timestep=t, encoder_hidden_states=emb[: 2 * b], pooled_projections=pool[: 2 * b],
                 return_dict=False)[0]
        with torch.no_grad():
            tr.disable_adapters()
            ref = tr(hidden_states=x, timestep=t, encoder_hidden_states=emb[: 2 * b],
                     pooled_projections=pool[: 2 * b], return_dict=False)[0]
            tr.enable_adapters()
        ((out - ref) ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    tr.eval()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=list(SIZES))
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            trainer = make_trainer(size, Path(tmp))
            n_params = sum(p.numel() for p in trainer.sampler.pipe.transformer.parameters())
            framework_epoch(trainer, 0)  # warm-up
            raw_epoch(trainer)
            fw, raw = [], []
            for r in range(args.reps):
                fw.append(framework_epoch(trainer, r + 1))
                raw.append(raw_epoch(trainer))
            ratio = statistics.median(fw) / statistics.median(raw)
            results[size] = {"transformer_params": n_params, "framework_s": fw, "raw_s": raw, "ratio": ratio,
                             "threads": torch.get_num_threads()}
            logger.info("%-5s %6.1fM params  framework %.2fs  raw %.2fs  ratio %.3f", size, n_params / 1e6,
                        statistics.median(fw), statistics.median(raw), ratio)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    logger.info("written %s", args.out)


if __name__ == "__main__":
    main()
