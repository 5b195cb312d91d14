"""Framework overhead: one alignkit training iteration vs. the raw model work it contains, on both paths.

For a tiny and a mid-size (~41M parameter transformer) random SD3 pipeline and for each path -- ``flow_grpo``
(every step an SDE step, one advantage per sample) and ``tempflow`` (the default recipe's algorithm,
``tempflow_grpo_small``: an ODE trunk, 4 children at every branch step completed by ODE, shared-input training)
-- one epoch (rollout, reward, credit, clipped updates) is timed through :class:`alignkit.trainer.Trainer`, and the
same model work is timed in a plain loop written directly against the diffusers modules: prompt encoding, the CFG
transformer forwards of the rollout (for TempFlow: the trunk, then each child's completion; a child's own step
reuses the trunk's evaluation), the VAE decode, the reward, and for every training minibatch the policy forward
with grad (TempFlow: one per distinct branch input), the reference forward, backward and the optimizer step.

The two alternate in one process (A B A B ..., ``--reps`` pairs after a warm-up pair). Reported per size and path:
the ratio of each pair and their geometric mean with a 95% interval (t over the pairs' log ratios), and the
framework's own time: the alignkit epoch's wall time minus the time spent inside model calls (the trainer's
``FlopMeter`` timers, logged by runs as ``time/model_s``). Results (with provenance: commit, versions, threads, load
average) go to ``--out``.

    python bench/overhead.py [--reps 10] [--sizes tiny mid] [--paths flow_grpo tempflow]
        [--out bench/results/overhead.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from alignkit.cpu_threads import prepare_openmp

prepare_openmp()  # before torch loads, as the alignkit command does (alignkit.cpu_threads)

import torch  # noqa: E402

from alignkit.compose import load_run_config  # noqa: E402
from alignkit.modalities.image.tiny import SD3_MID_TRANSFORMER, build_tiny_sd3_pipeline  # noqa: E402
from alignkit.provenance import environment  # noqa: E402
from alignkit.rewards.compression import JpegCompressibility  # noqa: E402
from alignkit.stats import mean_estimate  # noqa: E402
from alignkit.trainer import Trainer  # noqa: E402

logger = logging.getLogger("bench.overhead")

SIZES = {
    "tiny": {"transformer_kwargs": None, "height": 32, "prompts": 4, "seeds": 4, "batch": 16},
    "mid": {"transformer_kwargs": SD3_MID_TRANSFORMER, "height": 32, "prompts": 2, "seeds": 4, "batch": 8},
}
PATHS = {
    "flow_grpo": [],
    # the default recipe's algorithm (recipes/algo/tempflow_grpo_small.yaml): 2 seeds x 4 children at every branch step
    "tempflow": ["algo=tempflow_grpo_small"],
}


def make_trainer(size: str, path: str, workdir: Path) -> Trainer:
    spec = SIZES[size]
    folder = workdir / f"sd3_{size}"
    if not folder.is_dir():
        build_tiny_sd3_pipeline(seed=0, transformer_kwargs=spec["transformer_kwargs"]).save_pretrained(
            folder, safe_serialization=True
        )
    seeds = [] if path == "tempflow" else [f"algo.num_seeds={spec['seeds']}"]
    cfg = load_run_config("sd3_tiny_flow_grpo", [
        *PATHS[path], *seeds, f"backbone.pretrained={folder}", f"backbone.height={spec['height']}",
        f"backbone.width={spec['height']}", f"output_dir={workdir / f'run_{size}_{path}'}",
        f"train.prompts_per_epoch={spec['prompts']}", f"train.rollout_batch_size={spec['batch']}",
        f"train.train_batch_size={spec['batch']}", "train.ema.enabled=false", "train.resume=false",
    ])
    return Trainer(cfg, tensorboard=False)


def framework_epoch(trainer: Trainer, epoch: int) -> tuple[float, float]:
    """``(wall seconds, seconds inside model calls)`` of one alignkit epoch (rollout to update)."""
    trainer.meter.take_seconds()
    t0 = time.perf_counter()
    rolled = trainer.rollout(epoch)
    gathered = trainer.score(rolled)
    trainer.optimize(rolled.rollout, gathered, trainer.assign_credit(gathered).credit, epoch)
    wall = time.perf_counter() - t0
    return wall, sum(trainer.meter.take_seconds().values())


def raw_update(tr: torch.nn.Module, opt: torch.optim.Optimizer, emb: torch.Tensor, pool: torch.Tensor,
               n_inputs: int, train_batch: int, h: int) -> None:
    """The update's model work written directly: per minibatch of ``train_batch`` of the ``n_inputs`` training
    inputs, a policy forward with grad and an adapter-free reference forward over ``2b`` rows (CFG halves,
    latents ``[2b, 4, h, h]``, text ``emb`` / ``pool`` of at least ``2b`` rows), a backward and an optimizer step."""
    tr.train()
    for start in range(0, n_inputs, train_batch):
        b = min(train_batch, n_inputs - start)
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


def _encoded(pipe: Any, cfg: Any, prompts: list[str], repeats: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CFG text embeddings and pooled projections of ``prompts`` (negative half first), each prompt repeated
    ``repeats`` times, the first ``2 * rows`` rows."""
    with torch.no_grad():
        pe, npe, pooled, npooled = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=True,
            negative_prompt=[""] * len(prompts), max_sequence_length=cfg.backbone.max_sequence_length,
        )
    emb = torch.cat([npe, pe]).repeat_interleave(repeats, 0)[: 2 * rows]
    pool = torch.cat([npooled, pooled]).repeat_interleave(repeats, 0)[: 2 * rows]
    return emb, pool


