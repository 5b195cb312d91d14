"""GenEval's rules on synthetic detections, hand-checked against geneval.md (sections 2, 5, 6, 8 and the worked
examples of section 10): GenEval's correctness, the reward server's strict verdict and its partial credit."""

from __future__ import annotations

import pytest

from alignkit.rewards.geneval_rules import (
    COCO_NAMES,
    OBJECT_NAMES,
    Detection,
    GenEvalConfig,
    GenEvalMetadataError,
    GenEvalRow,
    box_iou,
    colors_needed,
    judge,
    kept_indices,
    parse_rows,
    relations,
    summarize,
)

BOX = (10.0, 10.0, 50.0, 50.0)
TEDDY = (50.0, 150.0, 200.0, 350.0)


def det(label: str, score: float, box: tuple[float, float, float, float] = BOX, color: str | None = None) -> Detection:
    return Detection(label, score, box, color=color)


def row(tag: str, *include: dict, exclude: list[dict] | None = None) -> GenEvalRow:
    meta = {"tag": tag, "include": list(include)}
    if exclude is not None:
        meta["exclude"] = exclude
    return GenEvalRow.from_metadata(meta)


def one(cls: str, count: int = 1, **kw) -> dict:
    return {"class": cls, "count": count, **kw}


BENCH = row("single_object", one("bench"))
TWO_CLOCKS = row("counting", one("clock", 2), exclude=[one("clock", 3)])
BLUE_HYDRANT = row("colors", one("fire hydrant", color="blue"))
DOG_RIGHT_OF_TEDDY = row("position", one("teddy bear"), one("dog", position=["right of", 0]))
DOG_BELOW_TEDDY = row("position", one("teddy bear"), one("dog", position=["below", 0]))
GLASS_APPLE = row("color_attr", one("wine glass", color="purple"), one("apple", color="black"))
BENCH_BALL = row("two_object", one("bench"), one("sports ball"))

# geneval.md section 10: (row, detections, GenEval correct, server strict, server score)
WORKED = {
    "1 extra instance": (BENCH, [det("bench", .62), det("bench", .35), det("dog", .80)], True, False, 0.0),
    "2 score exactly 0.3": (BENCH, [det("bench", .30)], False, False, 0.0),
    "3 two above 0.9": (TWO_CLOCKS, [det("clock", s) for s in (.97, .93, .88, .41)], True, True, 1.0),
    "4 exclude hits": (TWO_CLOCKS, [det("clock", s) for s in (.97, .93, .91, .41)], False, False, 0.5),
    "5 best is red": (BLUE_HYDRANT, [det("fire hydrant", .88, color="red"), det("fire hydrant", .55, color="blue")],
                      False, False, 0.0),
    "6 wrong colour": (BLUE_HYDRANT, [det("fire hydrant", .88, color="red")], False, False, 0.5),
    "7 right of": (DOG_RIGHT_OF_TEDDY, [det("teddy bear", .9, TEDDY), det("dog", .9, (300, 180, 420, 320))],
                   True, True, 1.0),
    "8 not below": (DOG_BELOW_TEDDY, [det("teddy bear", .9, TEDDY), det("dog", .9, (300, 190, 420, 330))],
                    False, False, 0.75),
    "9 target missing": (DOG_RIGHT_OF_TEDDY, [det("dog", .9, (300, 180, 420, 320))], False, False, 1 / 3),
    "10 two apples": (GLASS_APPLE, [det("wine glass", .70, color="purple"), det("apple", .60, color="red"),
                                    det("apple", .45, color="black")], False, False, 0.5),
    "11 four balls": (BENCH_BALL, [det("bench", .9), *(det("sports ball", s) for s in (.5, .6, .7, .8))],
                      True, False, -0.5),
    "12 twenty benches": (BENCH, [det("bench", .5) for _ in range(20)], True, False, -14.0),
}


@pytest.mark.parametrize("name", list(WORKED))
def test_worked_examples(name: str) -> None:
    r, detections, correct, strict, score = WORKED[name]
    v = judge(detections, r)
    assert (v.correct, v.strict) == (correct, strict)
    assert v.score == pytest.approx(score, abs=1e-12)
    assert v.correct == (not v.reasons)


