"""Sample efficiency on the shapes world: held-out ShapeEval against optimizer steps, NFE and seconds.

Methods (each ``--seeds`` runs): Flow-GRPO, TempFlow-GRPO (the released all-steps branching scaled down),
TempFlow-GRPO with a budgeted branch schedule, and the Flow-GRPO-Fast window variant. Every run trains
the shipped shapes model with the same prompts and budget of epochs, evaluating the held-out prompts with
deterministic (ODE) sampling every ``--eval-every`` epochs. Outputs: a JSON of every curve, a markdown
table and a PNG with three panels (score vs steps, vs NFE, vs seconds); the table gives for each method
the optimizer steps and NFE it needs to reach the Flow-GRPO runs' final held-out score.

    python bench/sample_efficiency.py [--epochs 100] [--eval-every 20] [--seeds 0 1 2] [--resume]
        [--out bench/results/sample_efficiency]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from alignkit.compose import load_run_config
from alignkit.metrics import read_metrics
from alignkit.trainer import Trainer

logger = logging.getLogger("bench.sample_efficiency")

METHODS: dict[str, list[str]] = {
    "flow_grpo": ["algo=flow_grpo", "algo.num_seeds=8"],
    "tempflow_all": ["algo=tempflow_grpo_small"],  # 2 seeds x 4 children at each of the 7 branch steps
    "tempflow_budget": ["algo=tempflow_grpo_small", "algo.plan.options.select=random", "+algo.plan.options.m=2"],
    "flow_grpo_fast": ["algo=flow_grpo_fast", "algo.num_seeds=8"],
    # budgeted: branch only where the signal is (per_step in bench/results/gradient_snr.json: steps 0-1 carry most)
    "tempflow_early": ["algo=tempflow_grpo_small", "algo.plan.options.select=fixed", "+algo.plan.options.steps=[0,1]"],
    "tempflow_first": ["algo=tempflow_grpo_small", "algo.plan.options.select=fixed", "+algo.plan.options.steps=[0]"],
}
METRIC = "eval/shapeeval_partial"  # held-out partial ShapeEval whatever the training reward


def run(method: str, seed: int, epochs: int, eval_every: int, workdir: Path, extra: list[str],
        threads: int = 0) -> list[dict]:
    """One training run; its held-out curve (one point per evaluation, the first before training)."""
    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out = workdir / f"{method}_s{seed}"
    cfg = load_run_config("shapes_tempflow_grpo", [
        *METHODS[method], f"output_dir={out}", f"seed={seed}", f"train.epochs={epochs}",
        f"eval.every={eval_every}", "eval.before_after=true", "train.resume=false",
        f"train.checkpoint_every={epochs}", f"train.sample_every={epochs}", *extra,
    ])
    Trainer(cfg, tensorboard=False).train()
    rows = read_metrics(out / "metrics.jsonl")
    return [{"epoch": r["epoch"], "steps": r["global_step"], "nfe": r["rollout/nfe_total"],
             "seconds": r["time/total_s"], "score": r[METRIC], "strict": r.get("eval/shapeeval_strict", math.nan)}
            for r in rows if METRIC in r]


def first_reaching(curve: list[dict], target: float, key: str) -> float:
    """Smallest ``key`` after training began at which the held-out score reaches ``target`` (NaN if never)."""
    for point in curve[1:]:
        if point["score"] >= target:
            return point[key]
    return math.nan


def table(curves: dict[str, list[list[dict]]]) -> tuple[str, dict[str, dict[str, float]]]:
    target = statistics.mean(c[-1]["score"] for c in curves["flow_grpo"])
    summary: dict[str, dict[str, float]] = {}
    base = statistics.mean(c[0]["score"] for c in curves["flow_grpo"])
    caveat = ("" if target > base else f" -- NOT above the base model's {base:.4f}: Flow-GRPO did not improve, so "
              "steps / NFE to reach it do not measure sample efficiency")
    lines = [f"target = Flow-GRPO final held-out ShapeEval (mean of seeds) = {target:.4f}{caveat}", "",
             "| method | base | final (mean ± sd) | strict final | steps to target | NFE to target | "
             "steps ratio vs Flow-GRPO | NFE ratio |", "|---|---|---|---|---|---|---|---|"]
    for method, runs in curves.items():
        finals = [c[-1]["score"] for c in runs]
        steps = [first_reaching(c, target, "steps") for c in runs]
        nfes = [first_reaching(c, target, "nfe") for c in runs]
        s = {"base": statistics.mean(c[0]["score"] for c in runs), "final": statistics.mean(finals),
             "final_sd": statistics.pstdev(finals), "strict": statistics.mean(c[-1]["strict"] for c in runs),
             "steps_to_target": _nanmean(steps), "nfe_to_target": _nanmean(nfes),
             "reached": sum(not math.isnan(x) for x in steps)}
        summary[method] = s
    for method, s in summary.items():
        fs, fn = summary["flow_grpo"]["steps_to_target"], summary["flow_grpo"]["nfe_to_target"]
        lines.append(
            f"| {method} | {s['base']:.4f} | {s['final']:.4f} ± {s['final_sd']:.4f} | {s['strict']:.3f} | "
            f"{s['steps_to_target']:.1f} ({s['reached']}/{len(curves[method])} runs) | {s['nfe_to_target']:.0f} | "
            f"{s['steps_to_target'] / fs:.2f} | {s['nfe_to_target'] / fn:.2f} |"
        )
    return "\n".join(lines), summary


def _nanmean(xs: list[float]) -> float:
    ok = [x for x in xs if not math.isnan(x)]
    return statistics.mean(ok) if ok else math.nan


def plot(curves: dict[str, list[list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, runs in curves.items():
        for i, key in enumerate(("steps", "nfe", "seconds")):
            for j, c in enumerate(runs):
                axes[i].plot([p[key] for p in c], [p["score"] for p in c], color=f"C{list(curves).index(method)}",
                             alpha=0.8, label=method if j == 0 else None)
    for ax, label in zip(axes, ("optimizer steps", "NFE (model evaluations)", "wall-clock seconds")):
        ax.set_xlabel(label)
        ax.set_ylabel("held-out ShapeEval (partial)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (each gets cpu_count/jobs threads)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sample_efficiency"))
    parser.add_argument("--resume", action="store_true",
                        help="keep the curves already in OUT/curves.json and run only the missing (method, seed) jobs")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    args.out.mkdir(parents=True, exist_ok=True)
    curves: dict[str, list[list[dict]]] = {m: [] for m in args.methods}
    if args.resume and (args.out / "curves.json").exists():
        # curves[m][i] is the run of args.seeds[i]: the jobs below are collected in seed order
        curves.update(json.loads((args.out / "curves.json").read_text()))
    jobs = [(m, seed) for i, seed in enumerate(args.seeds) for m in args.methods if i >= len(curves[m])]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {job: pool.submit(run, *job, args.epochs, args.eval_every, Path(tmp), args.overrides, threads)
                   for job in jobs}
        for (method, seed), future in futures.items():
            c = future.result()
            curves[method].append(c)
            logger.info("%s seed %d: %.4f -> %.4f in %d steps, %d NFE, %.0f s", method, seed, c[0]["score"],
                        c[-1]["score"], c[-1]["steps"], c[-1]["nfe"], c[-1]["seconds"])
            (args.out / "curves.json").write_text(json.dumps(curves, indent=1))
    text, summary = table(curves) if "flow_grpo" in curves else ("", {})
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(curves, args.out / "curves.png")
    logger.info("%s\nwritten %s", text, args.out)


if __name__ == "__main__":
    main()
