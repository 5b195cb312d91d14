"""What a run did and whether it worked: the start-of-run line, the progress-bar fields and the end-of-run summary
(``<output_dir>/summary.json``, also printed).

Held-out before -> after. Each reward (and the aggregate, the weighted sum of the training rewards) is compared
on the same held-out samples before and after training, paired by ``(prompt id, evaluation seed)``: the change
is the mean paired difference, its standard error taken over prompts (a prompt's seeds averaged first; see
:mod:`alignkit.stats`), with a t-based 95% interval. A change whose interval contains 0 is reported as *within
noise*.

The base model's noise band is computed, not declared: the 95% interval of the held-out score before training,
its standard error over the held-out prompts — the spread another draw of held-out prompts (and noises) would give
the untrained model. A score after training inside that band is not distinguishable from the base model by this
evaluation; the paired interval is the sharper test (the same prompts and noises on both sides) and decides
the verdict.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.run_dir import SUMMARY_FILE, HeldoutRecord, RunDir
from alignkit.stats import Estimate, by_prompt, mean_estimate, paired_difference

__all__ = ["HeldoutChange", "RunSummary", "describe_run", "format_count", "heldout_changes", "short_names",
           "summarize", "write_summary"]

AGGREGATE = "aggregate"
NOISE_BAND_METHOD = ("95% interval of the base model's held-out mean (standard error over held-out prompts, "
                     "seeds averaged per prompt), computed from the evaluation before training")


@dataclass(frozen=True)
class HeldoutChange:
    """Held-out before -> after of one reward or of the aggregate.

    Attributes:
        name: the reward, or ``aggregate``.
        weight: its training weight (0: evaluation-only; None for the aggregate).
        before: mean over prompts before training, its standard error over prompts.
        after: the same after training (or at the latest evaluation of an unfinished run).
        change: paired ``after - before``, standard error over prompts.
    """

    name: str
    weight: float | None
    before: Estimate
    after: Estimate
    change: Estimate

    @property
    def band(self) -> tuple[float, float]:
        """The base model's noise band: the 95% interval of :attr:`before`."""
        return self.before.ci95

    @property
    def verdict(self) -> str:
        if self.change.n < 2:
            return "too few prompts to tell"
        if not self.change.excludes_zero():
            return "within noise"
        return "better" if self.change.mean > 0 else "worse"

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.band
        return {"name": self.name, "weight": self.weight, "before": self.before.to_dict(),
                "after": self.after.to_dict(), "change": self.change.to_dict(),
                "noise_band": [_json(lo), _json(hi)], "verdict": self.verdict}


def _json(v: float) -> float | None:
    return v if math.isfinite(v) else None


def heldout_changes(before: HeldoutRecord, after: HeldoutRecord, weights: dict[str, float]) -> list[HeldoutChange]:
    """Before -> after of every reward both evaluations scored (training rewards first) and of the aggregate."""
    names = [n for n in after.rewards if n in before.rewards]
    names.sort(key=lambda n: n not in weights)  # stable: training rewards first, each group in scoring order
    out = []
    pairs = [(n, before.scores(n), after.scores(n), weights.get(n, 0.0)) for n in names]
    if any(w != 0 for w in weights.values()) and all(n in names for n, w in weights.items() if w != 0):
        pairs.append((AGGREGATE, before.aggregate(weights), after.aggregate(weights), None))
    for name, a, b, w in pairs:
        out.append(HeldoutChange(name, w, mean_estimate(list(by_prompt(a).values())),
                                 mean_estimate(list(by_prompt(b).values())), paired_difference(a, b)))
    return out


