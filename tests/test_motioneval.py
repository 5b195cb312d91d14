"""Moving-shapes video world (captions, splits, clips) and the MotionEval reward on ground-truth and edited clips."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch

from alignkit.config import PromptsConfig
from alignkit.rewards.video import PerFrame
from alignkit.worlds.moving_shapes.motioneval import CREDITS, MotionEval, motioneval_details, summarize
from alignkit.worlds.moving_shapes.prompts import shapes_video
from alignkit.worlds.moving_shapes.world import (
    CATEGORIES,
    MIN_TRAVEL,
    NUM_FRAMES,
    SPEED_RANGE,
    VOCAB_WORDS,
    MotionSpec,
    MovingObject,
    all_specs,
    draw_clip,
    layout_clip,
    parse_caption,
    prompt_set,
    render_batch,
    render_clip,
    split_of,
)
from alignkit.worlds.shapes.shapeeval import ShapeEval
from alignkit.worlds.shapes.world import COLORS, IMAGE_SIZE, MIN_GAP, SHAPES

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _clips(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 ``[F, H, W, 3]`` arrays to float clips ``[B, F, 3, H, W]``."""
    return torch.stack([torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0 for a in arrays])


def _credits(arrays: list[np.ndarray], specs: list[MotionSpec]) -> list[dict[str, float]]:
    return [d["credits"] for d in motioneval_details(_clips(arrays), [s.to_metadata() for s in specs])]


def _credits_t(clips: torch.Tensor, specs: list[MotionSpec]) -> list[dict[str, float]]:
    return [d["credits"] for d in motioneval_details(clips, specs)]


def _expected(spec: MotionSpec, lost: dict[str, float]) -> dict[str, float]:
    """Every credit 1 except ``lost`` (keys without the object prefix for single captions)."""
    names = CREDITS if spec.category == "single" else [f"{p}/{c}" for p in ("a", "b") for c in CREDITS]
    return {name: lost.get(name, 1.0) for name in names}


def _edit_a(spec: MotionSpec, **change: str) -> MotionSpec:
    return MotionSpec(spec.category, [dataclasses.replace(spec.objects[0], **change), *spec.objects[1:]])


