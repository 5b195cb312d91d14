"""Sample efficiency on the shapes world at equal compute: held-out ShapeEval against rollout NFE, total model FLOPs
and process CPU seconds, with compute-matched Flow-GRPO baselines, paired seeds and 95% intervals.

Every (method, seed) is a normal training run of recipe ``shapes_tempflow_grpo`` with the method's overrides,
written to ``OUT/runs/<method>_s<seed>/`` (config, metrics.jsonl, summary.json and the held-out per-sample records
``eval/*.jsonl``; checkpoints, sample grids and sample images are deleted once the run finished). Methods
(:data:`METHODS`): ``tempflow`` (the recipe as shipped), ``flow_grpo_matched`` (Flow-GRPO, 4 seeds per prompt,
prompts per epoch chosen so that its model FLOPs per epoch match tempflow's), ``flow_grpo_g24`` (group size 24 as
in the papers, prompts per epoch matched too), ``tempflow_adaptive`` and ``tempflow_skip_tied``. The matching
comes from a one-epoch calibration run of each method (``OUT/plan.json`` records it). Every method gets the same
total-model-FLOPs budget (``--budget-flops``; default: tempflow's FLOPs of the recipe's 100 epochs), hence its own
number of epochs, and is evaluated on the held-out ``--split`` (default ``test``, ``prompts.options.eval_split``)
about every fifth of its budget, with ``--noises`` evaluation noises per prompt.

The analysis (``--analyze-only`` runs it alone on ``OUT/runs``) reads the run folders with
:mod:`alignkit.run_dir`, :mod:`alignkit.compare` and :mod:`alignkit.stats`: for each cost axis (``nfe``, ``flops``,
``cpu``) and budgets 1/4, 1/2 and 1 of the common budget (the final value of the cheapest run), each method's
mean held-out score over seeds with its 95% t interval, and its seed-paired difference to ``flow_grpo_matched``
with a 95% paired t interval; the prompt-paired interval of :func:`alignkit.compare.compare_runs` at each run's
final evaluation; every seed's values; failed and unfinished runs listed, never dropped. "To target": only for a
target at least 3 standard errors (prompts as units) above the base model's held-out mean; the first crossing of
each method's seed-averaged curve and each seed's own crossing, seeds that never reach it censored ("not reached
by budget"). Outputs: ``summary.json`` (with provenance: commit, versions, torch threads, load average before
and after), ``table.md`` and ``curves.png``.

    python bench/sample_efficiency.py --seeds 0 1 2 3 4 --jobs 2 [--methods ...] [--budget-flops F]
        [--split test] [--noises 3] [--prompts 64] [--resume] [--out bench/results/sample_efficiency]
    python bench/sample_efficiency.py --analyze-only [--target 0.45] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from alignkit.cpu_threads import prepare_openmp

prepare_openmp()  # before torch loads, as the alignkit command does (alignkit.cpu_threads)

from alignkit.compare import compare_runs, heldout_curve, mean_band  # noqa: E402
from alignkit.errors import RunFolderError  # noqa: E402
from alignkit.provenance import environment, read_environment  # noqa: E402
from alignkit.run_dir import AXES, RunDir  # noqa: E402
from alignkit.stats import (  # noqa: E402
    Estimate,
    by_prompt,
    first_crossing,
    format_interval,
    interpolate,
    mean_estimate,
    seed_paired_difference,
)

logger = logging.getLogger("bench.sample_efficiency")

RECIPE = "shapes_tempflow_grpo"
REWARD = "shapeeval_partial"  # the held-out partial ShapeEval (evaluation-only) whatever the training reward
AXES_USED = ("nfe", "flops", "cpu")
FRACTIONS = {"1/4": 0.25, "1/2": 0.5, "1": 1.0}
BASELINE = "flow_grpo_matched"
REFERENCE = "tempflow"
DEFAULT_EPOCHS = 100  # the recipe's epochs: the default budget is tempflow's FLOPs of them
FAILED_FILE = "failed.json"
KEEP = ("config.yaml", "overrides.yaml", "metrics.jsonl", "summary.json", "environment.jsonl")


@dataclass(frozen=True)
class Method:
    """One arm of the benchmark.

    Attributes:
        overrides: recipe overrides on top of :data:`RECIPE`.
        match_seeds: for Flow-GRPO arms, the seeds per prompt (group size); ``train.prompts_per_epoch`` is then
            chosen so that the model FLOPs per epoch match :data:`REFERENCE`'s. None: run as configured.
        about: one line for the table.
    """

    overrides: tuple[str, ...]
    match_seeds: int | None
    about: str


METHODS: dict[str, Method] = {
    "tempflow": Method((), None, "TempFlow-GRPO, the recipe as shipped (2 seeds x 4 children at every step)"),
    "flow_grpo_matched": Method(("algo=flow_grpo",), 4, "Flow-GRPO, 4 seeds, prompts/epoch matched in FLOPs"),
    "flow_grpo_g24": Method(("algo=flow_grpo",), 24, "Flow-GRPO, group size 24 (papers), prompts/epoch matched"),
    "tempflow_adaptive": Method(("algo=tempflow_grpo_adaptive",), None, "TempFlow-GRPO, adaptive branch budget"),
    "tempflow_skip_tied": Method(("algo.objective.skip_tied=true",), None, "TempFlow-GRPO, tied groups skipped"),
}


# --- running ------------------------------------------------------------------------------------------------


def train_run(overrides: list[str], folder: Path, threads: int) -> dict[str, Any]:
    """One training run in this (worker) process; a failure is written to ``folder/failed.json``, not raised."""
    import torch

    from alignkit.compose import load_run_config, write_run_config
    from alignkit.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    overrides = [*overrides, f"output_dir={folder}"]
    try:
        cfg = load_run_config(RECIPE, overrides)
        trainer = Trainer(cfg, tensorboard=False)  # as `alignkit train`: the config is written once it is accepted
        write_run_config(cfg.output_dir, cfg, overrides)
        trainer.train()
    except Exception as exc:  # a failed run is a result: it is listed, never dropped
        folder.mkdir(parents=True, exist_ok=True)
        (folder / FAILED_FILE).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}, indent=1))
        return {"folder": str(folder), "failed": f"{type(exc).__name__}: {exc}"}
    return {"folder": str(folder), "failed": None}


def prune(folder: Path) -> None:
    """Keep what the analysis reads: config, metrics (the held-out curves), summary and the per-sample records of
    the evaluations before and after training (``eval/eval_before.jsonl``, ``eval/eval_after.jsonl``); delete
    checkpoints, sample grids, sample images, the intermediate per-sample records and anything else (about 0.1 MB
    per run is left)."""
    for child in folder.iterdir():
        if child.name in KEEP:
            continue
        if child.name == "eval" and child.is_dir():
            for f in child.iterdir():
                if f.name not in ("eval_before.jsonl", "eval_after.jsonl"):
                    shutil.rmtree(f) if f.is_dir() else f.unlink()
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def run_overrides(method: str, plan: dict[str, Any], seed: int, resume: bool) -> list[str]:
    arm = plan["methods"][method]
    epochs, every = arm["epochs"], arm["eval_every"]
    return [*METHODS[method].overrides, *arm["match_overrides"], f"seed={seed}", f"train.epochs={epochs}",
            f"eval.every={every}", "eval.before_after=true", f"eval.seeds_per_prompt={plan['noises']}",
            f"prompts.options.eval_split={plan['split']}", f"train.resume={str(resume).lower()}",
            f"train.checkpoint_every={every}", "train.keep_checkpoints=1", f"train.sample_every={epochs}",
            *([f"prompts.options.eval_size={plan['prompts']}", f"eval.num_prompts={plan['prompts']}"]
              if plan.get("prompts") else []),
            *plan["extra"]]


def calibrate(methods: list[str], extra: list[str], budget: float | None, threads: int,
              reference: float | None = None) -> dict[str, Any]:
    """Model FLOPs per epoch of each method from one-epoch runs; Flow-GRPO arms get the prompts per epoch that
    match tempflow's FLOPs per epoch (measured again with the chosen setting); epochs from the common budget.
    ``reference``: tempflow's FLOPs per epoch from an earlier calibration (arms added to an existing plan keep its
    reference and budget) instead of a new measurement."""
    with tempfile.TemporaryDirectory() as tmp:
        def epoch_flops(name: str, overrides: list[str]) -> float:
            folder = Path(tmp) / name
            res = train_run([*overrides, "train.epochs=1", "eval.before_after=false", "eval.every=0",
                             "train.resume=false", *extra], folder, threads)
            if res["failed"]:
                raise SystemExit(f"calibration run {name} failed: {res['failed']}")
            return float(RunDir.open(folder).final("cost/flops"))

        if reference is None:
            reference = epoch_flops(REFERENCE, list(METHODS[REFERENCE].overrides))
        budget = budget if budget is not None else DEFAULT_EPOCHS * reference
        out: dict[str, Any] = {"reference": REFERENCE, "reference_flops_per_epoch": reference,
                               "budget_flops": budget, "methods": {}}
        for name in methods:
            m = METHODS[name]
            match: list[str] = []
            note = ""
            if m.match_seeds is not None:
                probe = epoch_flops(f"{name}_probe", [*m.overrides, f"algo.num_seeds={m.match_seeds}",
                                                      "train.prompts_per_epoch=1"])
                prompts = max(1, round(reference / probe))  # FLOPs are linear in the samples of an epoch
                match = [f"algo.num_seeds={m.match_seeds}", f"train.prompts_per_epoch={prompts}"]
                note = (f"{probe:.4g} FLOPs per prompt x {m.match_seeds} seeds; {prompts} prompts per epoch match "
                        f"{REFERENCE}'s {reference:.4g}")
            flops = reference if name == REFERENCE and not match else epoch_flops(name, [*m.overrides, *match])
            ratio = flops / reference
            if abs(ratio - 1) > 0.10:
                note += f"; {ratio:.3f}x {REFERENCE}'s FLOPs per epoch (no integer prompt count matches within 10%)"
            epochs = max(1, round(budget / flops))
            out["methods"][name] = {"overrides": list(m.overrides), "match_overrides": match, "flops_per_epoch": flops,
                                    "flops_ratio_to_reference": ratio, "epochs": epochs,
                                    "eval_every": max(1, round(epochs / 5)), "note": note.lstrip("; ")}
            logger.info("%-20s %.4g FLOPs/epoch (%.3fx %s) -> %d epochs %s", name, flops, ratio, REFERENCE, epochs,
                        note)
    return out


CODE_PATHS = ("alignkit", "modalities", "rewards", "worlds/common.py", "worlds/pretrain_common.py", "worlds/shapes",
              "recipes", "pyproject.toml")
"""What a shapes run's result depends on: a change here since a run's commit makes the run stale (but see
:data:`NOT_TRAINING`)."""
NOT_TRAINING = ("alignkit/compare.py", "alignkit/report.py", "alignkit/html_page.py", "alignkit/stats.py",
                "alignkit/cli.py", "recipes/README.md")
"""Files under :data:`CODE_PATHS` that only read or present finished runs (this benchmark trains through
:class:`alignkit.trainer.Trainer`, not the command line)."""


def code_changes(made: set[str], commit: str) -> list[str]:
    """Files of :data:`CODE_PATHS` that differ between any commit in ``made`` and ``commit`` (``git diff``, beyond
    comment lines); when
    a commit cannot be compared (no git, unknown commit), every differing commit counts as a change."""
    import subprocess

    changed: list[str] = []
    for c in sorted(made - {commit}):
        # changes to comment lines alone (recipe notes, for example) do not count
        proc = subprocess.run(["git", "diff", "--numstat", "-I", "^[[:space:]]*#", c, commit, "--", *CODE_PATHS,
                               *(f":(exclude){p}" for p in NOT_TRAINING)], capture_output=True,
                              text=True, cwd=Path(__file__).resolve().parent.parent)
        changed += ([line.split("\t")[-1] for line in proc.stdout.splitlines() if line.strip()]
                    if proc.returncode == 0 else [f"<cannot compare {c} with {commit}>"])
    return sorted(set(changed))


def run_all(args: argparse.Namespace) -> None:
    runs_dir = args.out / "runs"
    plan_file = args.out / "plan.json"
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = []
    for seed in args.seeds:  # folders are checked before any calibration runs
        for method in args.methods:
            folder = runs_dir / f"{method}_s{seed}"
            if folder.exists():
                if not args.resume:
                    raise SystemExit(f"{folder} exists: add --resume to keep finished runs and continue the others, "
                                     "or give another --out")
                if (folder / FAILED_FILE).is_file():
                    shutil.rmtree(folder)  # a failed run is tried again on --resume
                elif _finished(folder):
                    logger.info("%s finished: kept", folder.name)
                    continue
            jobs.append((method, seed, folder))
    if args.resume and plan_file.is_file():
        plan = json.loads(plan_file.read_text())
        missing = sorted(set(args.methods) - set(plan["methods"]))
        if missing:  # arms added later: calibrated against the plan's reference FLOPs and budget
            if args.budget_flops is not None and args.budget_flops != plan["budget_flops"]:
                raise SystemExit(f"--resume: {plan_file} has --budget-flops {plan['budget_flops']:.4g}; added arms "
                                 "keep it (leave --budget-flops out)")
            added = calibrate(missing, plan["extra"], plan["budget_flops"], threads,
                              reference=plan["reference_flops_per_epoch"])
            env = environment()
            when = {k: env.get(k) for k in ("commit", "dirty", "date_utc")}
            for name, arm in added["methods"].items():
                plan["methods"][name] = {**arm, "calibrated_with": when}
            plan_file.write_text(json.dumps(plan, indent=1))
    else:
        plan = calibrate(args.methods, args.overrides, args.budget_flops, threads)
        plan.update(split=args.split, noises=args.noises, prompts=args.prompts, extra=args.overrides, recipe=RECIPE,
                    calibrated_with=environment())
        args.out.mkdir(parents=True, exist_ok=True)
        plan_file.write_text(json.dumps(plan, indent=1))
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(train_run, run_overrides(m, plan, s, args.resume and f.exists()), f, threads): (m, s)
                   for m, s, f in jobs}
        for future, (method, seed) in futures.items():
            res = future.result()
            folder = Path(res["folder"])
            if res["failed"]:
                logger.warning("%s seed %d FAILED: %s", method, seed, res["failed"])
                continue
            prune(folder)
            run = RunDir.open(folder)
            logger.info("%s seed %d: %d epochs, %.0f s training, %.3g FLOPs", method, seed, run.epochs_done,
                        run.final("time/total_s") or math.nan, run.final("cost/flops_total") or math.nan)


def _finished(folder: Path) -> bool:
    try:
        run = RunDir.open(folder)
    except RunFolderError:
        return False
    return run.finished and run.summary is not None


# --- analysis -----------------------------------------------------------------------------------------------


def _est(e: Estimate | None) -> dict[str, Any] | None:
    return e.to_dict() if e is not None else None


def _num(v: float) -> float | None:
    return v if math.isfinite(v) else None


def analyze(out: Path, target: float | None = None, reward: str = REWARD) -> dict[str, Any]:
    """Read ``out/runs`` and return the summary (see the module docstring); writes nothing."""
    runs_dir = out / "runs"
    folders = sorted(p for p in runs_dir.iterdir() if p.is_dir()) if runs_dir.is_dir() else []
    if not folders:
        raise SystemExit(f"no run folders under {runs_dir}: run the benchmark first")
    plan = json.loads((out / "plan.json").read_text()) if (out / "plan.json").is_file() else {}
    commit = environment()["commit"]
    runs: dict[str, dict[int, RunDir]] = {}
    listed: list[dict[str, Any]] = []
    for folder in folders:
        method, _, seed_text = folder.name.rpartition("_s")
        entry: dict[str, Any] = {"run": folder.name, "method": method, "seed": int(seed_text)}
        listed.append(entry)
        if (folder / FAILED_FILE).is_file():
            entry["status"] = "failed: " + json.loads((folder / FAILED_FILE).read_text())["error"]
            continue
        try:
            run = RunDir.open(folder)
        except RunFolderError as exc:
            entry["status"] = f"unreadable: {exc}"
            continue
        entry["status"] = run.status()
        made = {str(row.get("commit")) for row in read_environment(folder)}
        changed = code_changes(made, commit)
        if changed:
            entry["stale"] = (f"trained at commit(s) {sorted(made)}, analysed at {commit}; the code that trains "
                              f"changed since: {', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}")
        entry["torch_threads"] = sorted({row.get("torch_threads") for row in read_environment(folder)}, key=str)
        if not run.finished:
            continue
        runs.setdefault(method, {})[int(seed_text)] = run
        entry["final"] = {a: run.final(AXES[a][0]) for a in AXES_USED}
        entry["final_score"] = heldout_curve(run, reward, "epoch")[1][-1]
    if BASELINE not in runs:
        logger.warning("no finished %s run: differences to the baseline are left out", BASELINE)
    ok = [r for by_seed in runs.values() for r in by_seed.values()]
    if not ok:
        raise SystemExit(f"no finished run under {runs_dir}; see the failed ones: "
                         + "; ".join(f"{e['run']}: {e['status']}" for e in listed))
    summary: dict[str, Any] = {"reward": f"held-out {reward}", "split": plan.get("split"), "plan": plan,
                               "runs": listed, "axes": {}, "baseline": BASELINE}
    for axis in AXES_USED:
        curves = {m: {s: heldout_curve(r, reward, axis) for s, r in by_seed.items()} for m, by_seed in runs.items()}
        budget = min(c[0][-1] for by_seed in curves.values() for c in by_seed.values())
        block: dict[str, Any] = {"label": AXES[axis][1], "common_budget": budget, "budgets": {}}
        for frac_name, frac in FRACTIONS.items():
            at = budget * frac
            per_method = {}
            values = {m: {s: interpolate(*c, at) for s, c in by_seed.items()} for m, by_seed in curves.items()}
            for m, per_seed in values.items():
                diff = seed_paired_difference(values[BASELINE], per_seed) if BASELINE in values and m != BASELINE \
                    else None
                per_method[m] = {"score": _est(mean_estimate(list(per_seed.values()))),
                                 "diff_vs_baseline_seed_paired": _est(diff),
                                 "per_seed": {str(s): _num(v) for s, v in sorted(per_seed.items())}}
            block["budgets"][frac_name] = {"at": at, "methods": per_method}
        summary["axes"][axis] = block
    summary["prompt_paired_final"] = _prompt_paired(runs, reward)
    summary["to_target"] = _to_target(runs, curves_by_axis={a: {m: {s: heldout_curve(r, reward, a)
                                                                     for s, r in by_seed.items()}
                                                                 for m, by_seed in runs.items()} for a in AXES_USED},
                                      target=target, reward=reward)
    return summary


def _prompt_paired(runs: dict[str, dict[int, RunDir]], reward: str) -> dict[str, Any]:
    """:func:`alignkit.compare.compare_runs` on all finished runs, the baseline's first: per method the final
    held-out score minus the baseline's, paired by (prompt, noise), 95% interval over prompts."""
    if BASELINE not in runs:
        return {"note": f"no finished {BASELINE} run"}
    order = [BASELINE, *(m for m in runs if m != BASELINE)]
    paths = [r.path for m in order for r in runs[m].values()]
    try:
        comparison = compare_runs(paths, axis="flops", reward=reward)
    except RunFolderError as exc:
        return {"note": f"not comparable: {exc}"}
    out: dict[str, Any] = {"note": "each run's final evaluation (at its whole budget); runs of a method averaged per "
                                   "(prompt, noise); 95% t interval over prompts"}
    for result in comparison.results:
        members = {r.path for r in result.group.runs}
        method = next((m for m in order if {r.path for r in runs[m].values()} == members), result.group.label)
        out[method] = {"final": _est(result.final), "diff_vs_baseline": _est(result.paired),
                       "runs": sorted(r.path.name for r in result.group.runs)}
    return out


