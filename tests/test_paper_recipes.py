"""The papers' experiments as recipes: SD3.5-Medium x {GenEval, PickScore, OCR} and FLUX.1-dev x {PickScore,
HPSv2.1}, each for TempFlow-GRPO and Flow-GRPO, and LLaDA-8B-Instruct on GSM8K. Composed and validated without
downloading anything; the settings are the papers'; the prompt files the user gives are required, and read, before
any model loads; each header's cost estimate matches the recipe's own schedule."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from alignkit.cli import main
from alignkit.compose import describe, list_recipes, load_run_config, recipes_dir
from alignkit.plans import build_plan
from alignkit.prompts import load_prompts

PAPER = {
    # name: (backbone, reward, beta, guidance)
    "sd35m_geneval_tempflow_grpo": ("sd3", "geneval", 0.004, 4.5),
    "sd35m_geneval_flow_grpo": ("sd3", "geneval", 0.004, 4.5),
    "sd35m_pickscore_tempflow_grpo": ("sd3", "pickscore", 0.001, 4.5),
    "sd35m_pickscore_flow_grpo": ("sd3", "pickscore", 0.001, 4.5),
    "sd35m_ocr_tempflow_grpo": ("sd3", "ocr", 0.004, 4.5),
    "sd35m_ocr_flow_grpo": ("sd3", "ocr", 0.004, 4.5),
    "flux_dev_pickscore_tempflow_grpo": ("flux", "pickscore", 0.001, 3.5),
    "flux_dev_pickscore_flow_grpo": ("flux", "pickscore", 0.001, 3.5),
    "flux_dev_hpsv2_tempflow_grpo": ("flux", "hpsv2", 0.001, 3.5),
    "flux_dev_hpsv2_flow_grpo": ("flux", "hpsv2", 0.001, 3.5),
}
USER_FILES = [n for n, (_, reward, _, _) in PAPER.items() if reward != "geneval"]


def _header(name: str) -> str:
    lines = (recipes_dir() / f"{name}.yaml").read_text().splitlines()
    return " ".join(line[2:] for line in lines if line.startswith("# "))


def _nfe_per_prompt(name: str) -> int:
    cfg = load_run_config(name)
    plan = build_plan(cfg.algo.plan.name, cfg.algo.plan.options)
    return plan.schedule(cfg.backbone.num_steps, 0, torch.Generator()).nfe_per_seed(cfg.backbone.num_steps) * \
        cfg.algo.num_seeds


def test_every_paper_recipe_is_found_by_the_recipe_listing() -> None:
    assert set(PAPER) | {"llada_8b_gsm8k_tempflow_grpo"} <= set(list_recipes())


@pytest.mark.parametrize("name", PAPER)
def test_papers_settings(name: str) -> None:
    backbone, reward, beta, guidance = PAPER[name]
    cfg = load_run_config(name)  # composes and validates; nothing loads or downloads
    assert cfg.backbone.name == backbone and cfg.backbone.dtype == "bfloat16"
    assert cfg.backbone.num_steps == 10 and cfg.eval.num_steps == 40
    assert cfg.backbone.guidance_scale == guidance and cfg.eval.guidance is None  # evaluation at the training guidance
    assert (cfg.backbone.height, cfg.backbone.width) == (512, 512) and cfg.eval.resolution is None
    assert (cfg.backbone.lora.rank, cfg.backbone.lora.alpha) == (32, 64.0)
    assert cfg.algo.noise_level == 0.7 and cfg.algo.objective.beta == beta
    assert cfg.train.learning_rate == 3e-4 and cfg.train.ema.enabled and cfg.train.ema.decay == 0.9
    assert [t.fn for t in cfg.reward.values()] == [reward]
    if "tempflow" in name:
        assert cfg.algo.num_seeds == 4 and cfg.algo.plan.name == "branch"
        assert cfg.algo.plan.options == {"children": 6, "select": "all"}
        assert cfg.algo.credit.group_by == "seed" and cfg.algo.credit.noise_aware
    else:
        assert cfg.algo.num_seeds == 24 and cfg.algo.plan.name == "all_stochastic"
        assert cfg.algo.credit.group_by == "prompt" and not cfg.algo.credit.noise_aware
    # two optimizer steps per epoch over the epoch's transitions (48 prompts x 24 samples x 9 trained steps)
    per_step = cfg.train.train_batch_size * cfg.train.gradient_accumulation_steps
    assert cfg.train.prompts_per_epoch == 48 and 48 * 24 * 9 == 2 * per_step
    assert cfg.eval.before_after and cfg.eval.every > 0


@pytest.mark.parametrize("name", [*PAPER, "llada_8b_gsm8k_tempflow_grpo"])
def test_headers_give_command_memory_and_time_consistent_with_the_recipe(name: str) -> None:
    first = (recipes_dir() / f"{name}.yaml").read_text().splitlines()[0]
    assert first.startswith(f"# alignkit train {name}")
    header = _header(name)
    assert "GPU memory, estimated: about" in header and "Time, estimated (no GPU was available" in header
    assert "assumed 40%" in header and "H100" in header
    assert describe(recipes_dir() / f"{name}.yaml")  # alignkit list shows a one-line description
    if name in PAPER:  # the model evaluations the estimate counts are the recipe's own
        assert f"{_nfe_per_prompt(name)} model evaluations" in header


def test_geneval_recipes_train_on_generated_prompts_and_hold_out_the_benchmark() -> None:
    cfg = load_run_config("sd35m_geneval_tempflow_grpo")
    train, held_out = load_prompts(cfg.prompts)
    assert len(held_out) == cfg.eval.num_prompts == 553 and cfg.eval.seeds_per_prompt == 4
    assert not set(train.prompts) & set(held_out.prompts)
    assert {m["tag"] for m in held_out.metadata} == {"single_object", "two_object", "counting", "colors", "position",
                                                     "color_attr"}
    assert cfg.eval.rewards["geneval_correct"].kwargs == {"mode": "correct"}


@pytest.mark.parametrize("name", USER_FILES)
def test_prompt_files_are_required_and_read_before_any_model(name: str, tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    # mixed precision "no": accelerate's process-wide state may already hold it from an earlier test
    for command in (["train", "train.mixed_precision=no"], ["eval"]):
        caplog.clear()
        assert main([command[0], name, f"output_dir={out}", *command[1:]]) == 2
        assert "prompts.train_file is required" in caplog.text and "Traceback" not in caplog.text
        assert not out.exists()  # refused before the run folder, the models or the rewards
    train_file, eval_file = tmp_path / "train.txt", tmp_path / "test.jsonl"
    train_file.write_text('a sign that says "open"\na red bicycle\n')
    eval_file.write_text(json.dumps({"prompt": "a cat", "category": "photo"}) + "\n")
    cfg = load_run_config(name, [f"prompts.train_file={train_file}", f"prompts.eval_file={eval_file}"])
    train, held_out = load_prompts(cfg.prompts)
    assert train.prompts == ['a sign that says "open"', "a red bicycle"]
    assert held_out.prompts == ["a cat"] and held_out.metadata == [{"category": "photo"}]


def test_llada_recipe_on_a_local_gsm8k_folder(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("datasets")
    cfg = load_run_config("llada_8b_gsm8k_tempflow_grpo")
    b = cfg.backbone
    assert (b.name, b.pretrained, b.trust_remote_code) == ("masked_lm", "GSAI-ML/LLaDA-8B-Instruct", True)
    assert b.options["chat_template"] is True and b.options["gen_length"] == 256
    assert [t.fn for t in cfg.reward.values()] == ["numeric_match"]
    # the dataset is required before any model loads
    assert main(["eval", "llada_8b_gsm8k_tempflow_grpo", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "prompts.options.path is required" in caplog.text and not (tmp_path / "run").exists()
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    for split, rows in (("train", [("Tom has 3 apples and buys 4. How many?", "3 + 4 = 7\n#### 7")]),
                        ("test", [("A box holds 12 eggs. How many in 2 boxes?", "12 * 2 = 24\n#### 24")])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                                       for q, a in rows))
    cfg = load_run_config("llada_8b_gsm8k_tempflow_grpo", [f"prompts.options.path={folder}"])
    train, held_out = load_prompts(cfg.prompts)
    assert train.prompts == ["Tom has 3 apples and buys 4. How many?"]
    assert held_out.metadata == [{"answer": "12 * 2 = 24\n#### 24"}]
    from alignkit.reward_set import RewardSet

    scores = RewardSet.from_config(cfg.reward, "sum_then_normalize").score(
        ["Two boxes hold 12 * 2 = 24 eggs. The answer is 24.", "It is 25."], held_out.prompts * 2,
        held_out.metadata * 2)
    assert scores.raw["numeric"].tolist() == [1.0, 0.0]


def test_headers_cite_only_existing_recipes_and_paths() -> None:
    for name in [*PAPER, "llada_8b_gsm8k_tempflow_grpo"]:
        header = _header(name)
        for cited in re.findall(r"alignkit (?:train|eval) ([a-z0-9_]+)", header):
            assert cited == name
        for path in re.findall(r"(?<![\w./-])((?:recipes|bench)/[\w./-]*\w)", header):
            assert (recipes_dir().parent / path).exists(), path
