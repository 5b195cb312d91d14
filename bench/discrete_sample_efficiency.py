"""Sample efficiency on the arithmetic masked-diffusion task: Flow-GRPO-style credit vs TempFlow-style branching.

    python bench/discrete_sample_efficiency.py [--epochs 30] [--seeds 0 1 2] [--eval-every 10]
                                               [--methods flow_grpo tempflow_uniform ...] [--resume]

Every method trains the shipped arithmetic model (``backbone=arithmetic``, LoRA) for the same number of
epochs on the same prompts per epoch, and is scored by held-out greedy exact match (1000 held-out
problems, deterministic decoding) every ``--eval-every`` epochs:

* ``flow_grpo``: every step but the last samples its tokens, one advantage per sample shared by its steps,
  prompt groups of ``--flow-seeds`` samples (16 by default: about the branching runs' model evaluations), one
  optimizer step per epoch like the branching runs;
* ``tempflow_<scale>``: greedy trunk, 4 sampled children per branch step (every step but the last), greedy
  completion, prompt-and-step groups, noise-aware weights ``w = s / mean(s)`` with the sampler's exploration
  scale ``s`` = ``uniform`` (all weights 1), ``masked_fraction`` or ``entropy``.

Writes ``curves.json`` (per run: epochs, held-out accuracy, NFE, seconds), ``summary.json`` and ``table.md``
to ``--out``. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignkit.compose import load_run_config
from alignkit.metrics import read_metrics
from alignkit.trainer import Trainer

logger = logging.getLogger("bench.discrete_sample_efficiency")

METHODS: dict[str, tuple[str, list[str]]] = {
    "flow_grpo": ("arithmetic_flow_grpo", []),
    "tempflow_uniform": ("arithmetic_tempflow_grpo", ["backbone.options.scale=uniform"]),
    "tempflow_masked_fraction": ("arithmetic_tempflow_grpo", ["backbone.options.scale=masked_fraction"]),
    "tempflow_entropy": ("arithmetic_tempflow_grpo", ["backbone.options.scale=entropy"]),
}
METRIC = "eval/exact"


def run_one(method: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    recipe, extra = METHODS[method]
    if method == "flow_grpo":
        # one minibatch holding every transition: one optimizer step per epoch, as the branching runs take
        extra = [*extra, f"algo.num_seeds={args.flow_seeds}", "train.train_batch_size=1000000"]
    overrides = [f"output_dir={out}", f"seed={seed}", f"train.epochs={args.epochs}", f"eval.every={args.eval_every}",
                 "eval.before_after=true", f"train.checkpoint_every={args.epochs}", "train.resume=false", *extra]
    start = time.perf_counter()
    Trainer(load_run_config(recipe, overrides), tensorboard=False).train()
    points = [(int(m["epoch"]), m[METRIC], int(m["rollout/nfe_total"]), m["time/total_s"])
              for m in read_metrics(out / "metrics.jsonl") if METRIC in m]
    return {"method": method, "seed": seed, "epochs": [p[0] for p in points], "heldout": [p[1] for p in points],
            "nfe": [p[2] for p in points], "train_seconds": [p[3] for p in points],
            "wall_seconds": time.perf_counter() - start}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def summarize(runs: list[dict], methods: list[str]) -> tuple[dict, str]:
    summary = {}
    lines = ["| method | held-out before | held-out after | gain | NFE (total) | train s |",
             "|---|---|---|---|---|---|"]
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        before = [r["heldout"][0] for r in rs]
        after = [r["heldout"][-1] for r in rs]
        gain = [a - b for a, b in zip(after, before)]
        summary[method] = {"seeds": [r["seed"] for r in rs], "before": before, "after": after, "gain": gain,
                           "nfe": rs[0]["nfe"][-1],
                           "train_seconds": statistics.mean(r["train_seconds"][-1] for r in rs)}
        lines.append(f"| {method} | {_mean_std(before)} | {_mean_std(after)} | {_mean_std(gain)} | {rs[0]['nfe'][-1]} "
                     f"| {summary[method]['train_seconds']:.0f} |")
    return summary, "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--flow-seeds", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "discrete_sample_efficiency")
    parser.add_argument("--resume", action="store_true", help="keep finished (method, seed) runs in curves.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    curves = args.out / "curves.json"
    runs: list[dict] = json.loads(curves.read_text())["runs"] if args.resume and curves.is_file() else []
    done = {(r["method"], r["seed"]) for r in runs}
    for seed in args.seeds:
        for method in args.methods:
            if (method, seed) in done:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                run = run_one(method, seed, args, Path(tmp))
            runs.append(run)
            logger.info("%s seed %d: held-out %s (%.0f s)", method, seed,
                        " -> ".join(f"{v:.3f}" for v in run["heldout"]), run["wall_seconds"])
            config = {"epochs": args.epochs, "eval_every": args.eval_every, "flow_seeds": args.flow_seeds,
                      "threads": args.threads}
            curves.write_text(json.dumps({"config": config, "runs": runs}, indent=1) + "\n")
    summary, table = summarize(runs, args.methods)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "table.md").write_text(table)
    logger.info("\n%s", table)


if __name__ == "__main__":
    main()
