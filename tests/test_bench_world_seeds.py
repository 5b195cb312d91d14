"""bench/world_seeds.py's analysis: seed-paired before/after intervals from the runs' own summary.json, every seed
listed (a missing summary included), provenance recorded."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from script_modules import load_bench

from alignkit.stats import format_interval

ws = load_bench("world_seeds")


def _run(folder: Path, before: float, after: float) -> None:
    folder.mkdir(parents=True)
    est = {"mean": 0.0, "se": 0.0, "n": 4, "ci95": [0.0, 0.0]}
    rewards = [{"name": "r", "weight": 1.0, "before": {**est, "mean": before}, "after": {**est, "mean": after},
                "change": {**est, "mean": after - before}}]
    (folder / "summary.json").write_text(json.dumps({
        "status": "finished: 3 of 3 epochs", "heldout": {"rewards": rewards}, "rollout_nfe": 10,
        "model_flops": 1e9, "train_seconds": 5.0, "wall_seconds": 6.0}))
    (folder / "environment.jsonl").write_text(json.dumps({"commit": "abc", "dirty": False, "threads": {"intra_op": 1},
                                                          "load_average": [0.5, 0.4, 0.3]}) + "\n")


def test_seed_paired_change_and_missing_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    changes = {0: 0.10, 1: 0.20, 2: 0.30}
    for seed, change in changes.items():
        _run(runs / f"s{seed}", 0.25, 0.25 + change)
    (runs / "s3").mkdir()  # a failed run: no summary.json
    monkeypatch.setattr(sys, "argv", ["world_seeds.py", "some_recipe", "--analyze-only", "--runs", str(runs),
                                      "--out", str(out), "--seeds", "0", "1", "2", "3"])
    ws.main()
    result = json.loads((out / "some_recipe.json").read_text())
    change = result["rewards"]["r"]["change"]
    # changes 0.1, 0.2, 0.3: mean 0.2, sd 0.1, se 0.1/sqrt(3); t(0.975, 2) = 4.303
    assert change["n"] == 3 and change["mean"] == pytest.approx(0.2)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert change["ci95"] == pytest.approx([0.2 - half, 0.2 + half], rel=1e-3)  # alignkit.stats.t975: 4 digits
    assert result["rewards"]["r"]["before"]["mean"] == pytest.approx(0.25)
    assert result["seeds"]["3"]["status"].startswith("no summary.json")
    assert result["seeds"]["0"]["load_average"] == [0.5, 0.4, 0.3] and result["seeds"]["0"]["commit"] == "abc"
    assert "commit" in result["provenance"] and "load_average" in result["provenance"]
    table = (out / "some_recipe.md").read_text()
    assert "| 3 | no summary.json (failed or unfinished) |" in table and "+0.200 [" in table


def test_analyze_only_names_missing_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["world_seeds.py", "some_recipe", "--analyze-only", "--runs", str(tmp_path),
                                      "--seeds", "0"])
    with pytest.raises(SystemExit, match=r"no run folders for seeds \[0\]"):
        ws.main()


def test_intervals_print_zero_bounds_and_missing_intervals() -> None:
    # a bound of exactly 0 (a strict score that never moved) prints as 0, not as a missing value
    assert format_interval({"mean": 0.0, "se": 0.0, "n": 5, "ci95": [0.0, 0.0]}) == "0.000 [0.000, 0.000]"
    assert format_interval({"mean": 0.02, "se": 0.01, "n": 5, "ci95": [-0.01, 0.05]}, signed=True) == \
        "+0.020 [-0.010, +0.050]"
    assert format_interval({"mean": 0.3, "se": None, "n": 1, "ci95": [None, None]}) == "0.300 (n=1)"
    assert format_interval(None) == "-"
