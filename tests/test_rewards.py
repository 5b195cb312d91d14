"""JPEG rewards and the reward set: resolution, validation of outputs, aggregation."""

from __future__ import annotations

import io
import math
import statistics
import sys
import textwrap
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alignkit.config import RewardTermConfig
from alignkit.registry import REWARDS, RegistryError
from alignkit.reward_set import RewardSet, RewardTerm, resolve_reward
from alignkit.rewards.compression import JpegCompressibility, JpegIncompressibility

NAN = math.nan


def _images_from_uint8(arrays: list[np.ndarray]) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] whose uint8 quantisation gives back ``arrays`` exactly."""
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255.0 for a in arrays])


def _pil_jpeg_kb(array: np.ndarray, quality: int = 95) -> float:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=quality)
    return len(buf.getvalue()) / 1000.0


@pytest.fixture
def flat_and_noise() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    flat = np.full((32, 32, 3), 128, dtype=np.uint8)
    noise = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    return [flat, noise]


@pytest.mark.parametrize("quality", [95, 50])
def test_jpeg_rewards_match_pil_size(flat_and_noise: list[np.ndarray], quality: int):
    images = _images_from_uint8(flat_and_noise)
    sizes = [_pil_jpeg_kb(a, quality) for a in flat_and_noise]
    comp = JpegCompressibility(quality=quality)(images, ["a", "b"], [{}, {}])
    incomp = JpegIncompressibility(quality=quality)(images, ["a", "b"], [{}, {}])
    assert comp == pytest.approx([-s for s in sizes], abs=1e-12)
    assert incomp == pytest.approx(sizes, abs=1e-12)
    # the flat image compresses better: higher compressibility, lower incompressibility
    assert comp[0] > comp[1]
    assert incomp[0] < incomp[1]


def test_jpeg_reward_rejects_bad_input():
    with pytest.raises(ValueError, match="quality=0"):
        JpegCompressibility(quality=0)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        JpegCompressibility()(torch.zeros(1, 1, 8, 8), ["a"], [{}])


USER_MODULE = textwrap.dedent(
    """
    def brightness(samples, prompts, metadata, scale=1.0, offset=0.0):
        return [scale * float(s.mean()) + offset for s in samples]


    class PromptLength:
        def __init__(self, per_char=1.0):
            self.per_char = per_char

        def __call__(self, samples, prompts, metadata):
            return [self.per_char * len(p) for p in prompts]


    def tag(samples, prompts, metadata):
        return [float(m.get("tag", 0)) for m in metadata]
    """
)
MODULE = "alignkit_test_user_rewards"


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / f"{MODULE}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(MODULE, None)
    yield MODULE
    sys.modules.pop(MODULE, None)


def _samples() -> torch.Tensor:
    # sample i is constant i / 10, so its mean brightness is i / 10
    return torch.stack([torch.full((3, 4, 4), i / 10) for i in range(6)])


PROMPTS = ["a", "bb", "ccc", "dddd", "e", "ff"]
METADATA = [{"tag": i} for i in range(6)]


@pytest.mark.parametrize("sep", [":", "."])
def test_user_function_by_import_path_with_kwargs(user_module: str, sep: str):
    term = RewardTermConfig(fn=f"{user_module}{sep}brightness", kwargs={"scale": 2.0, "offset": 1.0})
    fn = resolve_reward("bright", term)
    out = fn(_samples(), PROMPTS, METADATA)
    assert out == pytest.approx([2.0 * i / 10 + 1.0 for i in range(6)], rel=1e-6)
    plain = resolve_reward("bright", RewardTermConfig(fn=f"{user_module}:brightness"))
    assert plain(_samples(), PROMPTS, METADATA) == pytest.approx([i / 10 for i in range(6)], rel=1e-6)


def test_user_class_by_import_path_and_registry_names(user_module: str):
    obj = resolve_reward("len", RewardTermConfig(fn=f"{user_module}:PromptLength", kwargs={"per_char": 0.5}))
    assert obj(None, PROMPTS, METADATA) == [0.5, 1.0, 1.5, 2.0, 0.5, 1.0]
    comp = resolve_reward("c", RewardTermConfig(fn="jpeg_compressibility", kwargs={"quality": 70}))
    assert isinstance(comp, JpegCompressibility) and comp.quality == 70
    incomp = resolve_reward("i", RewardTermConfig(fn="jpeg_incompressibility"))
    assert isinstance(incomp, JpegIncompressibility)
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(REWARDS.names())
    with pytest.raises(ValueError, match=r"reward\.len\.kwargs=.*bogus"):
        resolve_reward("len", RewardTermConfig(fn=f"{user_module}:PromptLength", kwargs={"bogus": 1}))
    with pytest.raises(RegistryError, match="jpeg_compressibility"):
        resolve_reward("x", RewardTermConfig(fn="jpeg_compresibility"))
    with pytest.raises(ImportError, match="no_such_fn"):
        resolve_reward("x", RewardTermConfig(fn=f"{user_module}:no_such_fn"))


def _reference_normalize(scores: list[float], groups: list[int], eps: float = 1e-4) -> list[float]:
    by_group: dict[int, list[float]] = defaultdict(list)
    for s, g in zip(scores, groups):
        if not math.isnan(s):
            by_group[g].append(s)
    return [
        NAN if math.isnan(s) else (s - statistics.fmean(by_group[g])) / (statistics.pstdev(by_group[g]) + eps)
        for s, g in zip(scores, groups)
    ]


def _assert_close_nan(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.shape == (len(expected),)
    for a, e in zip(actual.tolist(), expected):
        if math.isnan(e):
            assert math.isnan(a)
        else:
            assert a == pytest.approx(e, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_reward_set_aggregation(user_module: str, aggregation: str):
    cfg = {
        "bright": RewardTermConfig(fn=f"{user_module}:brightness", weight=2.0, kwargs={"scale": 3.0}),
        "len": RewardTermConfig(fn=f"{user_module}:PromptLength", weight=-0.5),
        "tag": RewardTermConfig(fn=f"{user_module}:tag", weight=0.25),
    }
    rs = RewardSet.from_config(cfg, aggregation)
    table = rs.score(_samples(), PROMPTS, METADATA)
    raw = {
        "bright": [3.0 * i / 10 for i in range(6)],
        "len": [float(len(p)) for p in PROMPTS],
        "tag": [float(i) for i in range(6)],
    }
    assert set(table.raw) == set(raw)
    for name, values in raw.items():
        assert table.raw[name].dtype == torch.float32
        assert table.raw[name].tolist() == pytest.approx(values, rel=1e-6)
        assert table.invalid[name] == 0
    groups = [0, 0, 0, 1, 1, 1]
    total = rs.aggregate(table, torch.tensor(groups))
    expected = []
    for i in range(6):
        s = 0.0
        for name, term in cfg.items():
            r = raw[name] if aggregation == "sum_then_normalize" else _reference_normalize(raw[name], groups)
            s += term.weight * r[i]
        expected.append(s)
    _assert_close_nan(total, expected)


class _Const:
    def __init__(self, out):
        self.out = out

    def __call__(self, samples, prompts, metadata):
        return self.out


def test_invalid_scores_become_nan_and_are_counted():
    bad = _Const([1.0, None, NAN, math.inf, -math.inf, 2.0])
    good = _Const([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        rs = RewardSet([RewardTerm("bad", bad, 1.0), RewardTerm("good", good, 1.0)], aggregation)
        table = rs.score(None, PROMPTS, METADATA)
        assert table.invalid == {"bad": 4, "good": 0}
        _assert_close_nan(table.raw["bad"], [1.0, NAN, NAN, NAN, NAN, 2.0])
        total = rs.aggregate(table, torch.tensor([0, 0, 0, 0, 0, 0]))
        assert torch.isnan(total[1:5]).all()
        assert torch.isfinite(total[[0, 5]]).all()


def test_normalize_then_sum_ignores_samples_masked_by_another_reward():
    bad = _Const([1.0, None, 2.0, 3.0, 4.0, 5.0])
    good = _Const([0.0, 100.0, 1.0, 2.0, 3.0, 4.0])
    rs = RewardSet([RewardTerm("bad", bad, 1.0), RewardTerm("good", good, 1.0)], "normalize_then_sum")
    groups = [0, 0, 0, 1, 1, 1]
    total = rs.aggregate(rs.score(None, PROMPTS, METADATA), torch.tensor(groups))
    # sample 1 is masked: "good"'s group-0 statistics use samples 0 and 2 only, so 100.0 shifts nothing
    g0 = [a + b for a, b in zip(_reference_normalize([1.0, 2.0], [0, 0]), _reference_normalize([0.0, 1.0], [0, 0]))]
    g1 = [a + b for a, b in zip(_reference_normalize([3.0, 4.0, 5.0], [0, 0, 0]),
                                _reference_normalize([2.0, 3.0, 4.0], [0, 0, 0]))]
    _assert_close_nan(total, [g0[0], NAN, g0[1], *g1])


def test_zero_weight_reward_is_logged_but_neither_scores_nor_masks():
    logged = _Const([None, 7.0, 8.0, 9.0, 10.0, 11.0])
    good = _Const([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    rs = RewardSet([RewardTerm("good", good, 2.0), RewardTerm("logged", logged, 0.0)])
    table = rs.score(None, PROMPTS, METADATA)
    assert table.invalid == {"good": 0, "logged": 1}
    _assert_close_nan(rs.aggregate(table, torch.zeros(6, dtype=torch.long)), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])


def test_non_finite_samples_are_masked_under_every_reward_and_not_shown_to_them():
    seen = []

    def mean_pixel(samples, prompts, metadata):
        seen.append(samples.shape[0])
        assert torch.isfinite(samples).all()
        return samples.flatten(1).mean(dim=1)

    images = torch.rand(4, 3, 4, 4)
    images[1, 0, 2, 2] = math.nan
    images[3, 2, 0, 0] = math.inf
    rs = RewardSet([RewardTerm("a", mean_pixel, 1.0), RewardTerm("b", mean_pixel, 1.0)])
    table = rs.score(images, ["p"] * 4, [{}] * 4)
    assert seen == [2, 2]
    assert table.invalid == {"a": 2, "b": 2}
    expected = images.flatten(1).mean(dim=1).tolist()
    _assert_close_nan(table.raw["a"], [expected[0], NAN, expected[2], NAN])


def test_accepted_output_types():
    for out in (torch.tensor([1.0, 2.0]), np.array([1.0, 2.0]), [np.float32(1.0), 2], (1.0, 2.0)):
        table = RewardSet([RewardTerm("r", _Const(out), 1.0)]).score(None, ["a", "b"], [{}, {}])
        assert table.raw["r"].tolist() == [1.0, 2.0]


def _raise(samples, prompts, metadata):
    raise KeyError("missing field 'caption'")


@pytest.mark.parametrize(
    ("fn", "exc", "words"),
    [
        (_Const([1.0, 2.0]), ValueError, ["'myreward'", "2 scores for 3 samples"]),
        (_Const(["good", "bad", "ok"]), ValueError, ["'myreward'", "'good'", "str", "None"]),
        (_Const(torch.zeros(3, 2)), ValueError, ["'myreward'", "(3, 2)", "[3]"]),
        (_Const(1.5), ValueError, ["'myreward'", "float", "list of 3 floats"]),
        (_Const([True, False, True]), ValueError, ["'myreward'", "bool"]),
        (_raise, RuntimeError, ["'myreward'", "KeyError", "caption"]),
    ],
)
def test_reward_errors_name_the_reward(fn, exc: type[Exception], words: list[str]):
    rs = RewardSet([RewardTerm("myreward", fn, 1.0)])
    with pytest.raises(exc) as info:
        rs.score(None, ["a", "b", "c"], [{}, {}, {}])
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_reward_set_rejects_empty_and_unknown_aggregation():
    with pytest.raises(ValueError, match="at least one reward"):
        RewardSet([])
    with pytest.raises(ValueError, match="normalize_then_sum"):
        RewardSet([RewardTerm("r", _Const([1.0]), 1.0)], aggregation="average")
