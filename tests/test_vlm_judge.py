"""The VLM judge on a tiny random LLaVA saved and loaded back through AutoModelForImageTextToText / AutoProcessor:
scores against a direct single-image computation, yes/no and score-token modes, batching, bad settings."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from alignkit.compose import load_run_config
from alignkit.errors import ModelLoadError
from alignkit.reward_set import RewardSet
from alignkit.rewards.common import to_pil
from alignkit.rewards.vlm_judge import SCORE_QUESTION, SCORE_TOKENS, YES_NO_QUESTION, VLMJudge, save_tiny_llava

PROMPTS = ["a photo of a cat", "two red apples on a long wooden table next to a blue car", "a dog"]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny_llava") / "vlm")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(len(PROMPTS), 3, 20, 24, generator=torch.Generator().manual_seed(0))


def _direct(folder: Path, images: torch.Tensor, prompts: list[str], question: str, answers: list[list[str]],
            values: list[float], prefix: str = "") -> list[float]:
    """One image at a time, no padding: the last position's softmax, summed per answer over its vocabulary
    entries, renormalised, expected value."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    out = []
    for image, prompt in zip(to_pil(images), prompts):
        text = f"USER: <image>\n{question.replace('{prompt}', prompt)}\nASSISTANT:{prefix}"
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        with torch.no_grad():
            p = model(**inputs).logits[0, -1].softmax(-1)
        mass = torch.stack([p[processor.tokenizer.convert_tokens_to_ids(a)].sum() for a in answers])
        out.append(float((mass / mass.sum()) @ torch.tensor(values, dtype=torch.float32)))
    return out


def test_yes_no_probability_equals_a_direct_computation(vlm_dir: Path, images: torch.Tensor) -> None:
    judge = VLMJudge(str(vlm_dir), device="cpu", batch_size=2)  # 3 prompts of different lengths: padded batches
    assert judge.texts(["a cat"]) == [f"USER: <image>\n{YES_NO_QUESTION.replace('{prompt}', 'a cat')}\nASSISTANT:"]
    got = judge(images, PROMPTS, [{}] * 3)
    ref = _direct(vlm_dir, images, PROMPTS, YES_NO_QUESTION, [["Yes", "ĠYes"], ["No", "ĠNo"]], [1.0, 0.0])
    assert got == pytest.approx(ref, abs=1e-5)
    assert all(0 < s < 1 for s in got)
    one_by_one = VLMJudge(str(vlm_dir), device="cpu", batch_size=1)(images, PROMPTS, [{}] * 3)
    assert one_by_one == pytest.approx(got, abs=1e-5)


def test_expected_score_over_score_tokens_with_a_prefix(vlm_dir: Path, images: torch.Tensor) -> None:
    judge = VLMJudge(str(vlm_dir), device="cpu", question=SCORE_QUESTION, answer_tokens=list(SCORE_TOKENS),
                     answer_prefix="Final Score: ", system="You are a strict judge.")
    assert judge.texts(["x"])[0].startswith("SYSTEM: You are a strict judge.\nUSER: <image>\n")
    assert judge.texts(["x"])[0].endswith("Text Caption: [x]\nASSISTANT:Final Score: ")
    nosystem = VLMJudge(str(vlm_dir), device="cpu", question=SCORE_QUESTION, answer_tokens=list(SCORE_TOKENS),
                        answer_prefix="Final Score: ")
    got = nosystem(images, PROMPTS, [{}] * 3)
    answers = [[t, "Ġ" + t] for t in SCORE_TOKENS]
    ref = _direct(vlm_dir, images, PROMPTS, SCORE_QUESTION, answers, [1, 2, 3, 4, 5], "Final Score: ")
    assert got == pytest.approx(ref, abs=1e-5) and all(1 < s < 5 for s in got)
    # custom values: the same distribution mapped to [0, 1]
    scaled = VLMJudge(str(vlm_dir), device="cpu", question=SCORE_QUESTION, answer_tokens=list(SCORE_TOKENS),
                      answer_values=[0, 0.25, 0.5, 0.75, 1], answer_prefix="Final Score: ")(images, PROMPTS, [{}] * 3)
    assert scaled == pytest.approx([(s - 1) / 4 for s in got], abs=1e-5)


def test_non_finite_images_score_none(vlm_dir: Path, images: torch.Tensor) -> None:
    bad = images.clone()
    bad[1, 0, 0, 0] = float("inf")
    judge = VLMJudge(str(vlm_dir), device="cpu")
    out = judge(bad, PROMPTS, [{}] * 3)
    assert out[1] is None and out[0] == pytest.approx(judge(images[:1], PROMPTS[:1], [{}])[0], abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"answer_tokens": ["Yes", "Perhaps"]}, ["answer_tokens[1]='Perhaps' is not one token", "keeps whole"]),
        ({"answer_tokens": ["Yes", "ĠYes"]}, ["answer_tokens[0]='Yes' and answer_tokens[1]='ĠYes' share"]),
        ({"answer_tokens": [True, False]}, ["answer_tokens[0]=True", "quote them"]),
        ({"answer_tokens": ["Yes", "Yes"]}, ["repeats an answer"]),
        ({"answer_tokens": ["Yes"]}, ["at least two answers"]),
        ({"answer_tokens": ["good", "ok", "bad"]}, ["answer_values is required"]),
        ({"answer_tokens": ["1", "2"], "answer_values": [1.0]}, ["answer_values=[1.0]", "one value per answer"]),
        ({"answer_values": [1.0, "high"]}, ["answer_values[1]='high'"]),
        ({"question": "Is this good?"}, ["question='Is this good?' has no '{prompt}'"]),
        ({"batch_size": 0}, ["batch_size=0"]),
    ],
)
def test_bad_settings_name_the_setting(vlm_dir: Path, kwargs: dict, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        VLMJudge(str(vlm_dir), device="cpu", **kwargs)
    for word in words:
        assert word in str(info.value)


def test_missing_model_and_missing_chat_template(vlm_dir: Path, tmp_path: Path, images: torch.Tensor) -> None:
    with pytest.raises(ModelLoadError, match="vlm_judge model='/no/such/vlm' cannot be loaded"):
        VLMJudge("/no/such/vlm", device="cpu")
    bare = tmp_path / "bare"
    shutil.copytree(vlm_dir, bare)
    (bare / "chat_template.jinja").unlink()
    with pytest.raises(ValueError, match="has no chat template; pass chat_template"):
        VLMJudge(str(bare), device="cpu")
    template = (vlm_dir / "chat_template.jinja").read_text()
    judge = VLMJudge(str(bare), device="cpu", chat_template=template)
    assert judge(images, PROMPTS, [{}] * 3) == pytest.approx(VLMJudge(str(vlm_dir), device="cpu")(
        images, PROMPTS, [{}] * 3), abs=1e-6)


@pytest.mark.parametrize("group", ["vlm_judge", "unifiedreward"])
def test_recipe_groups_build_the_judge(vlm_dir: Path, images: torch.Tensor, group: str) -> None:
    cfg = load_run_config("sd3_tiny_flow_grpo", [f"reward={group}", f"reward.{group}.kwargs.model={vlm_dir}",
                                                 f"reward.{group}.kwargs.dtype=float32",
                                                 f"reward.{group}.kwargs.device=cpu"])
    table = RewardSet.from_config(cfg.reward, cfg.algo.reward_aggregation).score(images, PROMPTS, [{}] * 3)
    lo, hi = (0, 1) if group == "vlm_judge" else (1, 5)
    assert all(lo < v < hi for v in table.raw[group].tolist())
