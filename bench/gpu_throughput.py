"""Rollout and training throughput of Flow-GRPO and TempFlow-GRPO on an SD3.5-Medium-shaped model, one GPU.

The transformer is ``SD3Transformer2DModel`` with Stable Diffusion 3.5 Medium's configuration (24 MMDiT-X
layers, 24 heads of 64, dual attention in layers 0-12, RMS QK-norm, 16 latent channels, patch 2) and random
weights, with the SD3 VAE's shape (16 latent channels, blocks 128/256/512/512); 512 px, 10 steps, bf16,
LoRA r=32 on the attention projections (the ``sd35_medium_*`` recipes). Text encoders are two 2-layer random
CLIP models with CLIP-L / CLIP-G widths (768, 1280) and no T5 (the pipeline feeds zeros in T5's place, as
for a checkpoint without it): prompts are encoded once per rollout, so they hardly affect throughput.

Measured through :class:`alignkit.trainer.Trainer` (the real rollout engine, reward and update code):

* rollout images/s: decoded samples per second of ``Trainer.rollout`` (rewards scored afterwards);
* training transitions/s: transitions per second of ``Trainer.optimize`` (policy forward with grad,
  reference forward for the KL, backward, optimizer step);
* peak memory: ``torch.cuda.max_memory_allocated`` (CPU: the process's peak RSS);
* model FLOPs utilisation: FLOPs counted by ``torch.utils.flop_counter`` on one model evaluation and on
  one training minibatch, scaled by the NFE / transitions done, over time x the device's peak dense bf16
  FLOP/s (``--peak-tflops``; known NVIDIA parts are recognised by name; none on CPU).

    python bench/gpu_throughput.py                  # GPU, SD3.5-Medium shape
    python bench/gpu_throughput.py --tiny           # CPU, tiny random SD3 (checks the script end to end)
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from alignkit.compose import load_run_config
from alignkit.reward_set import RewardSet, RewardTerm
from alignkit.trainer import Trainer
from alignkit.types import index_batch

logger = logging.getLogger("bench.gpu_throughput")

SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
"""``stabilityai/stable-diffusion-3.5-medium`` ``transformer/config.json`` (diffusers ``SD3Transformer2DModel``)."""

SD3_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 1.5305,
    "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False,
}
"""The SD3 / SD3.5 ``vae/config.json`` shape."""

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}
"""Dense bf16 tensor-core peaks (NVIDIA data sheets, SXM parts)."""

ALGOS = {"flow_grpo": ("sd35_medium_flow_grpo", "sd3_tiny_flow_grpo"),
         "tempflow_grpo": ("sd35_medium_tempflow_grpo", "sd3_tiny_tempflow_grpo")}


def build_sd35_medium_shaped(dtype: torch.dtype) -> Any:
    """A ``StableDiffusion3Pipeline`` with SD3.5-Medium's transformer and SD3's VAE shape, random weights."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from alignkit.modalities.image.tiny import build_tiny_tokenizer, clip_text_config

    torch.manual_seed(0)
    tok, tok2 = build_tiny_tokenizer(), build_tiny_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=AutoencoderKL(**SD3_VAE),
        text_encoder=CLIPTextModelWithProjection(clip_text_config(tok, hidden_size=768)), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(clip_text_config(tok2, hidden_size=1280)), tokenizer_2=tok2,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def measure(algo: str, *, tiny: bool, prompts: int, out: Path, peak_tflops: float | None) -> dict[str, Any]:
    """One warm-up epoch, then one timed epoch of ``algo``: rollout, reward, credit, update."""
    from alignkit.modalities.image.sd3 import SD3Sampler
    from alignkit.rewards.compression import JpegCompressibility

    recipe = ALGOS[algo][1 if tiny else 0]
    overrides = [f"output_dir={out / algo}", "train.resume=false", "train.overlap_rewards=false",
                 f"train.prompts_per_epoch={prompts}", "backbone.num_steps=10", "train.epochs=2"]
    if algo == "flow_grpo":
        overrides.append("algo.num_seeds=24")  # 24 samples per prompt
    else:
        overrides += ["algo.num_seeds=4", "algo.plan.options.children=6"]  # 4 noises x 6 children per branch step
    if tiny:
        overrides += ["device=cpu", "train.rollout_batch_size=24", "train.train_batch_size=24"]
    cfg = load_run_config(recipe, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    if tiny:
        from alignkit.modalities.diffusers_common import load_pipeline

        pipe = load_pipeline(SD3Sampler.pipeline_class, cfg.backbone)
    else:
        pipe = build_sd35_medium_shaped(torch.bfloat16)
    sampler = SD3Sampler(pipe, cfg.backbone, step_kind=cfg.algo.step_kind, noise_level=cfg.algo.noise_level,
                         device=device)
    trainer = Trainer(cfg, sampler=sampler, reward_set=RewardSet([RewardTerm("jpeg", JpegCompressibility(), 1.0)]),
                      tensorboard=False)
    n_params = sum(p.numel() for p in pipe.transformer.parameters())

    def epoch(e: int) -> dict[str, float]:
        _sync(device)
        t0 = time.perf_counter()
        rolled = trainer.rollout(e)
        rollout = rolled.rollout
        _sync(device)
        t1 = time.perf_counter()
        gathered = trainer.score(rolled)
        credit = trainer.assign_credit(gathered).credit
        t2 = time.perf_counter()
        stats = trainer.optimize(rollout, gathered, credit, e)
        _sync(device)
        t3 = time.perf_counter()
        trained = int(credit.mask.sum()) * cfg.train.inner_epochs
        return {"rollout_s": t1 - t0, "reward_s": t2 - t1, "train_s": t3 - t2, "samples": len(rollout.keys),
                "nfe": rollout.nfe, "transitions": trained, "minibatches": stats["train/minibatches"],
                "rollout": rollout, "credit": credit}

    epoch(0)  # warm-up: kernels, allocator, autotuning
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    r = epoch(1)
    rollout, credit = r.pop("rollout"), r.pop("credit")
    peak_mem = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    # FLOPs of one model evaluation per row (CFG included) and of one training minibatch per transition
    b = min(cfg.train.rollout_batch_size, len(rollout.transitions))
    tr = rollout.transitions.select(torch.arange(b))
    cond = index_batch(rollout.cond, rollout.keys.prompt_index[tr.sample_index])
    with torch.no_grad():
        eval_flops = _flops(lambda: sampler.transition(tr.state, tr.step.to(device), cond, stochastic=True)) / b
    tb = min(cfg.train.train_batch_size, len(rollout.transitions))
    rows = torch.arange(tb)
    sampler.train(True)

    def train_step() -> None:
        trainer.updater.minibatch_loss(rollout, credit, rows).loss.backward()

    train_flops = _flops(train_step) / tb
    trainer.optimizer.zero_grad(set_to_none=True)
    sampler.train(False)
    decode_flops = _flops(lambda: sampler.decode(rollout.final_state[:1]))
    rollout_flops = eval_flops * r["nfe"] + decode_flops * r["samples"]
    total_train_flops = train_flops * r["transitions"]
    peak = _peak_tflops(device, peak_tflops)
    result = {
        "recipe": recipe, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "transformer_params": n_params,
        "resolution": cfg.backbone.height, "num_steps": cfg.backbone.num_steps, "dtype": cfg.backbone.dtype,
        "mixed_precision": cfg.train.mixed_precision, "prompts": prompts, "samples": r["samples"],
        "nfe": r["nfe"], "trained_transitions": r["transitions"],
        "rollout_s": r["rollout_s"], "reward_s": r["reward_s"], "train_s": r["train_s"],
        "rollout_images_per_s": r["samples"] / r["rollout_s"],
        "rollout_model_evals_per_s": r["nfe"] / r["rollout_s"],
        "train_transitions_per_s": r["transitions"] / r["train_s"],
        "peak_memory_gib": peak_mem / 2**30,
        "gflops_per_model_eval": eval_flops / 1e9, "gflops_per_trained_transition": train_flops / 1e9,
        "rollout_tflops_per_s": rollout_flops / r["rollout_s"] / 1e12,
        "train_tflops_per_s": total_train_flops / r["train_s"] / 1e12,
        "peak_tflops": peak,
        "rollout_mfu": rollout_flops / r["rollout_s"] / (peak * 1e12) if peak else None,
        "train_mfu": total_train_flops / r["train_s"] / (peak * 1e12) if peak else None,
    }
    logger.info("%s: rollout %.2f images/s, training %.1f transitions/s, peak %.2f GiB, MFU rollout %s train %s",
                algo, result["rollout_images_per_s"], result["train_transitions_per_s"], result["peak_memory_gib"],
                _pct(result["rollout_mfu"]), _pct(result["train_mfu"]))
    return result


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random SD3 on CPU (checks the script)")
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=list(ALGOS))
    parser.add_argument("--prompts", type=int, default=1, help="prompts per timed epoch")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak dense bf16 TFLOP/s for MFU")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default bench/results/...)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --tiny for the CPU check")
    default = "gpu_throughput_cpu_tiny.json" if args.tiny else "gpu_throughput.json"
    out_path = args.out or Path(__file__).parent / "results" / default
    results: dict[str, Any] = {"torch": torch.__version__, "tiny": args.tiny}
    with tempfile.TemporaryDirectory() as tmp:
        for algo in args.algos:
            results[algo] = measure(algo, tiny=args.tiny, prompts=args.prompts, out=Path(tmp),
                                    peak_tflops=args.peak_tflops)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(results, indent=1))
    logger.info("written %s", out_path)


if __name__ == "__main__":
    main()
