"""bench/sample_efficiency.py: its runs and analysis on tiny real training runs of the shapes world."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from script_modules import load_bench

from alignkit.run_dir import RunDir
from alignkit.stats import interpolate, mean_estimate, paired_difference

REPO = Path(__file__).resolve().parents[1]


se = load_bench("sample_efficiency")
TINY = ["backbone.num_steps=4", "train.prompts_per_epoch=1", "train.rollout_batch_size=16", "eval.num_prompts=6",
        "eval.batch_size=12", "train.train_batch_size=16"]


@pytest.fixture(scope="module")
def bench_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("se")
    plan = {"split": "test", "noises": 2, "prompts": 6, "extra": TINY, "methods": {
        "tempflow": {"epochs": 2, "eval_every": 1, "match_overrides": []},
        "flow_grpo_matched": {"epochs": 2, "eval_every": 1,
                              "match_overrides": ["algo.num_seeds=4", "train.prompts_per_epoch=2"]}}}
    (out / "plan.json").write_text(json.dumps(plan))
    for method in plan["methods"]:
        folder = out / "runs" / f"{method}_s0"
        res = se.train_run(se.run_overrides(method, plan, 0, resume=False), folder, threads=1)
        assert res["failed"] is None, res
        se.prune(folder)
    # a run that fails (an invalid override) is recorded and listed, not dropped
    bad = se.train_run(["algo.num_seeds=1", *TINY], out / "runs" / "flow_grpo_g24_s0", threads=1)
    assert bad["failed"] and "num_seeds" in bad["failed"]
    return out


def test_runs_keep_only_what_the_analysis_reads(bench_out: Path) -> None:
    folder = bench_out / "runs" / "tempflow_s0"
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "environment.jsonl", "eval", "metrics.jsonl",
                                                        "overrides.yaml", "summary.json"]
    assert sorted(p.name for p in (folder / "eval").iterdir()) == ["eval_after.jsonl", "eval_before.jsonl"]
    run = RunDir.open(folder)
    assert run.finished and run.setting("prompts.options.eval_split") == "test"
    assert run.setting("eval.seeds_per_prompt") == 2 and len(run.latest.keys) == 12  # 6 prompts x 2 noises
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 200_000


def test_analysis_scores_differences_and_failed_runs(bench_out: Path) -> None:
    summary = se.analyze(bench_out, reward="shapeeval_partial")
    status = {e["run"]: e["status"] for e in summary["runs"]}
    assert status["flow_grpo_g24_s0"].startswith("failed: ") and "num_seeds" in status["flow_grpo_g24_s0"]
    assert status["tempflow_s0"].startswith("finished")
    runs = {m: RunDir.open(bench_out / "runs" / f"{m}_s0") for m in ("tempflow", "flow_grpo_matched")}
    for axis in ("nfe", "flops", "cpu"):
        block = summary["axes"][axis]
        key = {"nfe": "rollout/nfe_total", "flops": "cost/flops_total", "cpu": "time/cpu_total_s"}[axis]
        assert block["common_budget"] == min(r.final(key) for r in runs.values())
        for frac, share in (("1/4", 0.25), ("1/2", 0.5), ("1", 1.0)):
            at = block["common_budget"] * share
            got = block["budgets"][frac]["methods"]
            values = {}
            for m, run in runs.items():
                xs, ys = run.series("eval/shapeeval_partial", axis)
                values[m] = interpolate(xs, ys, at)
                assert got[m]["per_seed"]["0"] == pytest.approx(values[m])
                assert got[m]["score"]["mean"] == pytest.approx(values[m]) and got[m]["score"]["n"] == 1
            diff = got["tempflow"]["diff_vs_baseline_seed_paired"]
            assert diff["mean"] == pytest.approx(values["tempflow"] - values["flow_grpo_matched"])
            assert got["flow_grpo_matched"]["diff_vs_baseline_seed_paired"] is None  # the baseline itself
    # prompt-paired at the final evaluation: alignkit.compare over (prompt, noise) pairs
    pp = summary["prompt_paired_final"]["tempflow"]["diff_vs_baseline"]
    want = paired_difference(runs["flow_grpo_matched"].latest.scores("shapeeval_partial"),
                             runs["tempflow"].latest.scores("shapeeval_partial"))
    assert pp["mean"] == pytest.approx(want.mean) and pp["n"] == want.n == 6


def test_to_target_needs_three_standard_errors_and_censors(bench_out: Path) -> None:
    base_run = RunDir.open(bench_out / "runs" / "tempflow_s0")
    from alignkit.stats import by_prompt

    base = mean_estimate(list(by_prompt(base_run.before.scores("shapeeval_partial")).values()))
    low = se.analyze(bench_out, target=base.mean + base.se, reward="shapeeval_partial")["to_target"]
    assert low["shown"] is False and "3 standard errors" in low["why"]
    high = se.analyze(bench_out, target=base.mean + 3 * base.se + 5.0, reward="shapeeval_partial")["to_target"]
    assert high["shown"] is True  # unreachable: every seed censored, named as such
    for block in high["axes"].values():
        for v in block.values():
            assert v["reached"] == 0 and v["seed_averaged"] == "not reached by budget"
            assert all(s.startswith("not reached by budget") for s in v["seeds"].values())


def test_outputs_table_plot_and_json(bench_out: Path) -> None:
    summary = se.analyze(bench_out, reward="shapeeval_partial")
    summary["provenance"] = {"commit": "x"}
    se.write_outputs(bench_out, summary, "shapeeval_partial")
    loaded = json.loads((bench_out / "summary.json").read_text())
    assert set(loaded["axes"]) == {"nfe", "flops", "cpu"}
    table = (bench_out / "table.md").read_text()
    assert "flow_grpo_g24_s0 | failed:" in table and "tempflow_s0 | finished" in table
    assert (bench_out / "curves.png").stat().st_size > 10_000
    assert not math.isnan(loaded["to_target"]["base"]["mean"])
