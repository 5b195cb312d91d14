"""GenEval-style prompt source: GenEval's generator (its released prompt file regenerated), its wording rules,
seeded splits that never overlap, the registered ``prompts.source=geneval`` and GenEval ``.jsonl`` files."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from alignkit.compose import load_run_config
from alignkit.config import PromptsConfig
from alignkit.prompts import load_prompts
from alignkit.rewards.geneval_prompts import (
    DEFAULT_COUNTS,
    DEFAULT_EVAL_COUNTS,
    benchmark_rows,
    plural,
    split_of,
    with_article,
    write_jsonl,
)
from alignkit.rewards.geneval_rules import COLORS, OBJECT_NAMES, RELATIONS, TAGS, GenEvalRow

WORDS = {2: "two", 3: "three", 4: "four"}


def _expected_prompt(meta: dict) -> str:
    """The prompt a metadata row implies, from geneval.md's templates (independent of the generator)."""
    inc = meta["include"]
    art = with_article
    if meta["tag"] == "single_object":
        return f"a photo of {art(inc[0]['class'])}"
    if meta["tag"] == "two_object":
        return f"a photo of {art(inc[0]['class'])} and {art(inc[1]['class'])}"
    if meta["tag"] == "counting":
        return f"a photo of {WORDS[inc[0]['count']]} {plural(inc[0]['class'])}"
    if meta["tag"] == "colors":
        return f"a photo of {art(inc[0]['color'])} {inc[0]['class']}"
    if meta["tag"] == "position":
        return f"a photo of {art(inc[1]['class'])} {inc[1]['position'][0]} {art(inc[0]['class'])}"
    return f"a photo of {art(inc[0]['color'])} {inc[0]['class']} and {art(inc[1]['color'])} {inc[1]['class']}"


def _check_row(prompt: str, meta: dict) -> None:
    GenEvalRow.from_metadata(meta)
    assert prompt == _expected_prompt(meta)
    inc = meta["include"]
    classes = [c["class"] for c in inc]
    assert len(set(classes)) == len(classes)  # two different classes where there are two
    if meta["tag"] in ("colors", "color_attr"):
        assert "person" not in classes and all(c["color"] in COLORS for c in inc)
        assert len({c["color"] for c in inc}) == len(inc)
    if meta["tag"] == "counting":
        assert inc[0]["count"] in (2, 3, 4) and meta["exclude"] == [{"class": classes[0], "count": inc[0]["count"] + 1}]
    else:
        assert "exclude" not in meta and all(c["count"] == 1 for c in inc)
    if meta["tag"] == "position":
        assert "position" not in inc[0] and inc[1]["position"][0] in RELATIONS and inc[1]["position"][1] == 0


def test_wording_rules() -> None:
    assert [with_article(w) for w in ("orange", "umbrella", "black", "elephant")] == \
        ["an orange", "an umbrella", "a black", "an elephant"]
    assert [plural(w) for w in ("bus", "bench", "sheep", "wine glass", "knife", "toothbrush", "person")] == \
        ["buses", "benchs", "sheeps", "wine glasses", "knifes", "toothbrushs", "persons"]


def test_benchmark_is_genevals_prompt_file() -> None:
    """geneval.md section 1: 553 prompts, 80/99/80/94/100/100 per task, N = 2/3/4 26/28/26 times, relations
    19/27/26/28; the first row of each task is section 10's worked example."""
    rows = benchmark_rows()
    assert len(rows) == 553
    assert Counter(r["tag"] for r in rows) == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94,
                                               "position": 100, "color_attr": 100}
    assert Counter(r["include"][0]["count"] for r in rows if r["tag"] == "counting") == {2: 26, 3: 28, 4: 26}
    assert Counter(r["include"][1]["position"][0] for r in rows if r["tag"] == "position") == \
        {"left of": 19, "right of": 27, "above": 26, "below": 28}
    assert sorted(r["include"][0]["class"] for r in rows if r["tag"] == "single_object") == sorted(OBJECT_NAMES)
    firsts = [next(r for r in rows if r["tag"] == t) for t in TAGS]
    assert [r["prompt"] for r in firsts] == [
        "a photo of a bench", "a photo of a bench and a sports ball", "a photo of two clocks",
        "a photo of a blue fire hydrant", "a photo of a dog right of a teddy bear",
        "a photo of a purple wine glass and a black apple"]
    assert firsts[4] == {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                                        {"class": "dog", "count": 1, "position": ["right of", 0]}],
                         "prompt": "a photo of a dog right of a teddy bear"}
    assert list(firsts[2]) == ["tag", "include", "exclude", "prompt"]  # GenEval's key order
    for r in rows:
        _check_row(r["prompt"], {k: v for k, v in r.items() if k != "prompt"})


def _load(**options) -> tuple:
    return load_prompts(PromptsConfig(source="geneval", options=options))


