"""NFE and rollout wall time per prompt of every exploration plan, side by side on the tiny SD3 backbone.

Each plan samples the same prompts with the same seeds (``--seeds`` initial noises per prompt) through
the one rollout engine; plans alternate within each repetition so machine noise hits them alike. The
table reports model evaluations (NFE) per prompt, scored samples and stored transitions per prompt, and
the median seconds per prompt.

    python bench/plans.py [--steps 10] [--seeds 4] [--children 6] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from alignkit.config import BackboneConfig, LoraConfig
from alignkit.modalities.image.sd3 import SD3Sampler
from alignkit.modalities.image.tiny import build_tiny_sd3_pipeline
from alignkit.plans import AllStochastic, Branch, ExplorationPlan, Window
from alignkit.provenance import environment
from alignkit.rollout import RolloutEngine, RolloutRequest

logger = logging.getLogger("bench.plans")


def plans(children: int) -> dict[str, ExplorationPlan]:
    return {
        "flow_grpo (all SDE)": AllStochastic(),
        "flow_grpo_fast (window 2, random)": Window(size=2, start="random"),
        "mixgrpo (window 4, progressive)": Window(size=4, start="progressive"),
        f"tempflow (branch all, K={children})": Branch(children=children, select="all"),
        f"tempflow (branch random m=3, K={children})": Branch(children=children, select="random", m=3),
        f"tempflow (branch window 2, K={children})": Branch(children=children, select="window", size=2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--children", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/plans.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    load_before = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_sd3_pipeline(seed=0).save_pretrained(tmp, safe_serialization=True)
        cfg = BackboneConfig(name="sd3", pretrained=tmp, height=32, width=32, num_steps=args.steps,
                             max_sequence_length=16, lora=LoraConfig(rank=4, alpha=8))
        sampler = SD3Sampler.from_config(cfg, step_kind="flow_grpo", noise_level=0.7, device="cpu")
    engine = RolloutEngine(sampler, batch_size=args.batch)
    prompts = [f"prompt {i}" for i in range(args.prompts)]
    table = {name: {"seconds": []} for name in plans(args.children)}
    for rep in range(args.reps + 1):  # repetition 0 warms up
        for name, plan in plans(args.children).items():
            request = RolloutRequest(prompts=prompts, prompt_ids=list(range(args.prompts)),
                                     metadata=[{}] * args.prompts, num_seeds=args.seeds, seed=0, iteration=rep)
            schedule = plan.schedule(args.steps, rep, torch.Generator().manual_seed(rep))
            t0 = time.perf_counter()
            rollout = engine.run(request, schedule)
            dt = time.perf_counter() - t0
            row = table[name]
            if rep:
                row["seconds"].append(dt / args.prompts)
            row.update(nfe_per_prompt=rollout.nfe / args.prompts, samples_per_prompt=len(rollout.keys) / args.prompts,
                       transitions_per_prompt=len(rollout.transitions) / args.prompts)
    base = statistics.median(table["flow_grpo (all SDE)"]["seconds"])
    lines = [f"{'plan':<42} {'NFE/prompt':>10} {'samples':>8} {'trans.':>7} {'s/prompt':>9} {'x flow':>7}"]
    for name, row in table.items():
        med = statistics.median(row["seconds"])
        row["median_s_per_prompt"], row["time_vs_flow_grpo"] = med, med / base
        lines.append(f"{name:<42} {row['nfe_per_prompt']:>10.0f} {row['samples_per_prompt']:>8.0f} "
                     f"{row['transitions_per_prompt']:>7.0f} {med:>9.3f} {med / base:>7.2f}")
    logger.info("N=%d steps, %d seeds/prompt, batch %d, %d threads\n%s", args.steps, args.seeds, args.batch,
                torch.get_num_threads(), "\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    provenance = {**environment(), "load_average_before": load_before, "load_average_after": list(os.getloadavg())}
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "provenance": provenance,
                                    "plans": table}, indent=1))


if __name__ == "__main__":
    main()