def _mixed_specs(seed: int, n: int = 40) -> list[MotionSpec]:
    return all_specs(["single"])[seed::4] + prompt_set(n, seed=seed, split="all", categories=["two_object"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ground_truth_clips_score_one(seed: int) -> None:
    specs = all_specs(["single"]) + prompt_set(100, seed=seed, split="all")
    details = motioneval_details(render_batch(specs, seed=seed), [s.to_metadata() for s in specs])
    assert {d["category"] for d in details} == set(CATEGORIES)
    failed = [(d["caption"], d["credits"]) for d in details if d["strict"] != 1.0 or d["partial"] != 1.0]
    assert not failed
    assert [d["credits"] for d in details] == [_expected(s, {}) for s in specs]
    summary = summarize(details)
    assert summary["strict"] == summary["partial"] == 1.0 and summary["n"] == len(specs)


@pytest.mark.parametrize("seed", [0, 1])
def test_opposite_direction_loses_exactly_direction(seed: int) -> None:
    rng = random.Random(seed)
    specs = _mixed_specs(seed)
    arrays = [render_clip(_edit_a(s, direction=OPPOSITE[s.objects[0].direction]), rng) for s in specs]
    key = {"single": "direction", "two_object": "a/direction"}
    assert _credits(arrays, specs) == [_expected(s, {key[s.category]: 0.0}) for s in specs]


@pytest.mark.parametrize("seed", [0, 1])
def test_wrong_color_or_shape_loses_exactly_that_credit(seed: int) -> None:
    rng = random.Random(seed)
    specs = _mixed_specs(seed)
    arrays, expected = [], []
    for spec in specs:
        prefix = "" if spec.category == "single" else "a/"
        color = next(c for c in COLORS if c not in {o.color for o in spec.objects})
        arrays.append(render_clip(_edit_a(spec, color=color), rng))
        expected.append(_expected(spec, {prefix + "color": 0.0}))
        if spec.category == "single":  # a two-object edit could repeat B's colour and shape
            shape = next(s for s in SHAPES if s != spec.objects[0].shape)
            arrays.append(render_clip(_edit_a(spec, shape=shape), rng))
            expected.append(_expected(spec, {"shape": 0.0}))
    specs_rep = [s for s in specs for _ in range(1 if s.category == "two_object" else 2)]
    assert _credits(arrays, specs_rep) == expected


def test_static_clip_loses_direction_only() -> None:
    specs = _mixed_specs(0)
    clips = render_batch(specs, seed=4)
    static = clips[:, :1].expand_as(clips).contiguous()  # frame 0 repeated
    lost = {"single": {"direction": 0.0}, "two_object": {"a/direction": 0.0, "b/direction": 0.0}}
    assert _credits_t(static, specs) == [_expected(s, lost[s.category]) for s in specs]


@pytest.mark.parametrize("hidden", [range(4, 8), range(1, 8, 2)], ids=["second_half", "odd_frames"])
def test_vanishing_in_half_the_frames_halves_presence(hidden: range) -> None:
    rng = random.Random(5)
    specs = _mixed_specs(1)
    arrays, expected = [], []
    for spec in specs:
        paths = layout_clip(spec, rng)
        frames = draw_clip(spec.objects, paths, IMAGE_SIZE)
        # the last object vanishes (the only one of a single caption; B of a two-object caption)
        without = draw_clip(spec.objects[:-1], paths[:-1], IMAGE_SIZE) if len(paths) > 1 else np.full_like(frames, 255)
        frames[list(hidden)] = without[list(hidden)]
        arrays.append(frames)
        expected.append(_expected(spec, {"presence" if spec.category == "single" else "b/presence": 0.5}))
    assert _credits(arrays, specs) == expected
    assert all(d["strict"] == 0.0 and d["partial"] == 0.9 for d in motioneval_details(_clips(arrays[:4]), specs[:4]))


def test_blank_clips_score_zero_and_other_captions_score_low() -> None:
    specs = prompt_set(100, seed=8, split="all")
    blank = motioneval_details(torch.ones(len(specs), NUM_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE), specs)
    assert {v for d in blank for v in d["credits"].values()} == {0.0}
    shuffled = motioneval_details(render_batch(prompt_set(100, seed=9, split="all"), seed=0), specs)
    summary = summarize(shuffled)
    assert summary["partial"] < 0.6 and summary["strict"] < 0.1


def test_clips_move_inside_the_frame_at_constant_speed_without_overlap() -> None:
    rng = random.Random(0)
    for num_frames in (2, NUM_FRAMES, 16):
        for spec in all_specs()[:: 17 if num_frames == NUM_FRAMES else 53]:
            paths = layout_clip(spec, rng, num_frames=num_frames)
            for obj, path in zip(spec.objects, paths):
                xy = np.array(path.centres)  # [F, 2]
                assert xy.shape == (num_frames, 2)
                assert (xy >= path.radius).all() and (xy <= IMAGE_SIZE - 1 - path.radius).all()
                axis = 0 if obj.direction in ("left", "right") else 1
                steps = np.diff(xy[:, axis]) * (1 if obj.direction in ("right", "down") else -1)
                assert (np.diff(xy[:, 1 - axis]) == 0).all() and steps.max() - steps.min() <= 1
                assert steps.sum() >= MIN_TRAVEL
                if num_frames == NUM_FRAMES:
                    assert SPEED_RANGE[0] - 0.5 <= steps.sum() / (num_frames - 1) <= SPEED_RANGE[1] + 0.5
            if len(paths) == 2:
                gap = paths[0].radius + paths[1].radius + MIN_GAP
                d = np.abs(np.array(paths[0].centres) - np.array(paths[1].centres))  # [F, 2]
                assert (d.max(axis=1) > gap).all(), spec.caption()


def test_render_and_prompt_set_are_deterministic() -> None:
    specs = prompt_set(32, seed=3)
    assert [s.caption() for s in specs] == [s.caption() for s in prompt_set(32, seed=3)]
    assert [s.caption() for s in specs] != [s.caption() for s in prompt_set(32, seed=4)]
    a, b = render_batch(specs, seed=11), render_batch(specs, seed=11)
    assert a.shape == (32, NUM_FRAMES, 3, IMAGE_SIZE, IMAGE_SIZE) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, render_batch(specs, seed=12))
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    clip = render_clip(specs[0], random.Random(1))
    assert clip.shape == (NUM_FRAMES, IMAGE_SIZE, IMAGE_SIZE, 3) and clip.dtype == np.uint8
    assert np.array_equal(clip, render_clip(specs[0], random.Random(1)))
    assert render_batch(specs[:2], seed=0, num_frames=5).shape[1] == 5


def test_splits_are_disjoint_and_cover_every_category() -> None:
    train = {s.caption() for s in prompt_set(3000, seed=0, split="train")}
    heldout = {s.caption() for s in prompt_set(600, seed=0, split="heldout")}
    assert train and heldout and not train & heldout
    held = [s for s in all_specs() if split_of(s.caption()) == "heldout"]
    assert 0.1 < len(held) / len(all_specs()) < 0.3
    assert {s.category for s in held} == set(CATEGORIES)
    with pytest.raises(ValueError, match="split"):
        prompt_set(1, seed=0, split="test")


def test_captions_and_metadata_round_trip() -> None:
    specs = all_specs()
    assert len({s.caption() for s in specs}) == len(specs) == 2160
    for spec in specs:
        assert parse_caption(spec.caption()) == spec
        assert MotionSpec.from_metadata(json.loads(json.dumps(spec.to_metadata()))) == spec
    assert set(VOCAB_WORDS) >= {w for s in specs for w in s.caption().split()}
    red_left = MotionSpec("single", [MovingObject("red", "circle", "left")])
    assert parse_caption(" An Red Circle Moving Left. ") == red_left
    for bad in ("", "a red circle", "a red circle moving sideways", "two red circles moving left",
                "a red circle moving left and a red circle moving up", "a red circle moving left and"):
        assert parse_caption(bad) is None, bad
    with pytest.raises(ValueError, match="direction"):
        MovingObject("red", "circle", "north")
    with pytest.raises(ValueError, match="distinct"):
        MotionSpec("two_object", [MovingObject("red", "circle", "left"), MovingObject("red", "circle", "up")])
    with pytest.raises(ValueError, match="world 'shapes'"):
        MotionSpec.from_metadata({"world": "shapes", "category": "single", "objects": [{"color": "red",
                                                                                        "shape": "circle"}]})


def test_reward_modes_metadata_and_caption_fallback() -> None:
    blue_up, yellow_right = MovingObject("blue", "square", "up"), MovingObject("yellow", "triangle", "right")
    red_left = MovingObject("red", "circle", "left")
    specs = [MotionSpec("single", [red_left]), MotionSpec("two_object", [blue_up, yellow_right])]
    good = render_batch(specs, seed=0)
    clips = torch.cat([good, torch.ones(1, *good.shape[1:])])
    prompts = [s.caption() for s in specs] + ["a photo of a cat"]
    meta = [s.to_metadata() for s in specs] + [{}]
    assert MotionEval()(clips, prompts, meta) == [1.0, 1.0, None]
    assert MotionEval(mode="strict")(clips, prompts, [{}, {}, {}]) == [1.0, 1.0, None]
    assert MotionEval()(clips.numpy(), prompts, []) == [1.0, 1.0, None]
    reversed_ = MotionEval(mode="strict")(good.flip(1), prompts[:2], meta[:2])  # frames backwards
    assert reversed_ == [0.0, 0.0]
    assert MotionEval(motion={"min_displacement": 100.0})(good, prompts[:2], meta[:2]) == [0.8, 0.8]
    with pytest.raises(ValueError, match=r"mode='bogus'.*partial.*strict"):
        MotionEval(mode="bogus")
    with pytest.raises(ValueError, match="metadata"):
        MotionEval()(good[:1], prompts[:1], [{"category": "single", "objects": []}])
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        MotionEval()(good[:, 0], prompts[:2], meta[:2])
    with pytest.raises(ValueError, match="at least 2 frames"):
        MotionEval()(good[:, :1], prompts[:2], meta[:2])
    # the still-image ShapeEval, applied per frame, reads the same metadata as the still prompt
    assert PerFrame(ShapeEval(mode="strict"))(good, prompts[:2], meta[:2]) == [1.0, 1.0]


def test_prompt_source_gives_train_and_heldout_sets() -> None:
    train, heldout = shapes_video(PromptsConfig(source="shapes_video", options={"train_size": 30, "eval_size": 10,
                                                                                 "categories": ["single"]}))
    assert len(train) == 30 and len(heldout) == 10
    assert all(split_of(p) == "train" for p in train.prompts) and all(split_of(p) == "heldout" for p in heldout.prompts)
    assert [MotionSpec.from_metadata(m).caption() for m in train.metadata] == train.prompts
    assert {m["category"] for m in train.metadata + heldout.metadata} == {"single"}
    with pytest.raises(ValueError, match="unknown keys"):
        shapes_video(PromptsConfig(source="shapes_video", options={"num_frames": 8}))
    with pytest.raises(ValueError, match="categories"):
        shapes_video(PromptsConfig(source="shapes_video", options={"categories": ["count"]}))