def _decode_and_score(pipe: Any, finals: list[torch.Tensor], reward: JpegCompressibility) -> None:
    """VAE-decode the final latents and score the images, as the rollout's decode and reward phases do."""
    with torch.no_grad():
        images = pipe.vae.decode(torch.cat(finals) / pipe.vae.config.scaling_factor, return_dict=False)[0]
        images = (images / 2 + 0.5).clamp(0, 1)
    reward(images, [""] * len(images), [{}] * len(images))


def _raw_optimizer(tr: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW over the trainable (LoRA) parameters: a real step of the same size; lr ~0 keeps the model fixed."""
    return torch.optim.AdamW([p for p in tr.parameters() if p.requires_grad], lr=1e-12)


def raw_epoch(trainer: Trainer) -> float:
    """The same model work as one Flow-GRPO epoch, written directly against the diffusers modules."""
    cfg = trainer.cfg
    pipe = trainer.sampler.pipe
    tr = pipe.transformer
    g = cfg.backbone.guidance_scale
    n_prompts, n_seeds, batch = cfg.train.prompts_per_epoch, cfg.algo.num_seeds, cfg.train.rollout_batch_size
    steps = cfg.backbone.num_steps
    h = cfg.backbone.height // pipe.vae_scale_factor
    reward = JpegCompressibility()
    opt = _raw_optimizer(tr)
    t0 = time.perf_counter()
    s_total = n_prompts * n_seeds
    emb, pool = _encoded(pipe, cfg, trainer.train_prompts.prompts[:n_prompts], n_seeds, s_total)
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
    _decode_and_score(pipe, finals, reward)
    raw_update(tr, opt, emb, pool, s_total * (steps - 1), cfg.train.train_batch_size, h)
    return time.perf_counter() - t0


def raw_tempflow_epoch(trainer: Trainer) -> float:
    """The same model work as one TempFlow-GRPO epoch (branching at every step but the last, shared-input
    training), written directly against the diffusers modules."""
    cfg = trainer.cfg
    pipe = trainer.sampler.pipe
    tr = pipe.transformer
    g = cfg.backbone.guidance_scale
    n_prompts, n_seeds, batch = cfg.train.prompts_per_epoch, cfg.algo.num_seeds, cfg.train.rollout_batch_size
    children = int(cfg.algo.plan.options["children"])
    steps = cfg.backbone.num_steps
    h = cfg.backbone.height // pipe.vae_scale_factor
    reward = JpegCompressibility()
    opt = _raw_optimizer(tr)
    t0 = time.perf_counter()
    s_total = n_prompts * n_seeds
    rows = max(batch, s_total * children)
    emb, pool = _encoded(pipe, cfg, trainer.train_prompts.prompts[:n_prompts], rows, rows)

    def velocity(x: torch.Tensor, i: int) -> torch.Tensor:
        """CFG velocity of ``x`` [b, C, h, w] at step ``i``, in rollout batches."""
        out = []
        for start in range(0, x.shape[0], batch):
            xb = x[start : start + batch]
            b = xb.shape[0]
            t = torch.full((2 * b,), 1000.0 * (1 - i / steps))
            pred = tr(hidden_states=torch.cat([xb, xb]), timestep=t, encoder_hidden_states=emb[: 2 * b],
                      pooled_projections=pool[: 2 * b], return_dict=False)[0]
            u, c = pred.chunk(2)
            out.append(u + g * (c - u))
        return torch.cat(out)

    finals = []
    with torch.no_grad():
        x = torch.randn(s_total, 4, h, h)
        trunk = []
        for i in range(steps - 1):  # the trunk stops at the last branch step; its evaluation serves the children
            v = velocity(x, i)
            trunk.append((x, v))
            x = x - v / steps
        for k, (xk, vk) in enumerate(trunk):
            child = (xk - vk / steps).repeat_interleave(children, 0)
            child = child + 0.1 * torch.randn_like(child)  # the SDE step's noise
            for j in range(k + 1, steps):
                child = child - velocity(child, j) / steps
            finals.append(child)
    _decode_and_score(pipe, finals, reward)
    # one distinct input per branch point: its children share it
    raw_update(tr, opt, emb, pool, s_total * (steps - 1), cfg.train.train_batch_size, h)
    return time.perf_counter() - t0


RAW = {"flow_grpo": raw_epoch, "tempflow": raw_tempflow_epoch}


def pair_statistics(framework: list[float], raw: list[float], model: list[float]) -> dict[str, object]:
    """Per-pair ratios, their geometric mean with a 95% t interval over the pairs' log ratios, and the framework's
    own time (wall minus time inside model calls)."""
    ratios = [f / r for f, r in zip(framework, raw, strict=True)]
    logs = mean_estimate([math.log(x) for x in ratios])
    lo, hi = logs.ci95
    own = [f - m for f, m in zip(framework, model, strict=True)]
    return {"framework_s": framework, "raw_s": raw, "model_s": model, "pair_ratios": ratios,
            "ratio_geomean": math.exp(logs.mean), "ratio_ci95": [math.exp(lo), math.exp(hi)] if logs.n >= 2 else None,
            "ratio_of_medians": statistics.median(framework) / statistics.median(raw),
            "framework_own_s": own, "framework_own_share": statistics.median(
                [o / f for o, f in zip(own, framework, strict=True)])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10, help="interleaved (alignkit, plain loop) pairs")
    parser.add_argument("--sizes", nargs="+", default=["tiny", "mid"], choices=list(SIZES))
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/overhead.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    if args.reps < 2:
        parser.error(f"--reps {args.reps}: the interval needs at least 2 pairs (10 for reported figures)")
    load_before = list(os.getloadavg())
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            for path in args.paths:
                trainer = make_trainer(size, path, Path(tmp))
                raw_fn = RAW[path]
                n_params = sum(p.numel() for p in trainer.sampler.pipe.transformer.parameters())
                framework_epoch(trainer, 0)  # warm-up pair
                raw_fn(trainer)
                fw, raw, model = [], [], []
                for r in range(args.reps):  # A B A B ...
                    wall, inside = framework_epoch(trainer, r + 1)
                    fw.append(wall)
                    model.append(inside)
                    raw.append(raw_fn(trainer))
                stats = pair_statistics(fw, raw, model)
                results[f"{size}/{path}"] = {"size": size, "path": path, "transformer_params": n_params, **stats}
                ci = stats["ratio_ci95"]
                logger.info("%-5s %-9s %6.1fM params  ratio %.3f [%.3f, %.3f] (%d pairs)  framework's own time "
                            "%.0f%% of the epoch", size, path, n_params / 1e6, stats["ratio_geomean"], ci[0], ci[1],
                            args.reps, 100 * stats["framework_own_share"])
    provenance = {**environment(), "load_average_before": load_before, "load_average_after": list(os.getloadavg())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"provenance": provenance, "reps": args.reps, "results": results}, indent=1))
    logger.info("written %s", args.out)


if __name__ == "__main__":
    main()