@dataclass
class RunSummary:
    """The end-of-run summary of one run folder (``summary.json``).

    Attributes:
        run: the run folder.
        status: finished, or how far it got.
        algorithm: name, plan, credit and step kind.
        rewards: training rewards and their weights; ``aggregation`` their aggregation mode.
        backbone: adapter name and pretrained model.
        before, after: names of the compared held-out evaluations (None when there are none).
        prompts, samples: held-out prompts and samples compared.
        changes: before -> after per reward and for the aggregate.
        nfe_total: rollout model evaluations; ``flops_total`` total model FLOPs (None when not logged).
        train_seconds: rollout-to-update seconds; ``wall_seconds`` the epochs' wall time (held-out evaluations
            during training included).
        config: the composed configuration.
    """

    run: str
    status: str
    algorithm: dict[str, Any]
    rewards: dict[str, float]
    aggregation: str
    backbone: dict[str, Any]
    before: str | None
    after: str | None
    prompts: int
    samples: int
    changes: list[HeldoutChange]
    nfe_total: float | None
    flops_total: float | None
    train_seconds: float | None
    wall_seconds: float | None
    config: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "run": self.run, "status": self.status, "algorithm": self.algorithm, "rewards": self.rewards,
            "aggregation": self.aggregation, "backbone": self.backbone,
            "heldout": {"before": self.before, "after": self.after, "prompts": self.prompts, "samples": self.samples,
                        "pairing": "prompt id and evaluation seed; standard errors over prompts",
                        "noise_band": NOISE_BAND_METHOD, "rewards": [c.to_dict() for c in self.changes]},
            "rollout_nfe": self.nfe_total, "model_flops": self.flops_total, "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_seconds, "config": self.config,
        }


def _algorithm(config: dict[str, Any] | None) -> dict[str, Any]:
    a = (config or {}).get("algo") or {}
    credit = a.get("credit") or {}
    return {"name": a.get("name"), "plan": (a.get("plan") or {}).get("name"),
            "plan_options": (a.get("plan") or {}).get("options") or {}, "step_kind": a.get("step_kind"),
            "noise_level": a.get("noise_level"), "credit": credit.get("name"), "group_by": credit.get("group_by"),
            "noise_aware": credit.get("noise_aware"), "num_seeds": a.get("num_seeds")}


def summarize(run: RunDir) -> RunSummary:
    """The summary of ``run`` as it stands (an unfinished run compares against its latest evaluation)."""
    before, after = run.before, run.latest
    changes = heldout_changes(before, after, run.weights) if before is not None and after is not None else []
    epoch_s = [float(r["time/epoch_s"]) for r in run.metrics if "time/epoch_s" in r]
    c = run.config or {}
    return RunSummary(
        run=str(run.path), status=run.status(), algorithm=_algorithm(c), rewards=run.weights,
        aggregation=str(run.setting("algo.reward_aggregation", "sum_then_normalize")),
        backbone={"name": run.setting("backbone.name"), "pretrained": run.setting("backbone.pretrained"),
                  "num_steps": run.setting("backbone.num_steps")},
        before=before.name if before is not None else None, after=after.name if after is not None and changes else None,
        prompts=len(after.prompts) if after is not None and changes else 0,
        samples=len(after.rows) if after is not None and changes else 0, changes=changes,
        nfe_total=run.final("rollout/nfe_total"), flops_total=run.final("cost/flops_total"),
        train_seconds=run.final("time/total_s"), wall_seconds=sum(epoch_s) if epoch_s else None, config=run.config,
    )


def write_summary(output_dir: Path | str, config: dict[str, Any] | None = None) -> RunSummary:
    """Summarise run folder ``output_dir`` and write ``summary.json`` there; ``config`` (the run's composed
    configuration) is used where the folder holds no ``config.yaml`` (a run started from Python)."""
    run = RunDir.open(output_dir)
    if config is not None:
        run.config = config
    summary = summarize(run)
    path = Path(output_dir) / SUMMARY_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary.to_dict(), indent=1, allow_nan=False, default=str), encoding="utf-8")
    tmp.replace(path)
    return summary


def format_count(v: float | None) -> str:
    """``1234567`` -> ``1.23M``; ``None`` -> ``not logged``."""
    if v is None or not math.isfinite(v):
        return "not logged"
    for div, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{unit}"
    return f"{v:.4g}"


