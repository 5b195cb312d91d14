"""`alignkit compare`: grouping by recipe, equal compute and paired differences checked by hand on run folders
written with known scores; refusals; the command on real tiny runs."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

from alignkit.cli import main
from alignkit.compare import compare_runs, format_comparison
from alignkit.compose import load_run_config, write_run_config
from alignkit.run_dir import write_records

PROMPTS = ["a red apple", "a blue car", "a cat"]


def make_run(root: Path, name: str, overrides: list[str], nfe_per_epoch: float, before: dict, after: dict,
             recipe: str = "sd3_tiny_flow_grpo", prompts: list[str] = PROMPTS, flops: bool = False,
             record_overrides: bool = True) -> Path:
    """A finished 2-epoch run folder as `alignkit train` writes it: config, overrides (unless not
    ``record_overrides``: a recipe file edited instead), metrics and held-out records with the given
    jpeg_compressibility scores ``{(prompt id, seed): score}`` before and after training."""
    out = root / name
    cfg = load_run_config(recipe, [f"output_dir={out}", "train.epochs=2", *overrides])
    write_run_config(out, cfg, overrides if record_overrides else [])
    reward = next(iter(cfg.reward))
    rows = []
    for epoch, scores in ((0, before), (1, None), (2, after)):
        row = {"step": epoch, "epoch": epoch, "rollout/nfe_total": epoch * nfe_per_epoch, "time/total_s": 3.0 * epoch}
        if flops:
            row["cost/flops_total"] = 1e9 * epoch * nfe_per_epoch
        if epoch:
            row[f"reward/{reward}_mean"] = -1.0 + 0.1 * epoch
            row["time/epoch_s"] = 3.0
        if scores is not None:
            row[f"eval/{reward}"] = statistics.fmean(scores.values())
            record = "eval_before" if epoch == 0 else "eval_after"
            write_records(out / "eval" / record, [
                {"prompt_id": p, "seed": s, "prompt": prompts[p], "epoch": epoch, "rewards": {reward: v},
                 "file": None, "text": None} for (p, s), v in scores.items()])
        rows.append(row)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def scores(values: list[float]) -> dict[tuple[int, int], float]:
    """Six scores in (prompt, seed) order: prompts 0..2, seeds 0..1."""
    return {(p, s): values[2 * p + s] for p in range(3) for s in range(2)}


BEFORE = scores([1.0, 1.2, 0.5, 0.7, 0.0, 0.2])
AFTER = {"a0": scores([1.1, 1.3, 0.6, 0.6, 0.1, 0.3]), "a1": scores([1.3, 1.1, 0.4, 0.8, 0.0, 0.4]),
         "b0": scores([1.5, 1.6, 0.9, 0.9, 0.2, 0.6]), "b1": scores([1.2, 1.8, 1.1, 0.7, 0.4, 0.4])}


@pytest.fixture
def four_runs(tmp_path: Path) -> dict[str, Path]:
    """Recipe A (Flow-GRPO, 100 NFE per epoch) and recipe B (beta=0, 150 NFE per epoch), two seeds each."""
    runs = {}
    for name, after in AFTER.items():
        extra = [f"seed={name[1]}"] + (["algo.objective.beta=0"] if name[0] == "b" else [])
        runs[name] = make_run(tmp_path, name, extra, 100.0 if name[0] == "a" else 150.0, BEFORE, after,
                              flops=True)
    return runs


def test_groups_equal_compute_and_paired_difference_by_hand(four_runs: dict[str, Path]) -> None:
    c = compare_runs([four_runs[n] for n in ("a0", "b0", "a1", "b1")], axis="nfe")
    a, b = c.results
    assert [len(r.group.runs) for r in c.results] == [2, 2]  # seeds pooled, order of first appearance
    assert a.group.label == "sd3_tiny_flow_grpo"  # labelled by the overrides that set a group apart
    assert b.group.label == "sd3_tiny_flow_grpo algo.objective.beta=0"
    assert c.budget == 200.0  # recipe A is cheaper: 2 epochs x 100 NFE
    mean_before = statistics.fmean(BEFORE.values())

    def final(name: str) -> float:
        return statistics.fmean(AFTER[name].values())

    # A ends at the budget; B's held-out curve (0 -> 300 NFE) is read at 200 NFE, 2/3 of the way
    at_a = [final("a0"), final("a1")]
    at_b = [mean_before + (final(n) - mean_before) * 2 / 3 for n in ("b0", "b1")]
    for result, values in ((a, at_a), (b, at_b)):
        assert result.at_budget.mean == pytest.approx(statistics.fmean(values))
        assert result.at_budget.half_width == pytest.approx(12.706 * statistics.stdev(values) / math.sqrt(2))
    assert b.final.mean == pytest.approx(statistics.fmean([final("b0"), final("b1")]))
    # paired: per (prompt, seed) the mean over a group's runs, B - A, seeds averaged per prompt, CI over prompts
    diff = {k: (AFTER["b0"][k] + AFTER["b1"][k]) / 2 - (AFTER["a0"][k] + AFTER["a1"][k]) / 2 for k in BEFORE}
    per_prompt = [(diff[(p, 0)] + diff[(p, 1)]) / 2 for p in range(3)]
    assert a.paired is None
    assert b.paired.mean == pytest.approx(statistics.fmean(per_prompt))
    assert b.paired.half_width == pytest.approx(4.303 * statistics.stdev(per_prompt) / math.sqrt(3))
    text = format_comparison(c)
    assert re.search(r"^sd3_tiny_flow_grpo algo\.objective\.beta=0\s+2\s+300\s", text, re.M)
    assert f"{b.paired.mean:+.3f} ± {b.paired.half_width:.3f}" in text
    # on the FLOPs axis (1e9 FLOPs per NFE here) equal compute is the same point
    flops = compare_runs([four_runs[n] for n in ("a0", "a1", "b0", "b1")], axis="flops")
    assert flops.budget == 2e11 and flops.results[1].at_budget.mean == pytest.approx(b.at_budget.mean)
    assert compare_runs([four_runs["a0"], four_runs["b0"]], axis="epoch").budget == 2.0


def test_groups_without_telling_overrides_are_labelled_by_their_settings(tmp_path: Path) -> None:
    runs = [make_run(tmp_path, n, [f"seed={s}", *extra], 100.0, BEFORE, AFTER["a0"], record_overrides=False)
            for n, s, extra in (("x0", 0, []), ("y0", 0, ["algo=dance_grpo"]), ("x1", 1, []))]
    labels = [r.group.label for r in compare_runs(runs, axis="epoch").results]
    assert labels == ["sd3_tiny_flow_grpo (algo.name=flow_grpo, algo.step_kind=flow_grpo, algo.noise_level=0.7)",
                      "sd3_tiny_flow_grpo (algo.name=dance_grpo, algo.step_kind=dance_grpo, algo.noise_level=0.3)"]


def test_command_writes_table_and_html(four_runs: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    page = tmp_path / "cmp.html"
    assert main(["compare", *map(str, four_runs.values()), "--axis", "time", "-o", str(page), "-q"]) == 0
    out = capsys.readouterr().out
    assert "equal compute: 6 on axis time" in out and "baseline" in out
    text = page.read_text()
    assert all(src.startswith("data:image/png;base64,") for src in re.findall(r'src="([^"]*)"', text))
    assert "http" not in text and "<script" not in text and text.count("finished: 2 of 2 epochs") == 4


def test_command_writes_the_curves_as_a_png(four_runs: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    png = tmp_path / "fig" / "curves.png"
    assert main(["compare", *map(str, four_runs.values()), "--axis", "epoch", "-o", str(tmp_path / "c.html"),
                 "--figure", str(png), "-q"]) == 0
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 600 and im.height > 200
        assert len(set(im.convert("RGB").getdata())) > 50  # curves, bands and text, not a blank canvas


@pytest.mark.parametrize("case", ["worlds", "eval_seed", "prompts", "samples", "axis", "not_a_run", "twice",
                                  "no_flops", "no_metrics", "reward"])
def test_refusals_are_one_line_naming_the_difference(case: str, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    a = make_run(tmp_path, "a", [], 100.0, BEFORE, AFTER["a0"])
    args = [str(a)]
    if case == "worlds":
        other = make_run(tmp_path, "s", [], 100.0, BEFORE, AFTER["a0"], recipe="shapes_tempflow_grpo")
        expected = f"runs of different worlds cannot be compared (prompts.source): {a} (list), {other} (shapes)"
    elif case == "eval_seed":
        other = make_run(tmp_path, "b", ["eval.seed=7"], 100.0, BEFORE, AFTER["b0"])
        expected = f"eval.seed: 1234 in {a}, 7 in {other}"
    elif case == "prompts":
        other = make_run(tmp_path, "b", [], 100.0, BEFORE, AFTER["b0"], prompts=["a red apple", "a bus", "a cat"])
        expected = f"held-out prompts differ: prompt 1 is 'a blue car' in {a} and 'a bus' in {other}"
    elif case == "samples":
        fewer = {k: v for k, v in BEFORE.items() if k[1] == 0}
        other = make_run(tmp_path, "b", [], 100.0, fewer, fewer)
        expected = f"held-out samples differ: 6 (prompt, seed) pairs in {a}, 3 in {other}"
    elif case == "axis":
        other = make_run(tmp_path, "b", [], 100.0, BEFORE, AFTER["b0"])
        args.append("--axis=steps")
        expected = "--axis 'steps' is not an axis; choose one of epoch, nfe, flops, time"
    elif case == "not_a_run":
        other = tmp_path / "empty"
        other.mkdir()
        expected = f"{other} is not an alignkit run folder"
    elif case == "twice":
        other = a
        expected = f"run folder given twice: {a}"
    elif case == "no_metrics":  # started, nothing finished yet
        other = make_run(tmp_path, "b", [], 100.0, BEFORE, AFTER["b0"])
        (other / "metrics.jsonl").unlink()
        expected = f"run {other} has no metrics yet"
    elif case == "reward":
        other = make_run(tmp_path, "b", [], 100.0, BEFORE, AFTER["b0"])
        args.append("--reward=clip")
        expected = f"--reward clip: run {a} has no held-out scores of it; choose one of jpeg_compressibility, aggregate"
    else:
        other = make_run(tmp_path, "b", [], 100.0, BEFORE, AFTER["b0"])
        args.append("--axis=flops")
        expected = f"--axis flops: run {a} logged no cost/flops_total; choose another axis (epoch, nfe, time)"
    assert main(["compare", *args, str(other), "-o", str(tmp_path / "c.html")]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "\n" not in errors[0] and "Traceback" not in caplog.text
    assert expected in errors[0]
    assert not (tmp_path / "c.html").exists()


@pytest.mark.integration
def test_compare_real_runs(tiny_runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = [tiny_runs[n].path for n in ("a0", "b0", "a1")]
    assert main(["compare", *map(str, paths), "--axis", "epoch", "-o", str(tmp_path / "c.html"), "-q"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("sd3_tiny_flow_grpo")]
    assert len(lines) == 2 and re.match(r"sd3_tiny_flow_grpo\s+2\s+2\s", lines[0])
    assert re.match(r"sd3_tiny_flow_grpo algo\.objective\.beta=0\s+1\s+2\s", lines[1])
    c = compare_runs(paths, axis="epoch", reward="big")
    after = {n: {(r["prompt_id"], r["seed"]): r["rewards"]["big"] for r in map(
        json.loads, (tiny_runs[n].path / "eval" / "eval_after.jsonl").read_text().splitlines())} for n in tiny_runs}
    per_prompt = [statistics.fmean(after["b0"][(p, s)] - (after["a0"][(p, s)] + after["a1"][(p, s)]) / 2
                                   for s in range(2)) for p in range(3)]
    assert c.results[1].paired.mean == pytest.approx(statistics.fmean(per_prompt), abs=1e-9)
    assert c.results[1].paired.n == 3


def test_unfinished_run_is_compared_as_far_as_it_got(four_runs: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    partial = four_runs["b0"]
    rows = (partial / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text("\n".join(rows[:2]) + "\n")  # epoch 1 done, no evaluation since
    (partial / "eval" / "eval_after.jsonl").unlink()
    assert main(["compare", str(four_runs["a0"]), str(partial), "--axis", "epoch", "-o", str(tmp_path / "c.html"),
                 "-q"]) == 0
    out = capsys.readouterr().out
    assert f"note: {partial}: not finished: 1 of 2 epochs done" in out
    # its latest held-out evaluation is the one before training: equal compute is epoch 0
    assert "equal compute: 0 on axis epoch" in out
