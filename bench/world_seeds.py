"""A world recipe over several seeds: held-out score before and after training, paired by seed.

Each seed is one ``alignkit train RECIPE seed=S output_dir=RUNS/s<S>`` (a separate process, the command a user
runs, ``OMP_NUM_THREADS=--threads``). The analysis reads every run's ``summary.json`` (the held-out evaluation
before and after training, written by the run itself) and its ``environment.jsonl``:

* per reward: the mean over seeds of the score before and after with 95% t intervals, and the seed-paired change
  (after - before) with its 95% paired t interval (:func:`alignkit.stats.seed_paired_difference`);
* every seed's values, its training and wall seconds, model FLOPs, commit, threads and load average; unfinished or
  failed runs are listed, never dropped;
* ``OUT/<recipe>.json`` and ``OUT/<recipe>.md``, with the analysis's own provenance.

    python bench/world_seeds.py tones_tempflow_grpo --seeds 0 1 2 3 4 [--threads 1] [--runs DIR] [--out DIR]
        [overrides ...]
    python bench/world_seeds.py tones_tempflow_grpo --analyze-only --runs DIR

The before evaluation of every seed uses the recipe's evaluation seed and prompts, so the "before" scores of all
seeds are the same base model's (equal up to floating point); the seeds differ in their training draws.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from alignkit.provenance import environment, read_environment
from alignkit.stats import format_interval, mean_estimate, seed_paired_difference

logger = logging.getLogger("world_seeds")

OUT = Path(__file__).resolve().parent / "results" / "worlds"


def train(recipe: str, seed: int, folder: Path, threads: int, overrides: list[str]) -> dict[str, Any]:
    """One seed's run as a user starts it; returns its exit status and wall seconds (its log is ``folder.log``)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "alignkit", "train", recipe, f"seed={seed}", f"output_dir={folder}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    with open(folder.with_suffix(".log"), "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - t0
    logger.info("seed %d: exit %d after %.0f s (%s)", seed, rc, wall, folder)
    return {"exit": rc, "wall_s": wall, "command": " ".join(cmd[1:])}


def seed_row(folder: Path, launch: dict[str, Any] | None) -> dict[str, Any]:
    """What one run's ``summary.json`` and ``environment.jsonl`` say (``status`` names a missing summary)."""
    summary_file = folder / "summary.json"
    if not summary_file.is_file():
        return {"run": str(folder), "status": "no summary.json (failed or unfinished)", "launch": launch}
    summary = json.loads(summary_file.read_text())
    env = read_environment(folder)
    first = env[0] if env else {}
    rewards = {r["name"]: {"before": r["before"]["mean"], "after": r["after"]["mean"],
                           "change_ci95_prompts": r["change"]["ci95"]}
               for r in (summary.get("heldout") or {}).get("rewards", [])}
    cost = {k: summary.get(k) for k in ("rollout_nfe", "model_flops", "train_seconds", "wall_seconds")}
    return {"run": str(folder), "status": summary.get("status"), "rewards": rewards, "cost": cost,
            "launch": launch, "commit": first.get("commit"), "dirty": first.get("dirty"),
            "threads": first.get("threads"), "load_average": first.get("load_average")}


def analyse(rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per reward: before, after (mean over seeds, 95% t interval) and the seed-paired change."""
    names = sorted({n for r in rows.values() for n in r.get("rewards", {})})
    out: dict[str, Any] = {}
    for name in names:
        scored = {s: r["rewards"][name] for s, r in rows.items() if name in r.get("rewards", {})}
        before = {s: math.nan if v["before"] is None else v["before"] for s, v in scored.items()}
        after = {s: math.nan if v["after"] is None else v["after"] for s, v in scored.items()}
        out[name] = {"before": mean_estimate(list(before.values())).to_dict(),
                     "after": mean_estimate(list(after.values())).to_dict(),
                     "change": seed_paired_difference(before, after).to_dict()}
    return out


def markdown(recipe: str, result: dict[str, Any]) -> str:
    lines = [f"# {recipe}: held-out score before and after training, {len(result['seeds'])} seeds", "",
             "Mean over seeds [95% t interval]; change: seed-paired (after - before) [95% paired t interval].", "",
             "| reward | before | after | change |", "|---|---|---|---|"]
    for name, e in result["rewards"].items():
        b, a = e["before"], e["after"]
        lines.append(f"| {name} | {b['mean']:.3f} | {format_interval(a)} | {format_interval(e['change'], True)} |")
    lines += ["", "| seed | status | " + " | ".join(f"{n} before -> after" for n in result["rewards"]) +
              " | training s | wall s | load average |", "|---" * (len(result["rewards"]) + 5) + "|"]
    for seed, r in result["seeds"].items():
        cells = [f"{r['rewards'][n]['before']:.3f} -> {r['rewards'][n]['after']:.3f}" if n in r.get("rewards", {})
                 else "-" for n in result["rewards"]]
        cost = r.get("cost") or {}
        wall = (r.get("launch") or {}).get("wall_s") or cost.get("wall_seconds")
        load = r.get("load_average")
        load_text = " ".join(f"{v:.2f}" for v in load) if load else "-"
        lines.append(f"| {seed} | {r['status']} | " + " | ".join(cells) +
                     f" | {cost.get('train_seconds') or math.nan:.0f} | {wall or math.nan:.0f} | {load_text} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    parser.add_argument("--runs", type=Path, default=None, help="run folders RUNS/s<seed> (default: OUT/runs/RECIPE)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--analyze-only", action="store_true", help="read the existing RUNS/s<seed> folders")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs = args.runs or args.out / "runs" / args.recipe
    launches: dict[int, dict[str, Any] | None] = {}
    for seed in args.seeds:
        folder = runs / f"s{seed}"
        if args.analyze_only:
            launches[seed] = None
            continue
        if folder.exists():
            raise SystemExit(f"{folder} exists: give another --runs, or --analyze-only to read it")
        launches[seed] = train(args.recipe, seed, folder, args.threads, args.overrides)
    if args.analyze_only:
        missing = [s for s in args.seeds if not (runs / f"s{s}").is_dir()]
        if missing:
            raise SystemExit(f"--analyze-only: no run folders for seeds {missing} under {runs}")
    rows = {s: seed_row(runs / f"s{s}", launches[s]) for s in args.seeds}
    result = {"recipe": args.recipe, "overrides": args.overrides, "runs": str(runs),
              "rewards": analyse(rows), "seeds": rows, "provenance": environment()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.recipe}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{args.recipe}.md").write_text(markdown(args.recipe, result))
    logger.info("wrote %s\n%s", args.out / f"{args.recipe}.json", markdown(args.recipe, result))


if __name__ == "__main__":
    main()
