"""Shapes world (captions, splits, renders) and the ShapeEval reward on ground-truth and edited renders."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from alignkit.worlds.shapes.shapeeval import ShapeEval, shapeeval_details, summarize
from alignkit.worlds.shapes.world import (
    CATEGORIES,
    COLORS,
    IMAGE_SIZE,
    RELATION_MARGIN,
    SHAPES,
    VOCAB_WORDS,
    ObjectSpec,
    PromptSpec,
    all_specs,
    parse_caption,
    prompt_set,
    render,
    render_batch,
    render_objects,
    sample_spec,
    split_of,
)

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _images(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255.0 for a in arrays])


def _credits(arrays: list[np.ndarray], specs: list[PromptSpec]) -> list[dict[str, float]]:
    return [d["credits"] for d in shapeeval_details(_images(arrays), [s.to_metadata() for s in specs])]


def _other_color(*avoid: str) -> str:
    return next(c for c in COLORS if c not in avoid)


def _other_shape(shape: str) -> str:
    return next(s for s in SHAPES if s != shape)


def test_every_ground_truth_render_scores_one() -> None:
    specs = all_specs() + prompt_set(100, seed=1, split="all") + prompt_set(100, seed=2, split="all")
    details = shapeeval_details(render_batch(specs, seed=7), [s.to_metadata() for s in specs])
    assert {d["category"] for d in details} == set(CATEGORIES)
    failed = [(d["caption"], d["credits"]) for d in details
              if d["strict"] != 1.0 or d["partial"] != 1.0 or d["soft"] != 1.0]
    assert not failed
    summary = summarize(details)
    assert summary["strict"] == summary["partial"] == 1.0
    assert summary["n"] == len(specs)


def test_position_renders_keep_a_clear_margin() -> None:
    specs = all_specs(["position"])[::3]
    for spec, d in zip(specs, shapeeval_details(render_batch(specs, seed=3), specs)):
        (a,) = [o for o in d["objects"] if (o["color"], o["shape"]) == (spec.objects[0].color, spec.objects[0].shape)]
        (b,) = [o for o in d["objects"] if (o["color"], o["shape"]) == (spec.objects[1].color, spec.objects[1].shape)]
        axis, sign = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}[spec.relation]
        assert sign * (a["centroid"][axis] - b["centroid"][axis]) >= RELATION_MARGIN - 1e-6, spec.caption()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_count_prompt_edits_lose_exactly_one_credit(seed: int) -> None:
    rng = random.Random(seed)
    specs = all_specs(["single", "count"])
    arrays, expected = [], []
    for spec in specs:
        obj, n = spec.objects[0], spec.count
        arrays.append(render_objects([obj] * (n + 1), rng))
        expected.append({"count": 0.0, "color": 1.0, "shape": 1.0})
        arrays.append(render_objects([ObjectSpec(_other_color(obj.color), obj.shape)] * n, rng))
        expected.append({"count": 1.0, "color": 0.0, "shape": 1.0})
        arrays.append(render_objects([ObjectSpec(obj.color, _other_shape(obj.shape))] * n, rng))
        expected.append({"count": 1.0, "color": 1.0, "shape": 0.0})
    got = _credits(arrays, [s for s in specs for _ in range(3)])
    assert got == expected


def test_soft_credits_grade_the_errors_by_hand() -> None:
    rng = random.Random(3)
    red_circle, blue_circle = ObjectSpec("red", "circle"), ObjectSpec("blue", "circle")
    three = PromptSpec("count", [red_circle], count=3)
    arrays = [
        render_objects([red_circle, red_circle], rng),  # one short: count 1 - 1/3
        render_objects([red_circle, red_circle, red_circle, red_circle, red_circle], rng),  # two extra: 1 - 2/3
        render_objects([red_circle, red_circle, blue_circle], rng),  # a third of the area is blue
        render_objects([], rng),  # nothing drawn
    ]
    details = shapeeval_details(_images(arrays), [three.to_metadata()] * 4)
    assert details[0]["soft_credits"] == {"count": pytest.approx(2 / 3), "color": 1.0, "shape": 1.0}
    assert details[1]["soft_credits"] == {"count": pytest.approx(1 / 3), "color": 1.0, "shape": 1.0}
    blue_area = details[2]["objects"]
    blue = sum(o["area"] for o in blue_area if o["color"] == "blue") / sum(o["area"] for o in blue_area)
    assert details[2]["soft_credits"] == {"count": 1.0, "color": pytest.approx(1 - blue), "shape": 1.0}
    assert details[3]["soft_credits"] == {"count": 0.0, "color": 0.0, "shape": 0.0}
    two = PromptSpec("two_object", [red_circle, ObjectSpec("green", "square")])
    wrong_b = render_objects([red_circle, ObjectSpec("blue", "square")], rng)  # B has the shape, not the colour
    (d,) = shapeeval_details(_images([wrong_b]), [two.to_metadata()])
    assert d["credits"] == {"object_a": 1.0, "object_b": 0.0, "count": 1.0}
    assert d["soft_credits"] == {"object_a": 1.0, "object_b": 0.5, "count": 1.0}
    assert d["soft"] == pytest.approx(2.5 / 3)


def test_soft_score_bounds_partial_and_equals_one_only_with_strict() -> None:
    specs = prompt_set(64, seed=5, split="all")
    images = render_batch(specs, seed=1)
    noisy = (images + 0.25 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    shuffled = images[torch.randperm(len(specs), generator=torch.Generator().manual_seed(1))]  # wrong captions
    for batch in (noisy, shuffled):
        for d in shapeeval_details(batch, [s.to_metadata() for s in specs]):
            assert d["soft_credits"].keys() == d["credits"].keys()
            assert all(d["soft_credits"][k] >= v for k, v in d["credits"].items())
            assert (d["soft"] == 1.0) == (d["strict"] == 1.0)
    assert ShapeEval("soft")(shuffled, [s.caption() for s in specs], [s.to_metadata() for s in specs]) == [
        d["soft"] for d in shapeeval_details(shuffled, [s.to_metadata() for s in specs])]


@pytest.mark.parametrize("seed", [0, 1])
def test_two_object_wrong_color_of_b_loses_only_object_b(seed: int) -> None:
    rng = random.Random(seed)
    specs = all_specs(["two_object"])[seed::2]
    arrays = []
    for spec in specs:
        a, b = spec.objects
        color = _other_color(b.color, a.color) if a.shape == b.shape else _other_color(b.color)
        arrays.append(render_objects([a, ObjectSpec(color, b.shape)], rng))
    assert _credits(arrays, specs) == [{"object_a": 1.0, "object_b": 0.0, "count": 1.0}] * len(specs)


@pytest.mark.parametrize("seed", [0, 1])
def test_position_edits_lose_exactly_one_credit(seed: int) -> None:
    rng = random.Random(seed)
    specs = all_specs(["position"])[seed::4]
    arrays, expected = [], []
    for spec in specs:
        a, b = spec.objects
        arrays.append(render_objects([a, b], rng, relation=OPPOSITE[spec.relation]))
        expected.append({"object_a": 1.0, "object_b": 1.0, "relation": 0.0})
        color = _other_color(b.color, a.color) if a.shape == b.shape else _other_color(b.color)
        arrays.append(render_objects([a, ObjectSpec(color, b.shape)], rng, relation=spec.relation))
        expected.append({"object_a": 1.0, "object_b": 0.0, "relation": 1.0})
    assert _credits(arrays, [s for s in specs for _ in range(2)]) == expected


def test_blank_image_scores_zero() -> None:
    specs = [sample_spec(random.Random(i), [cat]) for i, cat in enumerate(CATEGORIES)]
    details = shapeeval_details(torch.ones(len(specs), 3, IMAGE_SIZE, IMAGE_SIZE), specs)
    for d in details:
        assert d["strict"] == 0.0 and d["partial"] == 0.0 and not d["objects"]
        assert set(d["credits"].values()) == {0.0}
    assert summarize(details)["strict"] == 0.0


def test_light_noise_keeps_strict_scores() -> None:
    specs = prompt_set(200, seed=5, split="all")
    images = render_batch(specs, seed=5)
    noisy = (images + 0.03 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    strict = [d["strict"] for d in shapeeval_details(noisy, specs)]
    assert np.mean(strict) >= 0.9


def test_captions_parse_back_and_use_the_vocabulary() -> None:
    specs = all_specs()
    assert len({s.caption() for s in specs}) == len(specs) == 696
    for spec in specs:
        assert parse_caption(spec.caption()) == spec
        assert set(spec.caption().split()) <= set(VOCAB_WORDS)
        meta = spec.to_metadata()
        assert PromptSpec.from_metadata(json.loads(json.dumps(meta))) == spec
    assert set(VOCAB_WORDS) == {w for s in specs for w in s.caption().split()}
    assert parse_caption(" One Red Circle. ") == PromptSpec("single", [ObjectSpec("red", "circle")])
    for bad in ("", "a red", "a purple circle", "two red circle", "a red circle near a blue square",
                "a red circle and a red circle", "four red circles", "a photo of a cat"):
        assert parse_caption(bad) is None, bad


def test_spec_validation() -> None:
    red_circle = ObjectSpec("red", "circle")
    with pytest.raises(ValueError, match="color"):
        ObjectSpec("purple", "circle")
    with pytest.raises(ValueError, match="count"):
        PromptSpec("count", [red_circle], count=4)
    with pytest.raises(ValueError, match="relation"):
        PromptSpec("position", [red_circle, ObjectSpec("blue", "square")])
    with pytest.raises(ValueError, match="distinct"):
        PromptSpec("two_object", [red_circle, red_circle])
    with pytest.raises(ValueError, match="invalid shapes-world metadata"):
        PromptSpec.from_metadata({"category": "single"})


def test_render_and_prompt_set_are_deterministic() -> None:
    specs = prompt_set(32, seed=3)
    assert [s.caption() for s in specs] == [s.caption() for s in prompt_set(32, seed=3)]
    assert [s.caption() for s in specs] != [s.caption() for s in prompt_set(32, seed=4)]
    a, b = render_batch(specs, seed=11), render_batch(specs, seed=11)
    assert a.shape == (32, 3, IMAGE_SIZE, IMAGE_SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, render_batch(specs, seed=12))
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    assert np.array_equal(render(specs[0], random.Random(1)), render(specs[0], random.Random(1)))


def test_splits_are_disjoint_and_cover_every_category() -> None:
    train = {s.caption() for s in prompt_set(3000, seed=0, split="train")}
    heldout = {s.caption() for s in prompt_set(600, seed=0, split="heldout")}
    assert train and heldout and not train & heldout
    held = [s for s in all_specs() if split_of(s.caption()) == "heldout"]
    assert 0.1 < len(held) / 696 < 0.3
    assert {s.category for s in held} == set(CATEGORIES)
    assert {s.category for s in prompt_set(40, seed=0, categories=["count"])} == {"count"}
    with pytest.raises(ValueError, match="split"):
        prompt_set(1, seed=0, split="test")


def test_reward_modes_metadata_and_caption_fallback() -> None:
    specs = [PromptSpec("single", [ObjectSpec("red", "circle")]),
             PromptSpec("position", [ObjectSpec("blue", "square"), ObjectSpec("yellow", "triangle")], relation="above")]
    good = render_batch(specs, seed=0)
    images = torch.cat([good, torch.ones(1, 3, IMAGE_SIZE, IMAGE_SIZE)])
    prompts = [s.caption() for s in specs] + ["a photo of a cat"]
    meta = [s.to_metadata() for s in specs] + [{}]
    assert ShapeEval()(images, prompts, meta) == [1.0, 1.0, None]
    assert ShapeEval(mode="strict")(images, prompts, [{}, {}, {}]) == [1.0, 1.0, None]
    assert ShapeEval()(images, prompts, []) == [1.0, 1.0, None]
    swapped = ShapeEval(mode="partial")(good.flip(0), prompts[:2], meta[:2])
    assert swapped[0] is not None and swapped[0] < 1.0
    with pytest.raises(ValueError, match=r"mode='bogus'.*partial.*strict"):
        ShapeEval(mode="bogus")
    with pytest.raises(ValueError, match="metadata"):
        ShapeEval()(images[:1], prompts[:1], [{"category": "single", "objects": []}])
