"""``alignkit compare RUN [RUN ...]``: runs grouped by recipe, their curves on one compute axis, the score of each
group at equal compute and the paired held-out difference between groups.

* **Groups.** Runs whose composed configurations are equal except for the seed, the run folder and bookkeeping
  (:data:`IGNORED`) form one group; their seeds are pooled: curves are the mean over runs with a t-based 95%
  band, scores the mean over runs with its 95% interval (undefined for one run).
* **Axis.** ``epoch``, ``nfe`` (rollout model evaluations), ``flops`` (total model FLOPs, ``cost/flops_total``),
  ``time`` (training seconds) or ``cpu`` (process CPU seconds); :data:`alignkit.run_dir.AXES`.
* **Equal compute.** The budget is the final value on the axis of the cheapest run of the cheapest group; every
  run's held-out curve (its evaluations, linearly interpolated between them) is read at that budget.
* **Paired difference.** Each group's final held-out evaluation (the latest of an unfinished run), its runs
  averaged per ``(prompt id, evaluation seed)``, minus the first group's, averaged per prompt: mean and 95%
  interval over prompts (:mod:`alignkit.stats`).
* **Refused.** Runs of different worlds (``prompts.source``), with different evaluation settings
  (:meth:`alignkit.run_dir.RunDir.eval_settings`) or different held-out prompts: the message names the
  difference.

The functions return plain data (:class:`Comparison`) so benchmarks can build their tables from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignkit.errors import RunFolderError
from alignkit.html_page import escape, figure_uri, page, pyplot, table
from alignkit.run_dir import AXES, Key, RunDir, axis_key, flatten
from alignkit.stats import Estimate, interpolate, mean_estimate, paired_difference, t975
from alignkit.summary import AGGREGATE, format_count, text_table

__all__ = ["IGNORED", "Comparison", "GroupResult", "RunGroup", "compare_runs", "format_comparison",
           "group_runs", "heldout_curve", "mean_band", "write_comparison_html"]

IGNORED = ("seed", "output_dir", "recipe", "train.resume", "train.checkpoint_every", "train.keep_checkpoints",
           "train.sample_every", "eval.every", "eval.batch_size", "eval.checkpoint")
"""Configuration fields that do not make two runs different recipes (dotted; a prefix covers its sub-fields)."""


@dataclass
class RunGroup:
    """Runs of one recipe (seeds pooled).

    Attributes:
        label: a short name: the recipe and the settings that tell it from the other groups.
        runs: its runs, in the order given.
    """

    label: str
    runs: list[RunDir]


@dataclass
class GroupResult:
    """One group's numbers for the compared reward.

    Attributes:
        group: the group.
        budget: mean final value on the axis over its runs.
        before: held-out score before training, over runs.
        final: held-out score at each run's final evaluation, over runs.
        at_budget: held-out score interpolated at the common budget, over runs.
        paired: final held-out score minus the first group's, paired by prompt and seed, over prompts (None for
            the first group, or without per-sample records).
    """

    group: RunGroup
    budget: float
    before: Estimate
    final: Estimate
    at_budget: Estimate
    paired: Estimate | None


@dataclass
class Comparison:
    """The result of :func:`compare_runs`.

    Attributes:
        axis: the compute axis; ``reward`` the compared held-out score (a reward or ``aggregate``).
        budget: the common budget on the axis.
        results: one per group, the baseline (first) group first.
        notes: what the reader must know (unfinished runs, runs without per-sample records, ...).
    """

    axis: str
    reward: str
    budget: float
    results: list[GroupResult]
    notes: list[str] = field(default_factory=list)


# --- loading and checking -----------------------------------------------------------------------------------


def _ignored(key: str) -> bool:
    return any(key == i or key.startswith(i + ".") for i in IGNORED)


def _fmt(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def check_comparable(runs: Sequence[RunDir]) -> None:
    """Refuse runs that cannot be compared: different worlds, evaluation settings or held-out prompts.

    Raises:
        RunFolderError: naming the runs and the difference.
    """
    first = runs[0]
    worlds = {r.world for r in runs}
    if len(worlds) > 1:
        listed = ", ".join(f"{r.path} ({r.world})" for r in runs)
        raise RunFolderError(f"runs of different worlds cannot be compared (prompts.source): {listed}; compare runs "
                             "of one world")
    base = first.eval_settings()
    for run in runs[1:]:
        other = run.eval_settings()
        diffs = [f"{k}: {_fmt(base.get(k))} in {first.path}, {_fmt(other.get(k))} in {run.path}"
                 for k in sorted(set(base) | set(other)) if base.get(k) != other.get(k)]
        if diffs:
            raise RunFolderError("runs evaluate differently, so their held-out scores are not comparable: "
                                 + "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
                                 + "; compare runs with the same evaluation settings")
    ref = next((r for r in runs if r.before is not None or r.latest is not None), None)
    if ref is None:
        return
    ref_rec = ref.before or ref.latest
    for run in runs:
        rec = run.before or run.latest
        if rec is None or run is ref:
            continue
        a, b = ref_rec.prompts, rec.prompts
        for pid in sorted(set(a) | set(b)):
            if a.get(pid) != b.get(pid):
                raise RunFolderError(f"held-out prompts differ: prompt {pid} is {a.get(pid)!r} in {ref.path} and "
                                     f"{b.get(pid)!r} in {run.path}; compare runs evaluated on the same prompts")
        if ref_rec.keys != rec.keys:
            raise RunFolderError(f"held-out samples differ: {len(ref_rec.keys)} (prompt, seed) pairs in {ref.path}, "
                                 f"{len(rec.keys)} in {run.path}; compare runs with the same eval.num_prompts and "
                                 "eval.seeds_per_prompt")


def group_runs(runs: Sequence[RunDir]) -> list[RunGroup]:
    """Group runs by configuration (:data:`IGNORED` fields left out), in order of first appearance.

    A group's label is its recipe and the command-line overrides that set it apart (``shapes_tempflow_grpo
    algo=flow_grpo``); where overrides do not tell the groups apart, the recipe and up to three configuration
    fields that differ between groups (``algo.name`` and the plan first)."""
    keys: dict[str, list[RunDir]] = {}
    flat: dict[str, dict[str, Any]] = {}
    for run in runs:
        cfg = {k: v for k, v in flatten(run.config or {"run": str(run.path)}).items() if not _ignored(k)}
        key = json.dumps(cfg, sort_keys=True, default=str)
        keys.setdefault(key, []).append(run)
        flat[key] = cfg
    recipes = {key: members[0].setting("recipe") or members[0].name for key, members in keys.items()}
    overrides = {key: [o for o in members[0].overrides if not _ignored(o.split("=", 1)[0].lstrip("+~"))]
                 for key, members in keys.items()}
    shared = set.intersection(*(set(o) for o in overrides.values())) if overrides else set()
    labels = {key: " ".join([recipes[key], *(o for o in overrides[key] if o not in shared)]) for key in keys}
    if len(set(labels.values())) < len(labels):
        first = ("algo.name", "algo.plan.name", "algo.step_kind")
        differing = sorted({k for cfg in flat.values() for k in cfg
                            if len({json.dumps(c.get(k), default=str) for c in flat.values()}) > 1},
                           key=lambda k: (k not in first, not k.startswith("algo."), k))
        for key in keys:
            shown = [f"{k}={_fmt(flat[key].get(k))}" for k in differing[:3]]
            labels[key] = recipes[key] + (f" ({', '.join(shown)})" if shown else "")
    groups = [RunGroup(labels[key], members) for key, members in keys.items()]
    names = [g.label for g in groups]
    for i, g in enumerate(groups):
        if names.count(g.label) > 1:
            g.label = f"{g.label} #{i + 1}"
    return groups


# --- numbers --------------------------------------------------------------------------------------------------


def heldout_curve(run: RunDir, reward: str, axis: str) -> tuple[list[float], list[float]]:
    """A run's held-out curve of ``reward`` (or ``aggregate``) on ``axis``."""
    curves = run.heldout_series(axis)
    if not curves:
        raise RunFolderError(f"run {run.path} has no held-out evaluation to compare; train with "
                             "eval.before_after=true (and eval.every=N for a curve)")
    if reward not in curves:
        raise RunFolderError(f"--reward {reward}: run {run.path} has no held-out scores of it; choose one of "
                             f"{', '.join(curves)}")
    return curves[reward]


