"""``prompts.options.eval_split``: the validation split (default, unchanged) and the test split of the worlds."""

from __future__ import annotations

import hashlib
import json

import pytest

from alignkit.config import PromptsConfig
from alignkit.worlds.arithmetic.world import arithmetic_source
from alignkit.worlds.common import TEST_EXCLUDED_FIRST, TEST_EXCLUDED_SEEDS
from alignkit.worlds.moving_shapes.prompts import shapes_video
from alignkit.worlds.shapes.prompts import shapes_source
from alignkit.worlds.shapes.world import parse_caption, split_of
from alignkit.worlds.tones.prompts import tones_source

SOURCES = {"shapes": shapes_source, "arithmetic": arithmetic_source, "shapes_video": shapes_video}
# sha256 of [train prompts, held-out prompts] with train_size=eval_size=64, computed before eval_split existed
BEFORE = {"shapes": "72d4a74c50c1078f", "arithmetic": "2abef4848320d654", "shapes_video": "c59bd5014470b31f"}


def sets(source: str, **options):
    return SOURCES[source](PromptsConfig(source=source, options={"train_size": 64, "eval_size": 64, **options}))


@pytest.mark.parametrize("source", list(SOURCES))
def test_default_and_validation_are_todays_draw(source: str) -> None:
    for opts in ({}, {"eval_split": "validation"}):
        train, heldout = sets(source, **opts)
        digest = hashlib.sha256(json.dumps([train.prompts, heldout.prompts]).encode()).hexdigest()[:16]
        assert digest == BEFORE[source]


@pytest.mark.parametrize("source", list(SOURCES))
def test_test_split_is_disjoint_deterministic_and_leaves_training_alone(source: str) -> None:
    train_v, val = sets(source)
    train_t, test = sets(source, eval_split="test")
    assert train_t.prompts == train_v.prompts  # the training prompts do not depend on the split
    assert len(test.prompts) == 64 and len(set(test.prompts)) == 64  # distinct captions: independent units
    assert not set(test.prompts) & set(val.prompts)
    assert not set(test.prompts) & set(train_v.prompts)
    again = sets(source, eval_split="test")[1]
    assert again.prompts == test.prompts and again.metadata == test.metadata
    # no caption of the first 96 validation prompts of seed 0 (what past choices were tuned on)
    for seed in TEST_EXCLUDED_SEEDS:
        past = SOURCES[source](PromptsConfig(source=source, options={"train_size": 1, "eval_size": TEST_EXCLUDED_FIRST,
                                                                    "seed": seed}))[1]
        assert not set(test.prompts) & set(past.prompts)


def test_shapes_test_split_is_held_out_and_disjoint_for_another_seed() -> None:
    opts = {"eval_size": 60, "seed": 7}
    _, val = shapes_source(PromptsConfig(source="shapes", options=opts))
    _, test = shapes_source(PromptsConfig(source="shapes", options={**opts, "eval_split": "test"}))
    assert all(split_of(c) == "heldout" for c in test.prompts) and len(set(test.prompts)) == 60
    assert not set(test.prompts) & set(val.prompts)
    # each prompt carries its own spec as metadata (what ShapeEval scores against)
    assert [parse_caption(c).to_metadata() for c in test.prompts] == test.metadata


def test_bad_eval_split_names_the_field_and_the_values() -> None:
    with pytest.raises(ValueError, match=r"prompts\.options\.eval_split='tst'.*validation.*test"):
        sets("shapes", eval_split="tst")


def test_test_split_with_nothing_left_says_so() -> None:
    # every held-out 'single' caption is in the validation draws: nothing is left for a test split
    with pytest.raises(ValueError, match=r"prompts\.options\.eval_split=test: source 'shapes' has no held-out caption "
                                         r"outside the \d+ of its validation draws .*use eval_split=validation"):
        shapes_source(PromptsConfig(source="shapes", options={"eval_size": 2, "categories": ["single"],
                                                              "eval_split": "test"}))


def test_a_world_too_small_for_a_test_split_is_refused() -> None:
    # the tones world holds out 10 captions, all of them in the validation draws
    with pytest.raises(ValueError, match=r"source 'tones' has no held-out caption outside the 10 of its validation "
                                         r"draws .*use eval_split=validation"):
        tones_source(PromptsConfig(source="tones", options={"eval_split": "test"}))
