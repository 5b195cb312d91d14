"""Tones audio world (captions, splits, renders) and the ToneEval reward on clean renders, wrong captions, noise and
silence, with hand-built clips whose credits are worked out by hand."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest
import torch

from alignkit.config import PromptsConfig
from alignkit.registry import REWARDS
from alignkit.reward_set import RewardSet, RewardTerm
from alignkit.worlds.common import split_of
from alignkit.worlds.tones.prompts import tones_source
from alignkit.worlds.tones.toneeval import CREDITS, ToneConfig, ToneEval, detect_tones, summarize, toneeval_details
from alignkit.worlds.tones.world import (
    CATEGORIES,
    DURATIONS,
    MARGIN,
    MIN_GAP,
    NUM_SAMPLES,
    PITCHES,
    SAMPLE_RATE,
    SHAPES,
    VOCAB_WORDS,
    Tone,
    ToneSpec,
    all_specs,
    layout_tones,
    parse_caption,
    prompt_set,
    render_batch,
    synthesize,
)

OTHER = {"low": "high", "mid": "low", "high": "mid", "beep": "rising", "rising": "falling", "falling": "beep",
         "short": "long", "long": "short"}


def _clip(*tones: Tone) -> torch.Tensor:
    """``[1, 1, T]`` clip of hand-placed tones."""
    return torch.from_numpy(synthesize(list(tones)))[None, None]


def _tone(start: float, frequency: float, shape: str = "beep", length: float = 0.1, amplitude: float = 0.5) -> Tone:
    return Tone(start=start, length=length, frequency=frequency, shape=shape, amplitude=amplitude, phase=0.3)


# --- the world -------------------------------------------------------------------------------------------------------


def test_grammar_round_trips_every_caption_and_splits_them_by_hash() -> None:
    specs = all_specs()
    assert len(specs) == 81 and len({s.caption() for s in specs}) == 81
    assert sum(s.category == "beep" for s in specs) == 27 and sum(s.category == "chirp" for s in specs) == 54
    for s in specs:
        assert parse_caption(s.caption()) == s
        assert ToneSpec.from_metadata(s.to_metadata()) == s
        assert set(s.caption().split()) <= set(VOCAB_WORDS)
    assert parse_caption("Two high beeps.") == ToneSpec(2, "high", "beep")
    assert parse_caption("an long low rising chirp") == ToneSpec(1, "low", "rising", "long")
    assert parse_caption("a rising chirp") is None and parse_caption("two red circles") is None
    assert parse_caption("three short mid falling chirps") == ToneSpec(3, "mid", "falling", "short")
    held = [s.caption() for s in specs if split_of(s.caption()) == "heldout"]
    assert len(held) == 10 and "two low beeps" in held  # the worlds' shared hash rule, as the docstring says


def test_spec_rejects_bad_values_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"count=4 .*\(1, 2, 3\)"):
        ToneSpec(4, "low", "beep")
    with pytest.raises(ValueError, match=r"pitch='loud' .*'low', 'mid', 'high'"):
        ToneSpec(1, "loud", "beep")
    with pytest.raises(ValueError, match=r"shape='wobbly'"):
        ToneSpec(1, "low", "wobbly")
    with pytest.raises(ValueError, match=r"duration='medium'"):
        ToneSpec(1, "low", "beep", "medium")
    with pytest.raises(ValueError, match="world 'shapes'"):
        ToneSpec.from_metadata({"world": "shapes", "category": "single", "objects": []})
    with pytest.raises(ValueError, match="category 'beep' does not match shape 'rising'"):
        ToneSpec.from_metadata({"category": "beep", "count": 1, "pitch": "low", "shape": "rising"})


def test_prompt_source_keeps_held_out_captions_out_of_training() -> None:
    train, heldout = tones_source(PromptsConfig(source="tones", options={"train_size": 200, "eval_size": 40}))
    assert len(train.prompts) == 200 and len(heldout.prompts) == 40
    assert {split_of(p) for p in train.prompts} == {"train"} and {split_of(p) for p in heldout.prompts} == {"heldout"}
    assert all(ToneSpec.from_metadata(m).caption() == p for p, m in zip(heldout.prompts, heldout.metadata))
    beeps, _ = tones_source(PromptsConfig(source="tones", options={"train_size": 30, "categories": ["beep"]}))
    assert all(m["category"] == "beep" for m in beeps.metadata)
    with pytest.raises(ValueError, match=r"categories=\['hum'\]: choose from \['beep', 'chirp'\]"):
        tones_source(PromptsConfig(source="tones", options={"categories": ["hum"]}))
    with pytest.raises(ValueError, match="unknown keys \\['size'\\]"):
        tones_source(PromptsConfig(source="tones", options={"size": 3}))
    assert prompt_set(20, 5) == prompt_set(20, 5) and prompt_set(20, 5) != prompt_set(20, 6)


def test_renders_follow_the_layout_rules_and_are_deterministic() -> None:
    rng = random.Random(0)
    for spec in all_specs():
        tones = layout_tones(spec, rng)
        assert len(tones) == spec.count and {t.shape for t in tones} == {spec.shape}
        assert tones[0].start >= MARGIN - 1e-9 and tones[-1].start + tones[-1].length <= 1.0 - MARGIN + 1e-9
        for a, b in itertools.pairwise(tones):
            assert b.start - (a.start + a.length) >= MIN_GAP - 1e-9
        for t in tones:
            assert abs(math.log2(t.frequency / PITCHES[spec.pitch])) <= 1 / 12 + 1e-9
            if spec.duration:
                assert 0.9 * DURATIONS[spec.duration] - 1e-9 <= t.length <= 1.1 * DURATIONS[spec.duration] + 1e-9
    specs = prompt_set(8, 0)
    x = render_batch(specs, 7)
    assert x.shape == (8, 1, NUM_SAMPLES) and x.dtype == torch.float32 and x.abs().max() <= 0.6
    assert torch.equal(x, render_batch(specs, 7)) and not torch.equal(x, render_batch(specs, 8))
    assert torch.equal(render_batch(specs, 7, channels=2)[:, 1], x[:, 0])


# --- ToneEval ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_renders_score_one_in_every_category(seed: int) -> None:
    specs = all_specs()
    details = toneeval_details(render_batch(specs, seed), [s.to_metadata() for s in specs])
    assert all(d["strict"] == 1.0 and d["partial"] == 1.0 for d in details), [
        (d["caption"], d["credits"]) for d in details if d["strict"] < 1]
    summary = summarize(details)
    assert summary["strict"] == summary["partial"] == 1.0 and summary["n"] == 81
    assert {f"{c}/{k}" for c in CATEGORIES for k in CREDITS} <= set(summary)


def test_a_hand_placed_beep_is_measured_as_placed() -> None:
    """A 0.1 s 600 Hz beep at 0.3 s: one tone, 600 Hz, no sweep, about 0.1 s long (+ one 10 ms window of
    envelope spread), short; an exponential chirp 1200 Hz x 2^(+-1/2) sweeps about one octave up."""
    (tone,), = detect_tones(_clip(_tone(0.3, 600.0)))
    assert tone.pitch == "mid" and abs(tone.frequency - 600.0) < 3.0 and abs(tone.sweep) < 0.05
    assert tone.shape == "beep" and tone.duration == "short" and 0.085 <= tone.end - tone.start <= 0.115
    assert 0.29 <= tone.start <= 0.31 and tone.tonality > 0.95
    (chirp,), = detect_tones(_clip(_tone(0.2, 1200.0, "rising", length=0.22)))
    assert chirp.pitch == "high" and chirp.shape == "rising" and chirp.duration == "long"
    assert 0.85 < chirp.sweep < 1.1 and abs(math.log2(chirp.frequency / 1200.0)) < 0.05


def test_wrong_captions_lose_exactly_the_wrong_credits() -> None:
    """The clip is one short mid beep. Worked by hand (n = 1 detected tone, k = the caption's count):
    "two short mid beeps": count 0, pitch = shape = duration = 1/max(1, 2) -> partial 0.375, strict 0;
    "a short high beep": pitch 0 -> partial 0.75; "a mid rising chirp" (no duration): shape 0 -> 2/3."""
    clip = _clip(_tone(0.3, 600.0))
    cases = {
        ToneSpec(1, "mid", "beep", "short"): {"count": 1.0, "pitch": 1.0, "shape": 1.0, "duration": 1.0},
        ToneSpec(2, "mid", "beep", "short"): {"count": 0.0, "pitch": 0.5, "shape": 0.5, "duration": 0.5},
        ToneSpec(1, "high", "beep", "short"): {"count": 1.0, "pitch": 0.0, "shape": 1.0, "duration": 1.0},
        ToneSpec(1, "mid", "beep", "long"): {"count": 1.0, "pitch": 1.0, "shape": 1.0, "duration": 0.0},
        ToneSpec(1, "mid", "rising"): {"count": 1.0, "pitch": 1.0, "shape": 0.0},
    }
    for spec, credits in cases.items():
        (d,) = toneeval_details(clip, [spec])
        assert d["credits"] == credits, (spec.caption(), d["credits"])
        assert d["partial"] == pytest.approx(sum(credits.values()) / len(credits))
        assert d["strict"] == float(all(v == 1.0 for v in credits.values()))
    # three tones where the caption asks for one: count 0, each attribute 1/3 (extra tones cost too)
    three = _clip(_tone(0.1, 600.0), _tone(0.4, 600.0), _tone(0.7, 600.0))
    (d,) = toneeval_details(three, [ToneSpec(1, "mid", "beep")])
    assert d["credits"] == pytest.approx({"count": 0.0, "pitch": 1 / 3, "shape": 1 / 3})


def test_every_single_attribute_change_scores_below_one() -> None:
    specs = [s for s in all_specs() if s.duration]  # a caption without a duration leaves it free
    clips = render_batch(specs, 4)
    for field in ("pitch", "shape", "duration", "count"):
        wrong = [dataclasses.replace(s, count=s.count % 3 + 1) if field == "count"
                 else dataclasses.replace(s, **{field: OTHER[getattr(s, field)]}) for s in specs]
        details = toneeval_details(clips, wrong)
        assert all(d["strict"] == 0.0 and d["partial"] < 1.0 for d in details), field
        assert all(d["credits"][field] == 0.0 for d in details), field


def test_noise_and_silence_score_zero_and_noise_bursts_are_not_tones() -> None:
    specs = all_specs()
    gen = torch.Generator().manual_seed(0)
    noise = 0.3 * torch.randn(len(specs), 1, NUM_SAMPLES, generator=gen)
    meta = [s.to_metadata() for s in specs]
    reward = ToneEval("partial")
    assert reward(noise, [s.caption() for s in specs], meta) == [0.0] * len(specs)
    assert reward(torch.zeros(len(specs), 1, NUM_SAMPLES), [s.caption() for s in specs], meta) == [0.0] * len(specs)
    # a beep followed by a burst of noise: the burst is an event, but not a tone
    clip = _clip(_tone(0.1, 300.0))
    clip[..., 4000:5600] += 0.4 * torch.randn(1600, generator=gen)
    (tones,) = detect_tones(clip)
    assert [t.pitch for t in tones] == ["low"]
    assert ToneEval("strict")(clip, ["a short low beep"]) == [1.0]


def test_reward_reads_captions_stereo_and_masks_what_it_cannot_score() -> None:
    specs = [ToneSpec(2, "high", "falling", "long"), ToneSpec(3, "low", "beep")]
    stereo = render_batch(specs, 3, channels=2)
    prompts = [s.caption() for s in specs]
    assert ToneEval("strict")(stereo, prompts) == [1.0, 1.0]  # specs parsed from the captions
    assert ToneEval("partial")(stereo, ["a dog barking", prompts[1]], [{}, {}]) == [None, 1.0]
    bad = torch.full((1, 1, NUM_SAMPLES), float("nan"))
    assert ToneEval("partial")(torch.cat([bad, stereo[:1, :1]]), [prompts[0]] * 2) == [None, 1.0]  # cannot score
    assert REWARDS.get("toneeval") is ToneEval
    rewards = RewardSet([RewardTerm("toneeval", ToneEval(), 1.0)])
    table = rewards.score(stereo, prompts, [s.to_metadata() for s in specs])
    assert table.raw["toneeval"].tolist() == [1.0, 1.0]


def test_bad_settings_name_the_field_and_the_fix() -> None:
    with pytest.raises(ValueError, match=r"mode='soft' is not a ToneEval mode; use one of \('partial', 'strict'\)"):
        ToneEval("soft")
    with pytest.raises(ValueError, match=r"sample_rate='8k'.*positive integer"):
        ToneEval(sample_rate="8k")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unexpected keyword argument 'gate'.*valid fields: window_s"):
        ToneEval(detector={"gate": -30})
    with pytest.raises(ValueError, match=r"min_tonality=1\.5"):
        ToneConfig(min_tonality=1.5)
    with pytest.raises(ValueError, match=r"\[B, C, T\]"):
        ToneEval()(torch.zeros(2, NUM_SAMPLES), ["a low beep"] * 2)
    with pytest.raises(ValueError, match="metadata\\[0\\] is not a tones spec"):
        toneeval_details(torch.zeros(1, 1, NUM_SAMPLES), [{"world": "shapes", "category": "single"}])
    assert SAMPLE_RATE == 8000 and set(SHAPES) == {"beep", "rising", "falling"}
