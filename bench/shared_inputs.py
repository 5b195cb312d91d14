"""Epochs of the default recipe with and without shared-input training, side by side.

Epochs of the default recipe (the shapes world, TempFlow-GRPO, K children per branch point: rollout, rewards,
credit, update) run with ``train.shared_inputs`` on and off, alternating, ``--reps`` times each (epoch ``r`` of
both modes draws the same prompts and noises). Reported: median wall and CPU (process) seconds per epoch and per
update (``Updater.optimize``: whole-group minibatches, policy forward with grad, reference forward, backward,
optimizer steps), the model FLOPs and inputs each update evaluated, with the machine's load average (the machine
is shared: CPU seconds are the steadier number).

    python bench/shared_inputs.py [--reps 5] [--out bench/results/shared_inputs.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from alignkit.compose import load_run_config
from alignkit.trainer import Trainer

logger = logging.getLogger("bench.shared_inputs")


def provenance() -> dict[str, object]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"commit": commit, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()), "cpus": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--out", type=Path, default=Path("bench/results/shared_inputs.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_run_config(args.recipe, [f"output_dir={tmp}", "train.resume=false", "eval.before_after=false"])
        trainer = Trainer(cfg, tensorboard=False)
        rows: dict[str, dict[str, list[float]]] = {
            m: {"wall_s": [], "cpu_s": [], "epoch_wall_s": [], "epoch_cpu_s": []} for m in ("shared", "per_transition")}
        stats: dict[str, dict[str, float]] = {}
        load = [os.getloadavg()[0]]
        for rep in range(args.reps + 1):  # repetition 0 warms up (and measures the FLOPs of each shape)
            for mode in rows:
                cfg.train.shared_inputs = mode == "shared"
                trainer.meter.take()
                e0, d0 = time.perf_counter(), time.process_time()
                rolled = trainer.rollout(rep)
                gathered = trainer.score(rolled)
                credit = trainer.assign_credit(gathered).credit
                w0, c0 = time.perf_counter(), time.process_time()
                out = trainer.optimize(rolled.rollout, gathered, credit, rep)
                end_wall, end_cpu = time.perf_counter(), time.process_time()
                flops = trainer.meter.take()["train"]
                if rep:
                    for key, value in (("wall_s", end_wall - w0), ("cpu_s", end_cpu - c0),
                                       ("epoch_wall_s", end_wall - e0), ("epoch_cpu_s", end_cpu - d0)):
                        rows[mode][key].append(value)
                stats[mode] = {"train_flops": float(flops), "inputs_evaluated": out["train/inputs_evaluated"],
                               "transitions_trained": out["train/transitions_trained"],
                               "minibatches": out["train/minibatches"]}
            load.append(os.getloadavg()[0])
    result: dict[str, object] = {"recipe": args.recipe, "reps": args.reps, "load_average_1min_during": load,
                                 "provenance": provenance()}
    for mode, times in rows.items():
        result[mode] = {**stats[mode], **{f"median_{k}": statistics.median(v) for k, v in times.items()}, **times}
    s, p = result["shared"], result["per_transition"]
    result["speedup_cpu"] = p["median_cpu_s"] / s["median_cpu_s"]  # type: ignore[index]
    result["speedup_wall"] = p["median_wall_s"] / s["median_wall_s"]  # type: ignore[index]
    result["flops_ratio"] = s["train_flops"] / p["train_flops"]  # type: ignore[index]
    result["epoch_speedup_cpu"] = p["median_epoch_cpu_s"] / s["median_epoch_cpu_s"]  # type: ignore[index]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    logger.info("%s: update %.2f s CPU (%.2f wall) per-transition vs %.2f s CPU (%.2f wall) shared: %.2fx CPU; "
                "epoch %.2f vs %.2f s CPU (%.2f vs %.2f wall); FLOPs %.3g vs %.3g (%.2fx); inputs %d vs %d",
                args.recipe, p["median_cpu_s"], p["median_wall_s"], s["median_cpu_s"], s["median_wall_s"],  # type: ignore[index]
                result["speedup_cpu"], p["median_epoch_cpu_s"], s["median_epoch_cpu_s"],  # type: ignore[index]
                p["median_epoch_wall_s"], s["median_epoch_wall_s"], p["train_flops"], s["train_flops"],  # type: ignore[index]
                result["flops_ratio"], p["inputs_evaluated"], s["inputs_evaluated"])  # type: ignore[index]


if __name__ == "__main__":
    main()