def _final_scores(run: RunDir, reward: str) -> dict[Key, float | None] | None:
    rec = run.latest
    if rec is None:
        return None
    return rec.aggregate(run.weights) if reward == AGGREGATE else rec.scores(reward)


def _pooled(runs: Sequence[RunDir], reward: str) -> dict[Key, float] | None:
    """Per (prompt, seed), the mean over runs of the final held-out score (None when a run has no records)."""
    per_run = [_final_scores(r, reward) for r in runs]
    if any(p is None for p in per_run):
        return None
    sums: dict[Key, list[float]] = {}
    for scores in per_run:
        for key, v in scores.items():
            if v is not None and math.isfinite(v):
                sums.setdefault(key, []).append(v)
    return {k: sum(v) / len(v) for k, v in sums.items()}


def compare_runs(paths: Sequence[Path | str], axis: str = "nfe", reward: str = AGGREGATE) -> Comparison:
    """Compare run folders (see the module docstring).

    Args:
        paths: run folders; the first one's group is the baseline of the paired differences.
        axis: ``epoch``, ``nfe``, ``flops``, ``time`` or ``cpu``.
        reward: the held-out score compared: ``aggregate`` (the weighted sum of the training rewards) or a reward.

    Raises:
        RunFolderError: an unknown axis, a folder that is not a run, a folder given twice, runs that cannot be
            compared, an axis or reward a run did not log.
    """
    axis_key(axis)  # an unknown axis is refused before any folder is read
    if not paths:
        raise RunFolderError("give at least one run folder to compare")
    resolved = [Path(p).expanduser().resolve() for p in paths]
    seen = {p for p in resolved if resolved.count(p) > 1}
    if seen:
        raise RunFolderError(f"run folder given twice: {', '.join(str(p) for p in sorted(seen))}")
    runs = [RunDir.open(p) for p in paths]
    check_comparable(runs)
    for run in runs:
        if not run.metrics:
            raise RunFolderError(f"run {run.path} has no metrics yet (metrics.jsonl is missing or empty: no "
                                 "evaluation or epoch finished); nothing of it to compare")
    notes = [f"{r.path}: {r.status()}" for r in runs if not r.finished]
    for run in runs:
        if not run.has_axis(axis):
            run.series(axis_key(axis), axis)  # raises the error naming the run and the axes it has
    groups = group_runs(runs)
    curves = {id(r): heldout_curve(r, reward, axis) for r in runs}
    finals = {id(r): (curves[id(r)][0][-1] if curves[id(r)][0] else math.nan) for r in runs}
    budgets = {g.label: mean_estimate([finals[id(r)] for r in g.runs]).mean for g in groups}
    cheapest = min(groups, key=lambda g: budgets[g.label])
    budget = min(finals[id(r)] for r in cheapest.runs)
    baseline = _pooled(groups[0].runs, reward)
    if baseline is None:
        notes.append("paired differences need per-sample held-out records (eval/*.jsonl) in every run of "
                     f"{groups[0].label}")
    results = []
    for i, g in enumerate(groups):
        pooled = _pooled(g.runs, reward) if i else None
        paired = paired_difference(baseline, pooled) if baseline is not None and pooled is not None else None
        results.append(GroupResult(
            group=g, budget=budgets[g.label],
            before=mean_estimate([curves[id(r)][1][0] if curves[id(r)][0] and curves[id(r)][0][0] == 0 else math.nan
                                  for r in g.runs]),
            final=mean_estimate([curves[id(r)][1][-1] if curves[id(r)][1] else math.nan for r in g.runs]),
            at_budget=mean_estimate([interpolate(*curves[id(r)], budget) for r in g.runs]),
            paired=paired))
    return Comparison(axis=axis, reward=reward, budget=budget, results=results, notes=notes)


