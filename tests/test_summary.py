"""What a run says about itself: per-sample held-out records, the end-of-run summary (summary.json and printed),
the start-of-run line, the progress bar (tiny SD3 runs through `alignkit train`, conftest.tiny_runs)."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from alignkit.metrics import read_metrics
from alignkit.rewards.compression import JpegCompressibility
from alignkit.stats import Estimate, first_crossing, interpolate, paired_difference, seed_paired_difference, t975
from alignkit.summary import short_names

WEIGHTS = {"jpeg_compressibility": 1.0, "big": 0.5}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_t_quantiles_and_interpolation() -> None:
    assert t975(1) == pytest.approx(12.706) and t975(30) == pytest.approx(2.042)
    for df, expected in ((40, 2.0211), (100, 1.9840), (1000, 1.9623)):  # Student's t tables
        assert t975(df) == pytest.approx(expected, abs=2e-4)
    assert math.isnan(t975(0))
    assert interpolate([0, 10, 30], [1.0, 2.0, 4.0], 20) == pytest.approx(3.0)
    assert math.isnan(interpolate([0, 10], [1.0, 2.0], 11))
    e = Estimate(1.0, 0.5, 3)
    assert e.ci95 == pytest.approx((1.0 - 4.303 * 0.5, 1.0 + 4.303 * 0.5))
    # pairs by (prompt, seed); the prompt is the unit: seeds averaged first
    a = {(0, 0): 1.0, (0, 1): 3.0, (1, 0): 0.0, (1, 1): 0.0, (2, 0): None}
    b = {(0, 0): 2.0, (0, 1): 3.0, (1, 0): 1.0, (1, 1): 2.0, (2, 0): 5.0}
    d = paired_difference(a, b)  # prompt 0: +0.5, prompt 1: +1.5, prompt 2 unpaired
    assert (d.mean, d.n) == (1.0, 2) and d.se == pytest.approx(statistics.stdev([0.5, 1.5]) / math.sqrt(2))


def test_first_crossing_and_seed_paired_difference() -> None:
    assert first_crossing([0, 10, 30], [1.0, 2.0, 4.0], 3.0) == pytest.approx(20.0)  # linear between points
    assert first_crossing([0, 10, 30], [1.0, 2.0, 4.0], 0.5) == 0.0  # already there at the start
    assert first_crossing([0, 10, 20], [1.0, 3.0, 1.0], 2.0) == pytest.approx(5.0)  # the first time, not the last
    assert math.isnan(first_crossing([0, 10], [1.0, 2.0], 2.5))  # censored: never reached
    d = seed_paired_difference({0: 1.0, 1: 2.0, 2: 3.0, 3: math.nan}, {0: 2.0, 1: 2.5, 2: 3.0, 4: 9.0})
    assert (d.n, d.mean) == (3, pytest.approx(0.5))  # seeds 0-2 paired; 3 (NaN) and 4 (unpaired) left out
    assert d.se == pytest.approx(statistics.stdev([1.0, 0.5, 0.0]) / math.sqrt(3))


def test_short_names() -> None:
    assert short_names(["jpeg_compressibility", "big", "shapeeval"]) == {
        "jpeg_compressibility": "jpeg_comp", "big": "big", "shapeeval": "shapeeval"}
    clash = short_names(["jpeg_compressibility_a", "jpeg_compressibility_b"])  # both would be jpeg_comp_
    assert clash == {name: name for name in ("jpeg_compressibility_a", "jpeg_compressibility_b")}


@pytest.mark.integration
def test_heldout_records_hold_every_sample_with_its_file(tiny_runs) -> None:
    run = tiny_runs["a0"].path
    metrics = read_metrics(run / "metrics.jsonl")
    names = sorted(p.name for p in (run / "eval").glob("*.jsonl"))
    assert names == ["eval_00001.jsonl", "eval_after.jsonl", "eval_before.jsonl"]
    scorer = JpegCompressibility()
    for name, epoch in (("eval_before", 0), ("eval_00001", 1), ("eval_after", 2)):
        rows = _rows(run / "eval" / f"{name}.jsonl")
        assert sorted((r["prompt_id"], r["seed"]) for r in rows) == [(p, s) for p in range(3) for s in range(2)]
        assert all(r["epoch"] == epoch for r in rows)
        logged = next(m for m in metrics if m["epoch"] == epoch and "eval/big" in m)
        for reward in WEIGHTS:  # the rows are the samples behind the logged held-out means
            assert statistics.fmean(r["rewards"][reward] for r in rows) == pytest.approx(logged[f"eval/{reward}"])
        for r in rows:  # each file is that sample: scoring it again gives its recorded score
            image = torch.from_numpy(np.array(Image.open(run / "eval" / r["file"]))).float() / 255
            assert image.shape == (32, 32, 3)
            again = scorer(image.permute(2, 0, 1)[None], [r["prompt"]], [{}])[0]
            assert again == pytest.approx(r["rewards"]["jpeg_compressibility"], rel=1e-6)
    held_out = yaml.safe_load((run / "config.yaml").read_text())["prompts"]["eval"][:3]
    assert [r["prompt"] for r in _rows(run / "eval" / "eval_before.jsonl")] == [p for p in held_out for _ in range(2)]


@pytest.mark.integration
def test_summary_json_pairs_before_and_after_by_prompt_and_seed(tiny_runs) -> None:
    run = tiny_runs["a0"].path
    summary = json.loads((run / "summary.json").read_text())
    before = {(r["prompt_id"], r["seed"]): r["rewards"] for r in _rows(run / "eval" / "eval_before.jsonl")}
    after = {(r["prompt_id"], r["seed"]): r["rewards"] for r in _rows(run / "eval" / "eval_after.jsonl")}

    def score(rewards: dict, name: str) -> float:
        return sum(w * rewards[k] for k, w in WEIGHTS.items()) if name == "aggregate" else rewards[name]

    entries = {e["name"]: e for e in summary["heldout"]["rewards"]}
    assert list(entries) == ["jpeg_compressibility", "big", "aggregate"]
    for name, e in entries.items():
        # by hand: a prompt's two seeds averaged, then mean and standard error over the 3 prompts
        per_prompt = [statistics.fmean(score(after[(p, s)], name) - score(before[(p, s)], name) for s in range(2))
                      for p in range(3)]
        base = [statistics.fmean(score(before[(p, s)], name) for s in range(2)) for p in range(3)]
        assert e["change"]["mean"] == pytest.approx(statistics.fmean(per_prompt), abs=1e-9)
        assert e["change"]["se"] == pytest.approx(statistics.stdev(per_prompt) / math.sqrt(3), abs=1e-9)
        half = 4.303 * statistics.stdev(per_prompt) / math.sqrt(3)
        assert e["change"]["ci95"] == pytest.approx([e["change"]["mean"] - half, e["change"]["mean"] + half])
        band = 4.303 * statistics.stdev(base) / math.sqrt(3)
        assert e["noise_band"] == pytest.approx([statistics.fmean(base) - band, statistics.fmean(base) + band])
        inside = e["change"]["ci95"][0] <= 0 <= e["change"]["ci95"][1]
        assert e["verdict"] == ("within noise" if inside else ("better" if e["change"]["mean"] > 0 else "worse"))
    assert entries["big"]["weight"] == 0.5 and entries["aggregate"]["weight"] is None
    metrics = read_metrics(run / "metrics.jsonl")
    assert summary["rollout_nfe"] == metrics[-1]["rollout/nfe_total"] == 2 * 4 * 3
    assert summary["wall_seconds"] == pytest.approx(sum(m["time/epoch_s"] for m in metrics if "time/epoch_s" in m))
    assert summary["model_flops"] == metrics[-1].get("cost/flops_total")  # None until cost accounting logs it
    assert summary["rewards"] == WEIGHTS and summary["aggregation"] == "normalize_then_sum"
    assert summary["algorithm"]["plan"] == "all_stochastic" and summary["status"] == "finished: 2 of 2 epochs"


@pytest.mark.integration
def test_start_line_and_printed_summary(tiny_runs) -> None:
    r = tiny_runs["a0"]
    start = next(line for line in r.log.splitlines() if line.startswith("run: "))
    for part in ("algorithm flow_grpo (plan all_stochastic", "credit group by prompt", "step flow_grpo",
                 "rewards jpeg_compressibility x1, big x0.5 aggregated by normalize_then_sum", "backbone sd3",
                 f"output {r.path}"):
        assert part in start
    assert f"run summary of {r.path} (finished: 2 of 2 epochs)" in r.stdout
    table = r.stdout[r.stdout.index("reward "):]
    assert re.search(r"^\s*aggregate\s+-\s+-?\d\.\d{3}\s+-?\d\.\d{3}\s+[+-]\d\.\d{3} ± \d\.\d{3}", table, re.M)
    assert re.search(r"rollout NFE 24, model FLOPs \d", r.stdout), r.stdout  # cost/flops_total is logged


@pytest.mark.integration
def test_progress_bar_shows_each_reward_the_aggregate_and_nfe(tiny_runs) -> None:
    r = tiny_runs["a0"]
    last = read_metrics(r.path / "metrics.jsonl")[-1]
    bar = r.stderr.replace("\r", "\n").splitlines()
    final = [line for line in bar if "2/2" in line and "jpeg_comp=" in line][-1]
    fields = dict(re.findall(r"(\w+)=([^,\]]+)", final.split("|")[-1]))
    # under normalize_then_sum the aggregated score is ~0 by construction; the bar shows the rewards instead
    assert abs(last["reward/score_mean"]) < 1e-6
    assert fields["jpeg_comp"] == f"{last['reward/jpeg_compressibility_mean']:.3f}"
    assert fields["big"] == f"{last['reward/big_mean']:.3f}"
    agg = last["reward/jpeg_compressibility_mean"] + 0.5 * last["reward/big_mean"]
    assert fields["agg"] == f"{agg:.3f}" != "0.000"
    assert fields["nfe"] == "24" and "heldout" in fields
