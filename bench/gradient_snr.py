"""Policy-gradient signal-to-noise on the shapes world: how much of one epoch's gradient is signal.

For each method (:data:`METHODS`: the settings the first sample-efficiency benchmark compared) and each of
``--epochs`` rollouts of the shipped shapes model (no update between them), the on-policy GRPO gradient
(``beta = 0``, ratio 1) of the LoRA parameters is computed on two disjoint halves of the epoch's transitions.
The halves split whole advantage groups, so each half's advantages still sum to zero per group. Reported per method:

* ``half_cos``: cosine between the two halves' gradients. For two independent estimates of a true gradient
  ``g`` with per-estimate noise ``N``, ``E[cos] ~ |g|^2 / (|g|^2 + |N|^2)``: 0 means pure noise.
* ``epoch_cos``: the Spearman-Brown estimate ``2c / (1 + c)`` of the same fraction for the whole epoch.
* ``nonzero_advantage_per_epoch``: transitions whose advantage is not 0 (a group whose samples all score the
  same gives none), out of ``transitions_per_epoch``.
* ``per_step``: for each stored schedule step, the share of its transitions with a non-zero advantage and
  the mean of ``|advantage| * weight`` (its size in the policy loss) -- where along the schedule the signal is.
* ``cross_cos``: cosine between whole-epoch gradients of different epochs (different prompts and noise).
  If every epoch estimated one shared direction, it would be about ``epoch_cos``; near 0 means the epochs'
  true gradients themselves point different ways (few prompts per epoch) or are swamped by noise.

    python bench/gradient_snr.py [--epochs 4] [--methods flow_grpo tempflow_all] [--out bench/results/gradient_snr.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import tempfile
from pathlib import Path

import torch

from alignkit.compose import load_run_config
from alignkit.trainer import Trainer

logger = logging.getLogger("bench.gradient_snr")

METHODS: dict[str, list[str]] = {
    "flow_grpo": ["algo=flow_grpo", "algo.num_seeds=8"],
    "tempflow_all": ["algo=tempflow_grpo_small"],  # 2 seeds x 4 children at each of the 7 branch steps
    "tempflow_budget": ["algo=tempflow_grpo_small", "algo.plan.options.select=random", "+algo.plan.options.m=2"],
    "flow_grpo_fast": ["algo=flow_grpo_fast", "algo.num_seeds=8"],
    "tempflow_early": ["algo=tempflow_grpo_small", "algo.plan.options.select=fixed", "+algo.plan.options.steps=[0,1]"],
    "tempflow_first": ["algo=tempflow_grpo_small", "algo.plan.options.select=fixed", "+algo.plan.options.steps=[0]"],
}
"""Recipe overrides of each method on ``shapes_tempflow_grpo`` (those of ``gradient_snr.json``)."""


def half_split(groups: torch.Tensor, rows: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Transition indices ``rows`` split in two by a random half of their group ids ``groups[rows]``."""
    ids = torch.unique(groups[rows])
    chosen = ids[torch.randperm(len(ids), generator=gen)[: len(ids) // 2]]
    first = torch.isin(groups[rows], chosen)
    return rows[first], rows[~first]


def gradient(trainer: Trainer, rollout, credit, rows: torch.Tensor) -> torch.Tensor:
    """Flattened gradient of the mean policy loss over ``rows``, accumulated in training-sized chunks."""
    for p in trainer.params:
        p.grad = None
    trainer.sampler.train(True)
    for chunk in torch.split(rows, trainer.cfg.train.train_batch_size):
        out = trainer.updater.minibatch_loss(rollout, credit, chunk)
        (out.loss * len(chunk) / len(rows)).backward()
    trainer.sampler.train(False)
    return torch.cat([p.grad.flatten() for p in trainer.params])


def measure(method: str, epochs: int, workdir: Path, extra: list[str]) -> dict[str, float]:
    cfg = load_run_config("shapes_tempflow_grpo", [
        *METHODS[method], f"output_dir={workdir / method}", "train.resume=false", "eval.before_after=false",
        "algo.objective.beta=0", *extra,
    ])
    trainer = Trainer(cfg, tensorboard=False)
    halves, full, sizes, totals = [], [], [], []
    per_step: dict[int, dict[str, float]] = {}
    for epoch in range(epochs):
        rolled = trainer.rollout(epoch)
        rollout = rolled.rollout
        scored = trainer.assign_credit(trainer.score(rolled))
        credit = scored.credit
        groups = scored.groups[rollout.transitions.sample_index]  # [M]
        rows = torch.nonzero(credit.mask & (credit.advantage != 0)).flatten()
        a, b = half_split(groups, rows, torch.Generator().manual_seed(epoch))
        ga, gb = gradient(trainer, rollout, credit, a), gradient(trainer, rollout, credit, b)
        halves.append(float(torch.nn.functional.cosine_similarity(ga, gb, dim=0)))
        full.append(ga * len(a) + gb * len(b))
        sizes.append(len(rows))
        totals.append(int(credit.mask.sum()))
        for k in torch.unique(rollout.transitions.step).tolist():
            at = (rollout.transitions.step == k) & credit.mask  # [M]
            acc = per_step.setdefault(int(k), {"transitions": 0, "nonzero": 0, "abs_adv_weight": 0.0})
            acc["transitions"] += int(at.sum())
            acc["nonzero"] += int((credit.advantage[at] != 0).sum())
            acc["abs_adv_weight"] += float((credit.advantage[at].abs() * credit.weight[at]).sum())
        logger.info("%s epoch %d: %d transitions with non-zero advantage, half cos %.3f", method, epoch,
                    len(rows), halves[-1])
    cross = [float(torch.nn.functional.cosine_similarity(full[i], full[j], dim=0))
             for i, j in itertools.combinations(range(epochs), 2)]
    c = statistics.mean(halves)
    return {"half_cos": c, "half_cos_sd": statistics.pstdev(halves), "epoch_cos": 2 * c / (1 + c) if c > -1 else c,
            "cross_cos": statistics.mean(cross), "cross_cos_sd": statistics.pstdev(cross),
            "transitions_per_epoch": statistics.mean(totals), "nonzero_advantage_per_epoch": statistics.mean(sizes),
            "epochs": epochs,
            # per stored step: the share of its transitions with a non-zero advantage, and its mean |A w|
            # (the size of its term in the policy loss): where along the schedule the learning signal is
            "per_step": {k: {"nonzero_fraction": v["nonzero"] / v["transitions"],
                             "mean_abs_adv_weight": v["abs_adv_weight"] / v["transitions"]}
                         for k, v in sorted(per_step.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["flow_grpo", "tempflow_all"], choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path("bench/results/gradient_snr.json"))
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every method")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            results[method] = measure(method, args.epochs, Path(tmp), args.overrides)
            logger.info("%s: %s", method, {k: round(v, 4) for k, v in results[method].items() if k != "per_step"})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"overrides": args.overrides, "results": results}, indent=1))
    logger.info("written %s", args.out)


if __name__ == "__main__":
    main()