def _to_target(runs: dict[str, dict[int, RunDir]], curves_by_axis: dict[str, Any], target: float | None,
               reward: str) -> dict[str, Any]:
    first = next(iter(next(iter(runs.values())).values()))
    if first.before is None:
        return {"shown": False, "why": "no eval_before record"}
    per_prompt = by_prompt(first.before.scores(reward))
    base = mean_estimate(list(per_prompt.values()))
    floor = base.mean + 3 * base.se
    finals = {m: mean_estimate([heldout_curve(r, reward, "epoch")[1][-1] for r in by_seed.values()]).mean
              for m, by_seed in runs.items()}
    chosen = target if target is not None else max(floor, base.mean + 0.5 * (max(finals.values()) - base.mean))
    out: dict[str, Any] = {"base": _est(base), "min_target_3se": floor, "target": chosen,
                           "se_unit": "prompts (each prompt's noises averaged first)"}
    if chosen < floor:
        out.update(shown=False, why=f"target {chosen:.4f} is less than 3 standard errors above the base "
                                    f"{base.mean:.4f} (minimum {floor:.4f})")
        return out
    out["shown"] = True
    out["axes"] = {}
    for axis, curves in curves_by_axis.items():
        block = {}
        for m, by_seed in curves.items():
            xs_list, ys_list = [c[0] for c in by_seed.values()], [c[1] for c in by_seed.values()]
            grid, mean, _ = mean_band(xs_list, ys_list)
            seeds = {}
            for s, (xs, ys) in by_seed.items():
                x = first_crossing(xs, ys, chosen)
                seeds[str(s)] = x if math.isfinite(x) else f"not reached by budget ({xs[-1]:.4g})"
            crossing = first_crossing(grid, mean, chosen)
            block[m] = {"seed_averaged": _num(crossing) if math.isfinite(crossing) else "not reached by budget",
                        "reached": sum(not isinstance(v, str) for v in seeds.values()), "seeds": seeds}
        out["axes"][axis] = block
    return out