# --- output -----------------------------------------------------------------------------------------------------


def _pm(e: Estimate | None, signed: bool = False) -> str:
    if e is None or e.n == 0 or math.isnan(e.mean):
        return "-"
    mean = f"{e.mean:+.3f}" if signed else f"{e.mean:.3f}"
    return f"{mean} ± {e.half_width:.3f}" if e.n >= 2 else f"{mean} (n=1)"


def comparison_rows(c: Comparison) -> list[list[str]]:
    """The table (header first): one row per group."""
    unit = {"time": "s", "cpu": "CPU s"}.get(c.axis, c.axis)
    rows = [["group", "runs", f"final {unit}", "held-out before", "held-out final",
             f"at {format_count(c.budget)} {unit}", "final - baseline (paired)"]]
    for r in c.results:
        rows.append([r.group.label, str(len(r.group.runs)), format_count(r.budget), _pm(r.before), _pm(r.final),
                     _pm(r.at_budget), "baseline" if r is c.results[0] else _pm(r.paired, signed=True)])
    return rows


def format_comparison(c: Comparison) -> str:
    """The plain-text comparison: what is compared, the table and the notes."""
    lines = [f"held-out {c.reward}; ± is a 95% interval: over a group's runs (seeds) for scores, over held-out "
             f"prompts for the paired difference from the baseline ({c.results[0].group.label}); equal compute: "
             f"{format_count(c.budget)} on axis {c.axis} ({AXES[c.axis][1]})", text_table(comparison_rows(c))]
    lines += [f"note: {n}" for n in c.notes]
    return "\n".join(lines)


