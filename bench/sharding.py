"""DDP against FSDP (``train.sharding``) side by side: what each process holds, and how long an epoch takes.

Two processes (``accelerate launch``; gloo on CPU, NCCL on GPUs) train the same recipe for ``--epochs``
epochs under ``train.sharding=ddp`` and then ``fsdp``, for LoRA and for full fine-tuning. Reported per case,
from process 0:

* bytes of the trainable module's parameters held by the process (local shards under FSDP), of its
  trainable parameters, and of the optimizer state (AdamW moments);
* median seconds of rollout and of training per epoch, over the epochs after the first;
* the final reward mean (the two modes train the same update, so it should agree to float tolerance).

The ratio ``fsdp / ddp`` of each figure is written with the results. On CPU with the tiny backbone the times
measure the collectives' overhead on a model of ~40k parameters, not the scaling of a large one.

    python bench/sharding.py [--recipe sd3_tiny_flow_grpo] [--epochs 4] [--out bench/results/sharding_cpu_tiny.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
logger = logging.getLogger("bench.sharding")


def _local_bytes(tensors: list) -> int:
    from alignkit.fsdp import is_sharded

    total = 0
    for t in tensors:
        local = t.to_local() if is_sharded(t) else t
        total += local.numel() * local.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    """One process of one case: train, then (process 0) write the figures to ``args.result``."""
    import torch

    from alignkit.compose import load_run_config
    from alignkit.trainer import Trainer

    overrides = [f"output_dir={args.output}", f"train.epochs={args.epochs}", "train.resume=false",
                 f"train.sharding={args.mode}", "train.checkpoint_every=1000", "train.sample_every=1000",
                 *args.overrides]
    trainer = Trainer(load_run_config(args.recipe, overrides), tensorboard=False)
    state = trainer.train()
    module = trainer.sampler.trainable_module()
    opt_state = [v for s in trainer.optimizer.optimizer.state.values() for v in s.values()
                 if isinstance(v, torch.Tensor) and v.dim() > 0]
    if trainer.shard.rank != 0:
        return
    later = state.history[1:] or state.history
    out = {
        "mode": args.mode, "processes": trainer.shard.world_size,
        "module_param_bytes": _local_bytes(list(module.parameters())),
        "trainable_param_bytes": _local_bytes(trainer.params),
        "optimizer_state_bytes": _local_bytes(opt_state),
        "rollout_s": statistics.median(m["time/rollout_s"] for m in later),
        "train_s": statistics.median(m["time/train_s"] for m in later),
        "reward_last": state.history[-1]["reward/score_mean"],
    }
    Path(args.result).write_text(json.dumps(out))


def launch(recipe: str, mode: str, overrides: list[str], epochs: int, work: Path) -> dict:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        raise SystemExit("accelerate's launcher is not installed next to this Python")
    result = work / f"{mode}.json"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", __file__, "--worker", "--mode", mode,
           "--recipe", recipe, "--epochs", str(epochs), "--output", str(work / mode), "--result", str(result),
           "--", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stdout.decode()[-4000:]}")
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="sd3_tiny_flow_grpo")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "sharding_cpu_tiny.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides (after --)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.worker else logging.INFO, format="%(message)s")
    if args.worker:
        worker(args)
        return
    cases = {"lora": [], "full": ["backbone.lora.enabled=false", "train.learning_rate=1e-4"]}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in cases.items():
            runs = {mode: launch(args.recipe, mode, [*extra, *args.overrides], args.epochs, Path(tmp) / name)
                    for mode in ("ddp", "fsdp")}
            ratio = {k: runs["fsdp"][k] / runs["ddp"][k] for k in
                     ("module_param_bytes", "trainable_param_bytes", "optimizer_state_bytes", "rollout_s", "train_s")
                     if runs["ddp"][k]}
            results[name] = {**runs, "fsdp_over_ddp": ratio}
            logger.info("%s: %s", name, json.dumps(ratio))
    Path(args.out).write_text(json.dumps({"recipe": args.recipe, "epochs": args.epochs, "cases": results},
                                         indent=1) + "\n")
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