def test_partial_credit_terms_per_task() -> None:
    assert judge([det("dog", .9, (300, 190, 420, 330)), det("teddy bear", .9, TEDDY)], DOG_BELOW_TEDDY).terms == \
        (1.0, 1.0, 0.0, 1.0)  # a wrong relation yields the two terms 0, 1
    assert judge([det("dog", .9, (300, 180, 420, 320))], DOG_RIGHT_OF_TEDDY).terms == (0.0, 1.0, 0.0)
    # A's count wrong: (tB + tA + 0) / 3 with tA = 1 - |1 - 2|
    two_dogs = [det("teddy bear", .9, TEDDY), det("dog", .9, (300, 180, 420, 320)), det("dog", .8, (300, 0, 320, 9))]
    assert judge(two_dogs, DOG_RIGHT_OF_TEDDY).terms == (1.0, 0.0, 0.0)
    assert judge([], DOG_RIGHT_OF_TEDDY).terms == (0.0, 0.0, 0.0)
    # colours: n = 1 -> (1 + [right]) / 2; n != 1 -> (1 - |1 - n|) / 2
    assert judge([det("fire hydrant", .5, color="blue")], BLUE_HYDRANT).score == 1.0
    assert judge([det("fire hydrant", s, color="blue") for s in (.5, .6, .7)], BLUE_HYDRANT).score == -0.5
    # color_attr: four terms (count, colour) per object
    v = judge([det("wine glass", .7, color="purple"), det("apple", .6, color="black")], GLASS_APPLE)
    assert (v.correct, v.strict, v.terms) == (True, True, (1.0, 1.0, 1.0, 1.0))
    assert judge([det("wine glass", .7, color="red"), det("apple", .6, color="black")], GLASS_APPLE).terms == \
        (1.0, 0.0, 1.0, 1.0)
    # counting: 1 - |N - n| / N with n counted above 0.9
    three = row("counting", one("cup", 3), exclude=[one("cup", 4)])
    assert judge([det("cup", .95), det("cup", .92), det("cup", .85)], three).score == pytest.approx(2 / 3)
    assert judge([], BENCH).score == 0.0 and judge([], BENCH).terms == (0.0,)


def test_counting_threshold_applies_to_every_class_of_a_counting_row() -> None:
    r = row("counting", one("cup", 2), exclude=[one("cup", 3)])
    dets = [det("cup", .95), det("cup", .9), det("cup", .9000001), det("dog", .85)]
    assert kept_indices(dets, "counting", GenEvalConfig()) == {"cup": [0, 2]}  # 0.9 exactly is dropped
    assert kept_indices(dets, "two_object", GenEvalConfig()) == {"cup": [0, 2, 1], "dog": [3]}
    assert judge(dets, r).correct
    # the same objects under a two_object row use 0.3
    assert judge(dets, row("two_object", one("cup"), one("dog"))).correct
    assert not judge(dets, row("counting", one("dog", 2), one("cup", 2))).correct  # dog 0.85 is not above 0.9


def test_threshold_boundaries_and_custom_thresholds() -> None:
    assert not judge([det("bench", .3)], BENCH).correct
    assert judge([det("bench", .3000001)], BENCH).correct
    loose = GenEvalConfig(threshold=0.1, counting_threshold=0.5)
    assert judge([det("bench", .2)], BENCH, loose).correct
    assert judge([det("clock", .6), det("clock", .55)], TWO_CLOCKS, loose).strict


def test_at_most_16_per_class_best_first_and_ties_keep_detector_order() -> None:
    dets = [det("bench", 0.4 + 0.01 * i) for i in range(20)]
    kept = kept_indices(dets, "single_object", GenEvalConfig())["bench"]
    assert kept == list(range(19, 3, -1))  # the 16 best, best first
    assert judge(dets, row("counting", one("bench", 16), exclude=[one("bench", 17)]),
                 GenEvalConfig(counting_threshold=0.3)).correct  # the cap means 17 can never be reached
    ties = [det("bench", .5), det("bench", .7), det("bench", .5)]
    assert kept_indices(ties, "single_object", GenEvalConfig())["bench"] == [1, 0, 2]
    assert kept_indices(ties, "single_object", GenEvalConfig(max_per_class=2))["bench"] == [1, 0]


def test_overlap_suppression_is_off_by_default_and_uses_inclusive_pixels() -> None:
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)  # 10x10 boxes, 5x10 overlap
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0
    twins = [det("clock", .95, (0, 0, 9, 9)), det("clock", .94, (0, 0, 9, 9)), det("clock", .93, (5, 0, 14, 9))]
    assert judge(twins[:2], TWO_CLOCKS).correct  # duplicates both count without suppression
    nms = GenEvalConfig(max_overlap=0.5)
    assert kept_indices(twins, "counting", nms) == {"clock": [0, 2]}  # IoU 1 >= 0.5 dropped, 1/3 kept
    assert kept_indices(twins, "counting", GenEvalConfig(max_overlap=1 / 3)) == {"clock": [0]}  # IoU >= max dropped