def test_default_splits_never_overlap_and_follow_the_rules() -> None:
    train, heldout = _load()
    assert len(train) == sum(DEFAULT_COUNTS.values()) and len(heldout) == sum(DEFAULT_EVAL_COUNTS.values())
    assert len(set(train.prompts)) == len(train) and len(set(heldout.prompts)) == len(heldout)
    assert not set(train.prompts) & set(heldout.prompts)
    assert {split_of(p) for p in train.prompts} == {"train"} and {split_of(p) for p in heldout.prompts} == {"heldout"}
    assert Counter(m["tag"] for m in train.metadata) == DEFAULT_COUNTS
    for prompt, meta in zip(train.prompts + heldout.prompts, train.metadata + heldout.metadata):
        _check_row(prompt, meta)
    # other seeds draw other prompts from the same split: still no overlap with any held-out draw
    other, other_heldout = _load(seed=7)
    assert other.prompts != train.prompts and not set(other.prompts) & set(heldout.prompts + other_heldout.prompts)


def test_options_seed_counts_and_tags() -> None:
    a, a_eval = _load(seed=3, tags=["counting", "position"], counts={"counting": 5, "position": 7},
                      eval_counts=4)
    assert Counter(m["tag"] for m in a.metadata) == {"counting": 5, "position": 7}
    assert Counter(m["tag"] for m in a_eval.metadata) == {"counting": 4, "position": 4}
    assert _load(seed=3, tags=["counting", "position"], counts={"counting": 5, "position": 7},
                 eval_counts=4)[0].prompts == a.prompts  # seeded
    # each tag has its own stream: more position prompts leave the counting prompts as they were
    b, _ = _load(seed=3, tags=["position", "counting"], counts={"counting": 5, "position": 20}, eval_counts=4)
    assert [p for p, m in zip(b.prompts, b.metadata) if m["tag"] == "counting"] == a.prompts[:5]
    c, _ = _load(tags=["colors"], counts=3, eval_counts=2)
    assert len(c) == 3 and {m["tag"] for m in c.metadata} == {"colors"}


def test_benchmark_evaluation_keeps_its_prompts_out_of_training() -> None:
    train, evaluation = _load(eval="benchmark", counts={"two_object": 50, "counting": 40})
    bench = benchmark_rows()
    assert evaluation.prompts == [r["prompt"] for r in bench]
    assert evaluation.metadata[0] == {"tag": "single_object", "include": [{"class": "bench", "count": 1}]}
    assert not set(train.prompts) & set(evaluation.prompts)
    assert "single_object" not in {m["tag"] for m in train.metadata}  # all 80 are benchmark prompts
    _, only_counting = _load(eval="benchmark", tags=["counting"], counts=10)
    assert len(only_counting) == 80
    with pytest.raises(ValueError, match=r"prompts.options.counts.single_object=5: only 0 distinct single_object"):
        _load(eval="benchmark", counts={"single_object": 5})


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"sead": 1}, ["unknown keys ['sead']", "seed, tags, counts, eval, eval_counts"]),
        ({"tags": ["colours"]}, ["prompts.options.tags=['colours']", "color_attr"]),
        ({"tags": []}, ["prompts.options.tags=[]"]),
        ({"counts": {"single": 3}}, ["prompts.options.counts has unknown tags ['single']"]),
        ({"counts": {"colors": -1}}, ["prompts.options.counts.colors=-1", ">= 0"]),
        ({"tags": ["counting"], "counts": {"position": 3}}, ["counts gives counts for ['position']", "add them"]),
        ({"counts": "many"}, ["prompts.options.counts='many'"]),
        ({"counts": {"single_object": 70}}, ["counts.single_object=70: only 66 distinct", "lower it"]),
        ({"counts": 0}, ["no training prompts"]),
        ({"eval": "test"}, ["prompts.options.eval='test'", "benchmark"]),
        ({"eval_counts": 0}, ["eval_counts are all 0"]),
        ({"eval": "benchmark", "eval_counts": 3}, ["eval_counts is for eval=heldout"]),
        ({"seed": "x"}, ["prompts.options.seed='x'"]),
    ],
)
def test_bad_options_name_the_option(options: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        _load(**options)
    for word in words:
        assert word in str(info.value)


def test_geneval_jsonl_file_loads_with_its_metadata(tmp_path: Path) -> None:
    rows = benchmark_rows()
    path = write_jsonl(rows, tmp_path / "evaluation_metadata.jsonl")
    train, evaluation = load_prompts(PromptsConfig(source="file", train_file=str(path), eval_file=str(path)))
    assert train.prompts == [r["prompt"] for r in rows]
    assert train.metadata == [{k: v for k, v in r.items() if k != "prompt"} for r in rows]
    assert [GenEvalRow.from_metadata(m).to_metadata() for m in evaluation.metadata] == evaluation.metadata


def test_recipe_group_composes() -> None:
    cfg = load_run_config("sd3_tiny_flow_grpo", ["prompts=geneval", "prompts.options.eval=benchmark"])
    assert cfg.prompts.source == "geneval"
    assert cfg.prompts.options == {"seed": 0, "tags": None, "counts": None, "eval": "benchmark", "eval_counts": None}
    train, evaluation = load_prompts(cfg.prompts)
    assert len(evaluation) == 553 and len(train) == sum(DEFAULT_COUNTS.values()) - DEFAULT_COUNTS["single_object"]