def _pm(e: Estimate, signed: bool = False) -> str:
    if e.n == 0:
        return "-"
    mean = f"{e.mean:+.3f}" if signed else f"{e.mean:.3f}"
    return mean if math.isnan(e.half_width) else f"{mean} ± {e.half_width:.3f}"


def heldout_table(changes: list[HeldoutChange]) -> list[list[str]]:
    """Rows (header first) of the held-out table: reward, weight, before, after, change, noise band, verdict."""
    rows = [["reward", "weight", "before", "after", "change (95% CI)", "base noise band", "verdict"]]
    for c in changes:
        lo, hi = c.band
        band = f"[{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else "-"
        weight = "-" if c.weight is None else ("eval only" if c.weight == 0 else f"{c.weight:g}")
        rows.append([c.name, weight, f"{c.before.mean:.3f}", f"{c.after.mean:.3f}", _pm(c.change, signed=True), band,
                     c.verdict])
    return rows


def text_table(rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def format_summary(s: RunSummary) -> str:
    """The printed summary: a few lines and the held-out table."""
    a = s.algorithm
    lines = [f"run summary of {s.run} ({s.status})",
             f"  algorithm {a['name']} (plan {a['plan']}, credit {a['credit']}, step {a['step_kind']}); rewards "
             + ", ".join(f"{k} x{w:g}" for k, w in s.rewards.items()) + f" ({s.aggregation})"]
    if s.changes:
        lines.append(f"  held-out {s.before} -> {s.after}: {s.prompts} prompts, {s.samples} samples, paired by prompt "
                     "and seed; ± is the 95% interval over prompts; noise band: 95% interval of the base model's score")
        lines += ["    " + line for line in text_table(heldout_table(s.changes)).splitlines()]
    else:
        lines.append("  held-out: no before/after evaluation records (set eval.before_after=true to compare)")
    wall = f"{s.wall_seconds:.0f} s" if s.wall_seconds is not None else "not logged"
    train = f"{s.train_seconds:.0f} s" if s.train_seconds is not None else "not logged"
    lines.append(f"  cost: rollout NFE {format_count(s.nfe_total)}, model FLOPs {format_count(s.flops_total)}, "
                 f"training {train}, wall {wall}")
    return "\n".join(lines)


# --- during the run -------------------------------------------------------------------------------------------


def describe_run(cfg: Any) -> str:
    """One line naming the algorithm (plan, credit, step kind), the rewards with weights and aggregation, the
    backbone and the output folder (``cfg``: a :class:`alignkit.config.RunConfig`)."""
    a = cfg.algo
    plan = a.plan.name + (f" {dict(a.plan.options)}" if a.plan.options else "")
    credit = f"{a.credit.name} by {a.credit.group_by}, std {a.credit.std}" + (", noise-aware" if a.credit.noise_aware
                                                                               else "")
    rewards = ", ".join(f"{k} x{t.weight:g}" for k, t in cfg.reward.items())
    extra = f"; eval-only {', '.join(cfg.eval.rewards)}" if cfg.eval.rewards else ""
    return (f"run: algorithm {a.name} (plan {plan}; credit {credit}; step {a.step_kind}, noise {a.noise_level:g}; "
            f"{a.num_seeds} seeds per prompt); rewards {rewards} aggregated by {a.reward_aggregation}{extra}; "
            f"backbone {cfg.backbone.name} {cfg.backbone.pretrained} ({cfg.backbone.num_steps} steps); "
            f"output {cfg.output_dir}")


def short_names(names: list[str], width: int = 10) -> dict[str, str]:
    """Progress-bar labels: a name of at most ``width`` characters stays; a longer one keeps the first 4 letters of
    each ``_``-separated part (``jpeg_compressibility`` -> ``jpeg_comp``), cut to ``width``. Where two labels
    would collide, the names are kept whole."""
    def short(name: str) -> str:
        if len(name) <= width:
            return name
        return "_".join(p[:4] for p in name.split("_") if p)[:width]

    out = {n: short(n) for n in names}
    return out if len(set(out.values())) == len(out) else {n: n for n in names}