def mean_band(xs_list: Sequence[Sequence[float]], ys_list: Sequence[Sequence[float]]
              ) -> tuple[list[float], list[float], list[float]]:
    """Mean and 95% half-width over runs of curves (each interpolated linearly), on the union of their x inside
    the range all of them cover."""
    lo = max(xs[0] for xs in xs_list)
    hi = min(xs[-1] for xs in xs_list)
    grid = sorted({x for xs in xs_list for x in xs if lo <= x <= hi})
    means, halves = [], []
    for x in grid:
        e = mean_estimate([interpolate(xs, ys, x) for xs, ys in zip(xs_list, ys_list, strict=True)])
        means.append(e.mean)
        halves.append(t975(e.n - 1) * e.se if e.n >= 2 else 0.0)
    return grid, means, halves


def _curves_figure(c: Comparison) -> str:
    return figure_uri(curves_figure(c))


def write_curves_png(c: Comparison, out: Path | str, dpi: int = 120) -> Path:
    """The comparison's curves (held-out score and training aggregate, mean and 95% band per group, the equal-
    compute budget dashed) as a PNG file, for a README or a paper."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig = curves_figure(c)
    fig.savefig(out, format="png", dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return out


def curves_figure(c: Comparison) -> Any:
    """The matplotlib figure of the comparison's curves (see :func:`write_curves_png`)."""
    plt = pyplot()
    fig, axs = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in c.results:
        held = [heldout_curve(run, c.reward, c.axis) for run in r.group.runs]
        train = [run.reward_series(c.axis)["aggregate"] for run in r.group.runs]
        for ax, curves in ((axs[0], held), (axs[1], train)):
            curves = [cv for cv in curves if cv[0]]
            if not curves:
                continue
            grid, mean, half = mean_band([cv[0] for cv in curves], [cv[1] for cv in curves])
            line = ax.plot(grid, mean, "o-" if ax is axs[0] else "-", ms=3, lw=1.3,
                           label=f"{r.group.label} ({len(curves)} run{'s' * (len(curves) > 1)})")[0]
            ax.fill_between(grid, [m - h for m, h in zip(mean, half, strict=True)],
                            [m + h for m, h in zip(mean, half, strict=True)], color=line.get_color(), alpha=0.2)
    for ax, title in ((axs[0], f"held-out {c.reward}"), (axs[1], "training rollout aggregate")):
        ax.axvline(c.budget, color="grey", ls="--", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(AXES[c.axis][1], fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    handles, labels = axs[0].get_legend_handles_labels()
    if handles:  # below both panels: group labels can be long
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize=7, frameon=False)
    return fig


def write_comparison_html(c: Comparison, out: Path | str) -> Path:
    """A self-contained HTML page of the comparison: the table, curves with 95% bands, notes, the runs."""
    out = Path(out)
    body = [f"<h1>alignkit compare: held-out {escape(c.reward)} on axis {escape(c.axis)}</h1>",
            f"<p>Equal compute: {escape(format_count(c.budget))} ({escape(AXES[c.axis][1])}), the final budget of the "
            "cheapest run of the cheapest group. ± is a 95% interval: over a group's runs (seeds) for scores, over "
            "held-out prompts (paired by prompt id and evaluation seed) for the difference from the first "
            "group.</p>", table(comparison_rows(c)),
            f"<figure><img alt=\"curves\" src=\"{_curves_figure(c)}\"><figcaption>Mean over a group's runs with "
            "its 95% band; the dashed line marks the equal-compute budget.</figcaption></figure>"]
    if c.notes:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in c.notes) + "</ul>")
    body.append("<h2>Runs</h2>")
    body.append(table([["group", "run", "seed", "status"]] + [[r.group.label, str(run.path), run.setting("seed"),
                                                               run.status()]
                                                              for r in c.results for run in r.group.runs]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page("alignkit compare", "\n".join(body)), encoding="utf-8")
    return out
