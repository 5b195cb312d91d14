"""Evaluation decoupled from training: eval.num_steps / eval.guidance / eval.resolution sample like the diffusers
pipeline with those settings and leave training sampling untouched; eval.prompts fixes the evaluation prompt set;
backbones that cannot change a setting are refused before any model loads; alignkit eval writes the per-category
table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from PIL import Image

from alignkit.cli import main
from alignkit.compose import load_run_config
from alignkit.config import ConfigError, EvalConfig
from alignkit.distributed import Shard
from alignkit.evaluation import evaluate, evaluate_heldout, evaluation_prompts, summarize
from alignkit.interfaces import EvalSettings
from alignkit.modalities.image.flux import FluxSampler
from alignkit.modalities.image.sd3 import SD3Sampler
from alignkit.modalities.image.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline
from alignkit.prompts import PromptSet
from alignkit.reward_set import RewardSet, RewardTable
from alignkit.rollout import sample_generator

PROMPTS = PromptSet(["a red circle", "two blue squares"])
JPEG = RewardSet.from_config(load_run_config("sd3_tiny_flow_grpo").reward, "sum_then_normalize")


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd3")
    build_tiny_sd3_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flux")
    build_tiny_flux_pipeline(seed=0).save_pretrained(folder, safe_serialization=True)
    return folder


def _sampler(cls: type, folder: Path, recipe: str, *overrides: str):
    cfg = load_run_config(recipe, [f"backbone.pretrained={folder}", "backbone.max_sequence_length=16", *overrides])
    return cls.from_config(cfg.backbone, step_kind="flow_grpo", noise_level=0.7, device="cpu")


def _eval(sampler, settings: EvalSettings | None = None):
    return evaluate(sampler, JPEG, PROMPTS, seed=7, seeds_per_prompt=1, batch_size=2, settings=settings)


def _noise(sampler, n: int) -> torch.Tensor:
    """The initial noise evaluate() draws for prompt i, seed 0 (iteration 0)."""
    return sampler.initial_state([sample_generator(7, 0, i, 0) for i in range(n)])


def test_sd3_evaluation_settings_sample_as_the_pipeline_with_them(sd3_folder: Path) -> None:
    sampler = _sampler(SD3Sampler, sd3_folder, "sd3_tiny_flow_grpo", "backbone.num_steps=3")
    before = _eval(sampler)
    settings = EvalSettings(num_steps=5, guidance=2.0, height=48, width=40)
    rollout, _ = _eval(sampler, settings)
    assert rollout.num_steps == 5 and rollout.samples.shape == (2, 3, 48, 40)
    assert rollout.nfe == 2 * 5
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_folder, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    with sampler.eval_settings(**settings.given()):
        latents = _noise(sampler, 2)
    assert latents.shape[-2:] == (48 // pipe.vae_scale_factor, 40 // pipe.vae_scale_factor)
    ref = pipe(prompt=PROMPTS.prompts, latents=latents, num_inference_steps=5, guidance_scale=2.0, height=48,
               width=40, max_sequence_length=16, output_type="pt").images
    torch.testing.assert_close(rollout.samples, ref, rtol=1e-5, atol=1e-5)
    # leaving the context restores the training settings exactly
    after = _eval(sampler)
    assert sampler.num_steps == 3 and sampler.cfg.guidance_scale == 4.5 and sampler.cfg.height == 32
    assert torch.equal(after[0].samples, before[0].samples) and after[0].nfe == before[0].nfe == 2 * 3


def test_flux_evaluation_resolution_and_steps_rebuild_the_shifted_schedule(flux_folder: Path) -> None:
    sampler = _sampler(FluxSampler, flux_folder, "flux_tiny_flow_grpo", "backbone.num_steps=3")
    sigmas = sampler.sigmas.clone()
    settings = EvalSettings(num_steps=4, guidance=5.0, height=48, width=48)
    rollout, _ = _eval(sampler, settings)
    pipe = FluxPipeline.from_pretrained(flux_folder)
    pipe.set_progress_bar_config(disable=True)
    with sampler.eval_settings(**settings.given()):
        latents = _noise(sampler, 2)
        assert not torch.equal(sampler.sigmas[:-1], torch.linspace(1, 0.25, 4))  # resolution-dependent shift
    ref = pipe(prompt=PROMPTS.prompts, latents=latents, num_inference_steps=4, guidance_scale=5.0, height=48,
               width=48, max_sequence_length=16, output_type="pt").images
    assert rollout.samples.shape == (2, 3, 48, 48)
    torch.testing.assert_close(rollout.samples, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(sampler.sigmas, sigmas)


def test_heldout_evaluation_uses_the_eval_settings(sd3_folder: Path, tmp_path: Path) -> None:
    sampler = _sampler(SD3Sampler, sd3_folder, "sd3_tiny_flow_grpo", "backbone.num_steps=3")
    e = EvalConfig(num_prompts=2, batch_size=2, seed=7, num_steps=5, guidance=2.0, resolution=[48, 40])
    out = evaluate_heldout(sampler, JPEG, PROMPTS, e, Shard(0, 1), preview=tmp_path / "p.png")
    _, table = _eval(sampler, EvalSettings.from_config(e))
    assert out == {"eval/jpeg_compressibility": pytest.approx(float(table.raw["jpeg_compressibility"].mean()))}
    plain = evaluate_heldout(sampler, JPEG, PROMPTS, EvalConfig(num_prompts=2, batch_size=2, seed=7), Shard(0, 1))
    assert plain["eval/jpeg_compressibility"] == pytest.approx(float(_eval(sampler)[1].raw["jpeg_compressibility"]
                                                                     .mean()))
    assert plain != out


@pytest.mark.parametrize(("recipe", "overrides", "words"), [
    ("arithmetic_tempflow_grpo", ["eval.guidance=2"],
     ["eval.guidance=2.0", "MaskedLMSampler backbone cannot sample", "remove eval.guidance",
      "supports: eval.num_steps"]),
    ("stable_audio_tiny_tempflow_grpo", ["eval.resolution=[64,64]"],
     ["eval.resolution=[64, 64]", "StableAudio3Sampler", "It supports: eval.guidance, eval.num_steps"]),
    ("wan_tiny_tempflow_grpo", ["eval.resolution=[40,40]"],
     ["eval.resolution (height)=40: must be a multiple of 16", "eval.resolution (width)=40"]),
    ("sd3_tiny_flow_grpo", ["eval.resolution=[30,32]"], ["eval.resolution=[30, 32]", "multiple of 8"]),
    ("sd3_tiny_flow_grpo", ["eval.resolution=[32,32,32]"], ["eval.resolution=[32, 32, 32]", "[height, width]"]),
    ("sd3_tiny_flow_grpo", ["eval.num_steps=0", "eval.guidance=-1"], ["eval.num_steps=0", "eval.guidance=-1.0"]),
    ("sd3_tiny_flow_grpo", ["eval.prompts=no/such.txt"], ["eval.prompts='no/such.txt'", "no such file"]),
    ("sd3_tiny_flow_grpo", ["eval.prompts=genevl"], ["eval.prompts='genevl'", "geneval", "shapes"]),
    ("sd3_tiny_flow_grpo", ["eval.prompts=list"], ["eval.prompts='list'", "path itself"]),
    ("sd3_tiny_flow_grpo", ["eval.prompt_options={eval: benchmark}"], ["eval.prompt_options", "eval.prompts is null"]),
])
def test_bad_evaluation_settings_are_refused_before_any_model_loads(recipe: str, overrides: list[str],
                                                                     words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config(recipe, overrides)
    msg = str(info.value)
    for word in words:
        assert word in msg, msg


def test_supported_settings_pass_for_every_flow_modality() -> None:
    load_run_config("stable_audio_tiny_tempflow_grpo", ["eval.num_steps=6", "eval.guidance=1.0"])
    load_run_config("wan_tiny_tempflow_grpo", ["eval.num_steps=8", "eval.resolution=[48,64]"])
    cfg = load_run_config("sd3_tiny_flow_grpo", ["eval.num_steps=40", "eval.resolution=[64]"])
    assert EvalSettings.from_config(cfg.eval) == EvalSettings(num_steps=40, height=64, width=64)
    assert EvalSettings.from_config(cfg.eval).describe(cfg.backbone) == {
        "num_steps": 40, "guidance": 4.5, "height": 64, "width": 64}


def test_eval_prompts_from_a_file_or_a_source(tmp_path: Path) -> None:
    heldout = PromptSet(["held out"])
    assert evaluation_prompts(EvalConfig(), heldout) is heldout
    f = tmp_path / "fixed.jsonl"
    f.write_text('{"prompt": "a kite", "tag": "single_object"}\n{"prompt": "two cups", "tag": "counting"}\n')
    fixed = evaluation_prompts(EvalConfig(prompts=str(f)), heldout)
    assert fixed.prompts == ["a kite", "two cups"] and fixed.metadata[1] == {"tag": "counting"}
    bench = evaluation_prompts(EvalConfig(prompts="geneval", prompt_options={"eval": "benchmark"}), heldout)
    assert len(bench) == 553 and {m["tag"] for m in bench.metadata} == {
        "single_object", "two_object", "counting", "colors", "position", "color_attr"}
    blank = tmp_path / "blank.txt"
    blank.write_text("a\n\nb\n")
    with pytest.raises(ValueError, match=r"eval\.prompts='.*blank\.txt': line 2 is blank"):
        evaluation_prompts(EvalConfig(prompts=str(blank)), heldout)
    with pytest.raises(ValueError, match=r"eval\.prompts='geneval' \(its options are eval\.prompt_options"):
        evaluation_prompts(EvalConfig(prompts="geneval", prompt_options={"eval": "test"}), heldout)


def test_the_trainer_evaluates_the_fixed_prompt_set(tmp_path: Path) -> None:
    from alignkit.trainer import Trainer

    f = tmp_path / "fixed.txt"
    f.write_text("a lighthouse\na violin\n")
    cfg = load_run_config("sd3_tiny_flow_grpo", [f"output_dir={tmp_path / 'run'}", f"eval.prompts={f}"])
    trainer = Trainer(cfg, tensorboard=False)
    assert trainer.eval_prompts.prompts == ["a lighthouse", "a violin"]
    assert trainer.train_prompts.prompts[0] == "a red apple on a table"  # training prompts unchanged


def test_summary_means_per_category_and_overall() -> None:
    raw = torch.tensor([1.0, 0.0, 1.0, 1.0, float("nan"), 0.5])
    meta = [{"tag": "a"}, {"tag": "a"}, {"tag": "a"}, {"category": "b"}, {"category": "b"}, {}]
    s = summarize(RewardTable(raw={"r": raw}, invalid={"r": 1}), meta, ["p"] * 6)
    assert s.categories == ["a", "b", "(none)"] and s.counts == {"a": 3, "b": 2, "(none)": 1}
    assert s.by_category["a"]["r"] == pytest.approx(2 / 3) and s.by_category["b"]["r"] == 1.0
    assert s.overall["r"] == pytest.approx((2 / 3 + 1.0 + 0.5) / 3)  # each category weighs the same
    assert s.mean["r"] == pytest.approx(3.5 / 5) and s.prompts == 1
    plain = summarize(RewardTable(raw={"r": raw[:2]}, invalid={"r": 0}), [{}, {}])
    assert plain.categories == [] and plain.overall == plain.mean == {"r": 0.5}


def test_eval_command_writes_the_paper_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "bench.jsonl"
    rows = [("a kite", "single_object"), ("a bus", "single_object"), ("two cups", "counting"),
            ("a green bus", "colors"), ("three cups", "counting")]
    prompts.write_text("".join(json.dumps({"prompt": p, "tag": t}) + "\n" for p, t in rows))
    out = tmp_path / "run"
    code = main(["eval", "sd3_tiny_flow_grpo", f"output_dir={out}", "backbone.num_steps=3", f"eval.prompts={prompts}",
                 "eval.num_prompts=5", "eval.seeds_per_prompt=2", "eval.batch_size=10", "eval.num_steps=4",
                 "eval.resolution=[40,48]", "+eval.rewards.big={fn: jpeg_incompressibility}"])
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "eval" / "summary.json").read_text())
    table = (out / "eval" / "table.md").read_text()
    samples = [json.loads(line) for line in (out / "eval" / "rewards.jsonl").read_text().splitlines()]
    assert len(samples) == 10 and {s["category"] for s in samples} == {"single_object", "counting", "colors"}
    assert list(summary["categories"]) == ["single_object", "counting", "colors"]  # order of first appearance
    assert summary["counts"] == {"samples": 10, "prompts": 5,
                                 "categories": {"single_object": 4, "counting": 4, "colors": 2}}
    for name in ("jpeg_compressibility", "big"):
        per = {c: sum(s[name] for s in samples if s["category"] == c) / n
               for c, n in summary["counts"]["categories"].items()}
        for c, v in per.items():
            assert summary["categories"][c][name] == pytest.approx(v, rel=1e-5)
        assert summary["overall"][name] == pytest.approx(sum(per.values()) / 3, rel=1e-5)
        assert summary["mean"][name] == pytest.approx(sum(s[name] for s in samples) / 10, rel=1e-5)
        assert math.isfinite(summary["mean"][name])
    assert summary["info"]["settings"] == {"num_steps": 4, "guidance": 4.5, "height": 40, "width": 48}
    assert table.splitlines()[0] == ("| reward | overall | mean (n=10) | single_object (n=4) | counting (n=4) | "
                                     "colors (n=2) |")
    assert "| `big` |" in table and "sampling: num_steps=4, guidance=4.5, height=40, width=48" in table
    assert table in printed  # the command prints the table it saved
    with Image.open(out / "eval" / "grid.png") as grid:
        assert grid.height >= 40  # a grid of 40 x 48 samples