# --- outputs ------------------------------------------------------------------------------------------------


def table(summary: dict[str, Any]) -> str:
    lines = [f"# Sample efficiency at equal compute ({summary['reward']}, split {summary['split']})", "",
             "Scores: mean over seeds [95% t interval]; differences: seed-paired to "
             f"{BASELINE} [95% paired t interval]. Budgets are fractions of the common budget (the cheapest run's "
             "final value on the axis).", ""]
    for block in summary["axes"].values():
        lines += [f"## {block['label']} (common budget {block['common_budget']:.4g})", "",
                  "| method | " + " | ".join(f"score @{f}" for f in FRACTIONS) + " | " +
                  " | ".join(f"diff @{f}" for f in FRACTIONS) + " |", "|---" * (1 + 2 * len(FRACTIONS)) + "|"]
        for m in block["budgets"]["1"]["methods"]:
            cells = [format_interval(block["budgets"][f]["methods"][m]["score"]) for f in FRACTIONS]
            diffs = [format_interval(block["budgets"][f]["methods"][m]["diff_vs_baseline_seed_paired"], True)
                     for f in FRACTIONS]
            lines.append(f"| {m} | " + " | ".join(cells) + " | " + " | ".join(diffs) + " |")
        lines.append("")
    lines += ["## Final evaluation, prompt-paired difference to the baseline (alignkit.compare)", ""]
    for m, v in summary["prompt_paired_final"].items():
        if isinstance(v, dict):
            lines.append(f"- {m}: final {format_interval(v['final'])}, "
                         f"diff {format_interval(v['diff_vs_baseline'], True)}")
    tt = summary["to_target"]
    lines += ["", "## To target", ""]
    if not tt.get("shown"):
        lines.append(f"Not shown: {tt.get('why')}.")
    else:
        lines.append(f"Target {tt['target']:.4f} (base {tt['base']['mean']:.4f}, base + 3 SE = "
                     f"{tt['min_target_3se']:.4f}); seeds that never reach it are censored.")
        for axis, block in tt["axes"].items():
            for m, v in block.items():
                lines.append(f"- {axis} {m}: seed-averaged {v['seed_averaged']}; reached {v['reached']}/"
                             f"{len(v['seeds'])}; per seed {v['seeds']}")
    lines += ["", "## Every run", "", "| run | status | final score | " + " | ".join(AXES_USED) + " |",
              "|---" * (3 + len(AXES_USED)) + "|"]
    for e in summary["runs"]:
        fin = e.get("final", {})
        score = e.get("final_score")
        lines.append(f"| {e['run']} | {e['status']}{' (STALE)' if e.get('stale') else ''} | "
                     f"{'-' if score is None else f'{score:.4f}'} | "
                     + " | ".join("-" if fin.get(a) is None else f"{fin[a]:.4g}" for a in AXES_USED) + " |")
    return "\n".join(lines) + "\n"