def test_exclude_counts_all_kept_detections() -> None:
    r = row("counting", one("cup", 2), exclude=[one("cup", 3)])
    assert judge([det("cup", .95)] * 3, r).reasons == ("expected cup<3, found 3",)
    assert judge([det("cup", .95)] * 2 + [det("cup", .89)], r).correct
    other = row("single_object", one("cup"), exclude=[one("dog", 1)])
    assert not judge([det("cup", .5), det("dog", .4)], other).correct
    assert judge([det("cup", .5), det("dog", .2)], other).correct
    assert judge([det("cup", .5), det("dog", .4)], other).strict  # the server does not read exclude clauses


def test_relations_and_margins() -> None:
    # example 8: offset (235, 10); the vertical part shrinks to 0 (10 < 0.1 * (200 + 140))
    assert relations((300, 190, 420, 330), TEDDY) == {"right of"}
    assert relations(TEDDY, (300, 190, 420, 330)) == {"left of"}
    assert relations((0, 0, 10, 10), (0, 100, 10, 110)) == {"above"}
    assert relations((0, 100, 10, 110), (0, 0, 10, 10)) == {"below"}
    assert relations((100, 100, 110, 110), (0, 0, 10, 10)) == {"right of", "below"}  # diagonal: both hold
    assert relations((0, 0, 100, 100), (10, 10, 90, 90)) == set()  # heavy overlap: none
    # dx = (10 - 0.1 * (30 + 20)) / 10 = 0.5 exactly: strict inequality, no relation
    assert relations((5, 0, 35, 20), (0, 0, 20, 20)) == set()
    assert relations((6, 0, 36, 20), (0, 0, 20, 20)) == {"right of"}  # dx = 6 / 11
    assert relations((5, 0, 35, 20), (0, 0, 20, 20), threshold=0.0) == {"right of"}
    # within 60 degrees of the axis without the shrink: (3, 4) gives dx = 0.6 and dy = 0.8
    assert relations((3, 4, 3, 4), (0, 0, 0, 0), threshold=0.0) == {"right of", "below"}


def test_position_needs_every_pair_and_a_passed_target() -> None:
    cups_left_of_tv = row("position", one("tv"), one("cup", 2, position=["left of", 0]))
    tv, left, right = (400, 0, 500, 100), (0, 0, 50, 50), (600, 0, 650, 50)
    assert judge([det("tv", .9, tv), det("cup", .9, left), det("cup", .8, left)], cups_left_of_tv).correct
    v = judge([det("tv", .9, tv), det("cup", .9, left), det("cup", .8, right)], cups_left_of_tv)
    assert not v.correct and "expected cup left of tv" in v.reasons[0]
    # GenEval judges the best `count` objects only: a third, misplaced cup does not matter to it
    three = [det("tv", .9, tv), det("cup", .9, left), det("cup", .8, left), det("cup", .7, right)]
    assert judge(three, cups_left_of_tv).correct and not judge(three, cups_left_of_tv).strict
    # a target clause that failed on colour leaves no target
    red_tv = row("position", one("tv", color="red"), one("cup", position=["left of", 0]))
    v = judge([det("tv", .9, tv, color="blue"), det("cup", .9, left)], red_tv)
    assert v.reasons[-1] == "no target for cup to be left of" and v.terms == (1.0, 0.0, 1.0, 0.0)


def test_colors_needed_lists_the_best_count_per_coloured_clause() -> None:
    dets = [det("apple", .45), det("wine glass", .7), det("apple", .6), det("bench", .9)]
    assert colors_needed(dets, GLASS_APPLE, GenEvalConfig()) == [1, 2]
    assert colors_needed([det("apple", .2)], GLASS_APPLE, GenEvalConfig()) == []
    with pytest.raises(ValueError, match=r"detection 1 .*has no colour; classify the detections listed by"):
        judge(dets, GLASS_APPLE)


def test_summary_weighs_tasks_equally() -> None:
    tags = ["single_object"] * 4 + ["counting"]
    s = summarize(tags, [True, True, True, True, False], prompts=["a", "a", "b", "b", "c"])
    assert s.tasks == {"single_object": 1.0, "counting": 0.0}
    assert s.overall == 0.5 and s.images == 0.8 and s.prompts == pytest.approx(2 / 3)
    assert summarize(["colors", "colors"], [0.0, 1.0]).prompts is None
    with pytest.raises(ValueError, match="one tag and one verdict per image"):
        summarize(["colors"], [])


def test_object_names_are_coco_with_three_renames() -> None:
    assert len(OBJECT_NAMES) == len(set(OBJECT_NAMES)) == 80
    renamed = {c: g for c, g in zip(COCO_NAMES, OBJECT_NAMES) if c != g}
    assert renamed == {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}
    assert OBJECT_NAMES[0] == "person" and OBJECT_NAMES[-1] == "toothbrush"


@pytest.mark.parametrize(
    ("meta", "words"),
    [
        ({"include": [one("cat")]}, ["metadata[0] has no 'tag'", "prompts.source=geneval"]),
        ({"tag": "single_object"}, ["metadata[0] has no 'include'"]),
        ({"tag": "counts", "include": [one("cat")]}, ["metadata[0].tag='counts'", "counting"]),
        ({"tag": "single_object", "include": []}, ["metadata[0].include=[]", "non-empty list"]),
        ({"tag": "single_object", "include": [{"count": 1}]}, ["include[0] has no 'class'"]),
        ({"tag": "single_object", "include": [one("mouse")]}, ["include[0].class='mouse'", "'computer mouse'"]),
        ({"tag": "single_object", "include": [one("catt")]}, ["include[0].class='catt'", "Did you mean 'cat'"]),
        ({"tag": "single_object", "include": [one("cat", 0)]}, ["include[0].count=0", ">= 1"]),
        ({"tag": "single_object", "include": [one("cat", True)]}, ["include[0].count=True"]),
        ({"tag": "colors", "include": [one("cat", color="teal")]}, ["include[0].color='teal'", "purple"]),
        ({"tag": "colors", "include": [{"class": "cat", "count": 1, "colour": "red"}]},
         ["include[0] has unknown keys ['colour']", "color"]),
        ({"tag": "position", "include": [one("cat", position=["above", 0])]},
         ["include[0].position", "list the reference object first"]),
        ({"tag": "position", "include": [one("dog"), one("cat", position=["on top of", 0])]},
         ["include[1].position[0]='on top of'", "left of"]),
        ({"tag": "position", "include": [one("dog"), one("cat", position=["above", 1])]},
         ["include[1].position[1]=1", "(0..0)"]),
        ({"tag": "position", "include": [one("dog"), one("cat", position="above")]},
         ["include[1].position='above'", "[relation, index]"]),
        ({"tag": "counting", "include": [one("cat", 2)], "exclude": [{"class": "cat"}]}, ["exclude[0]="]),
        ("a photo of a cat", ["metadata[0]='a photo of a cat' is not a mapping"]),
    ],
)
def test_bad_metadata_names_the_field_and_the_fix(meta: object, words: list[str]) -> None:
    with pytest.raises(GenEvalMetadataError) as info:
        parse_rows([meta], 1)
    for word in words:
        assert word in str(info.value)


def test_rows_round_trip_and_unknown_detector_classes() -> None:
    meta = {"tag": "position", "include": [one("laptop"), one("cat", position=["above", 0])], "prompt": "x"}
    parsed = GenEvalRow.from_metadata(meta)
    assert parsed.to_metadata() == {k: v for k, v in meta.items() if k != "prompt"}
    with pytest.raises(GenEvalMetadataError, match=r"class='laptop' is not one of the 2 classes the detector knows"):
        GenEvalRow.from_metadata(meta, classes=("cat", "dog"))
    with pytest.raises(GenEvalMetadataError, match="GenEval got 2 samples and 1 metadata rows"):
        parse_rows([meta], 2)
    with pytest.raises(GenEvalMetadataError, match="GenEval got 1 samples and no metadata"):
        parse_rows(None, 1)


def test_config_rejects_bad_settings() -> None:
    for kwargs, word in [({"threshold": 1.0}, "threshold=1.0"), ({"counting_threshold": -0.1}, "counting_threshold"),
                         ({"max_per_class": 0}, "max_per_class=0"), ({"max_overlap": 0.0}, "max_overlap=0.0"),
                         ({"position_threshold": 0.5}, "position_threshold=0.5")]:
        with pytest.raises(ValueError, match=word):
            GenEvalConfig(**kwargs)