def plot(out: Path, reward: str, path: Path) -> None:
    from alignkit.html_page import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(AXES_USED), figsize=(5 * len(AXES_USED), 4))
    runs_dir = out / "runs"
    by_method: dict[str, list[RunDir]] = {}
    for folder in sorted(runs_dir.iterdir()):
        if folder.is_dir() and _finished(folder):
            by_method.setdefault(folder.name.rpartition("_s")[0], []).append(RunDir.open(folder))
    for i, (method, runs) in enumerate(by_method.items()):
        for ax, axis in zip(axes, AXES_USED, strict=True):
            curves = [heldout_curve(r, reward, axis) for r in runs]
            grid, mean, half = mean_band([c[0] for c in curves], [c[1] for c in curves])
            ax.plot(grid, mean, "o-", ms=3, color=f"C{i}", label=f"{method} ({len(runs)} seeds)")
            ax.fill_between(grid, [m - h for m, h in zip(mean, half, strict=True)],
                            [m + h for m, h in zip(mean, half, strict=True)], color=f"C{i}", alpha=0.2)
    for ax, axis in zip(axes, AXES_USED, strict=True):
        ax.set_xlabel(AXES[axis][1])
        ax.set_ylabel(f"held-out {reward}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_outputs(out: Path, summary: dict[str, Any], reward: str) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "table.md").write_text(table(summary))
    plot(out, reward, out / "curves.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--budget-flops", type=float, default=None,
                        help=f"total model FLOPs of every run (default: {REFERENCE}'s FLOPs of {DEFAULT_EPOCHS} "
                             "epochs)")
    parser.add_argument("--split", choices=["validation", "test"], default="test",
                        help="held-out prompts (prompts.options.eval_split): choices on validation, reports on test")
    parser.add_argument("--noises", type=int, default=3, help="evaluation noises per prompt (eval.seeds_per_prompt)")
    parser.add_argument("--prompts", type=int, default=64,
                        help="held-out prompts (distinct captions on the test split: the shapes world has 87)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (each gets cpu_count/jobs threads)")
    parser.add_argument("--resume", action="store_true", help="keep finished run folders, continue the others")
    parser.add_argument("--analyze-only", action="store_true", help="only analyse the run folders under OUT/runs")
    parser.add_argument("--target", type=float, default=None,
                        help="held-out score of the to-target figure (default: halfway from the base to the best "
                             "method's final mean, at least base + 3 SE)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/sample_efficiency"))
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    if args.noises < 2:
        parser.error(f"--noises {args.noises}: evaluate with at least 2 noises per prompt")
    if BASELINE not in args.methods and not args.analyze_only:
        logger.warning("%s is not among --methods: differences to the baseline will be missing", BASELINE)
    load_before = os.getloadavg()
    if not args.analyze_only:
        run_all(args)
    summary = analyze(args.out, args.target)
    summary["provenance"] = {**environment(), "load_average_before": load_before,
                             "load_average_after": os.getloadavg(),
                             "torch_threads_per_run": max(1, (os.cpu_count() or 1) // args.jobs)}
    write_outputs(args.out, summary, REWARD)
    logger.info("%swritten %s", table(summary), args.out)


if __name__ == "__main__":
    main()
