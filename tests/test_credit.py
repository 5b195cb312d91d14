"""Group advantages and credit assignment against plain-Python reference computations."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict

import pytest
import torch

from alignkit.config import CreditConfig
from alignkit.credit import GroupCredit, build_credit, group_ids, group_normalize
from alignkit.types import SampleKeys, Transitions

EPS = 1e-4


def reference_normalize(
    scores: list[float], groups: list[int], std: str = "group", eps: float = EPS
) -> tuple[list[float], float]:
    """(score - group mean) / (std + eps), NaN scores ignored and kept NaN; zero-std fraction of groups."""
    by_group: dict[int, list[float]] = defaultdict(list)
    for s, g in zip(scores, groups):
        if not math.isnan(s):
            by_group[g].append(s)
    valid = [s for s in scores if not math.isnan(s)]
    global_std = statistics.pstdev(valid) if valid else 0.0
    out = []
    for s, g in zip(scores, groups):
        if math.isnan(s):
            out.append(math.nan)
            continue
        denom = statistics.pstdev(by_group[g]) if std == "group" else global_std
        out.append((s - statistics.fmean(by_group[g])) / (denom + eps))
    zero = [statistics.pstdev(v) == 0 for v in by_group.values()]
    return out, (sum(zero) / len(zero) if zero else 0.0)


def _assert_matches(actual: torch.Tensor, expected: list[float]) -> None:
    assert actual.shape == (len(expected),)
    for a, e in zip(actual.tolist(), expected):
        if math.isnan(e):
            assert math.isnan(a)
        else:
            assert a == pytest.approx(e, rel=1e-5, abs=1e-5)


NAN = math.nan
# group 0: spread with one NaN; group 1: equal scores (zero std); group 2: all NaN (no valid score, not
# counted); group 3: two scores; group 4: a single valid score (zero std).
HAND_SCORES = [1.0, 2.0, 4.0, NAN, 3.0, 3.0, 3.0, NAN, NAN, 0.5, -1.5, 7.0, NAN]
HAND_GROUPS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4]


@pytest.mark.parametrize("std", ["group", "global"])
def test_group_normalize_hand_case(std: str):
    out, zero = group_normalize(torch.tensor(HAND_SCORES), torch.tensor(HAND_GROUPS), std=std, eps=EPS)
    expected, expected_zero = reference_normalize(HAND_SCORES, HAND_GROUPS, std)
    _assert_matches(out, expected)
    assert out.dtype == torch.float32
    # groups 1 and 4 have zero spread among the 4 groups with a valid score
    assert expected_zero == pytest.approx(0.5)
    assert zero == pytest.approx(expected_zero)
    # equal scores give exactly zero advantage
    assert out[4:7].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("std", ["group", "global"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_normalize_random(std: str, seed: int):
    g = torch.Generator().manual_seed(seed)
    n = 40
    scores = (torch.randn(n, generator=g) * 3 + 1).tolist()
    groups = torch.randint(0, 7, (n,), generator=g).tolist()
    for i in torch.randperm(n, generator=g)[:6].tolist():
        scores[i] = NAN
    # make group ids contiguous (every id 0..G-1 used), as group_ids produces
    remap = {old: new for new, old in enumerate(sorted(set(groups)))}
    groups = [remap[x] for x in groups]
    out, zero = group_normalize(torch.tensor(scores), torch.tensor(groups), std=std, eps=EPS)
    expected, expected_zero = reference_normalize(scores, groups, std)
    _assert_matches(out, expected)
    assert zero == pytest.approx(expected_zero)


def test_group_normalize_custom_eps_and_bad_mode():
    scores, groups = [0.0, 1.0], [0, 0]
    out, _ = group_normalize(torch.tensor(scores), torch.tensor(groups), eps=0.5)
    # mean 0.5, pstdev 0.5 -> (+-0.5) / (0.5 + 0.5)
    assert out.tolist() == pytest.approx([-0.5, 0.5])
    with pytest.raises(ValueError, match="std='nope'"):
        group_normalize(torch.tensor(scores), torch.tensor(groups), std="nope")


def test_group_normalize_all_nan():
    out, zero = group_normalize(torch.tensor([NAN, NAN, NAN]), torch.tensor([0, 0, 1]), std="global")
    assert torch.isnan(out).all()
    assert zero == 0.0


def _keys() -> SampleKeys:
    return SampleKeys(
        prompt_index=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 0, 0]),
        seed_index=torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 0, 1]),
        branch_step=torch.tensor([2, 2, 2, 2, 2, 2, 2, 2, 3, 3]),
    )


def _partition(ids: torch.Tensor) -> set[frozenset[int]]:
    members: dict[int, set[int]] = defaultdict(set)
    for i, g in enumerate(ids.tolist()):
        members[g].add(i)
    return {frozenset(m) for m in members.values()}


def test_group_ids_prompt_vs_seed():
    keys = _keys()
    prompt = group_ids(keys, "prompt")
    seed = group_ids(keys, "seed")
    assert prompt.dtype == torch.long and prompt.shape == (10,)
    # prompt groups: (prompt, branch step); seed groups: (prompt, seed, branch step)
    assert _partition(prompt) == {frozenset({0, 1, 2, 3}), frozenset({4, 5, 6, 7}), frozenset({8, 9})}
    assert _partition(seed) == {
        frozenset({0, 1}), frozenset({2, 3}), frozenset({4, 5}), frozenset({6, 7}), frozenset({8}), frozenset({9}),
    }
    # ids are contiguous 0..G-1 (group_normalize sizes its tables by max id + 1)
    assert sorted(set(prompt.tolist())) == [0, 1, 2]
    assert sorted(set(seed.tolist())) == list(range(6))


def test_group_ids_linear_trajectories_group_by_prompt():
    keys = SampleKeys(
        prompt_index=torch.tensor([2, 0, 2, 0, 1]),
        seed_index=torch.tensor([0, 0, 1, 1, 0]),
        branch_step=torch.full((5,), -1),
    )
    assert _partition(group_ids(keys, "prompt")) == {frozenset({0, 2}), frozenset({1, 3}), frozenset({4})}
    with pytest.raises(ValueError, match="group_by='step'"):
        group_ids(keys, "step")


def _transitions(sample_index: list[int], scale: list[float]) -> Transitions:
    m = len(sample_index)
    return Transitions(
        state=torch.zeros(m, 2), next_state=torch.zeros(m, 2), step=torch.arange(m) % 3,
        log_prob=torch.zeros(m), scale=torch.tensor(scale), sample_index=torch.tensor(sample_index),
    )


@pytest.mark.parametrize("group_by", ["prompt", "seed"])
@pytest.mark.parametrize("noise_aware", [False, True])
def test_group_credit_assign(group_by: str, noise_aware: bool):
    keys = _keys()
    score = [1.0, 3.0, 2.0, NAN, 0.5, 0.5, -1.0, 4.0, 2.0, 1.0]
    # two transitions per sample except sample 9 (one), in a shuffled order; sample 3 is masked
    sample_index = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    scale = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    cfg = CreditConfig(group_by=group_by, std="group", eps=EPS, noise_aware=noise_aware)
    assigner = build_credit(cfg)
    assert isinstance(assigner, GroupCredit)
    credit = assigner.assign(torch.tensor(score), keys, _transitions(sample_index, scale))

    groups = {
        "prompt": [0, 0, 0, 0, 1, 1, 1, 1, 2, 2],
        "seed": [0, 0, 1, 1, 2, 2, 3, 3, 4, 5],
    }[group_by]
    sample_adv, zero = reference_normalize(score, groups)
    _assert_matches(credit.sample_advantage, sample_adv)
    assert credit.zero_std_fraction == pytest.approx(zero)

    mask = [not math.isnan(sample_adv[i]) for i in sample_index]
    assert credit.mask.dtype == torch.bool
    assert credit.mask.tolist() == mask
    expected_adv = [sample_adv[i] if ok else 0.0 for i, ok in zip(sample_index, mask)]
    assert credit.advantage.tolist() == pytest.approx(expected_adv, rel=1e-5, abs=1e-5)
    assert not torch.isnan(credit.advantage).any()

    if noise_aware:
        ref = statistics.fmean(s for s, ok in zip(scale, mask) if ok)
        assert credit.weight.tolist() == pytest.approx([s / ref for s in scale], rel=1e-5)
        assert credit.weight[credit.mask].mean().item() == pytest.approx(1.0, rel=1e-5)
    else:
        assert credit.weight.tolist() == [1.0] * len(sample_index)


def test_group_credit_global_std():
    keys = _keys()
    score = [1.0, 3.0, 2.0, 5.0, 0.5, 0.5, -1.0, 4.0, 2.0, 1.0]
    credit = GroupCredit(CreditConfig(group_by="prompt", std="global")).assign(
        torch.tensor(score), keys, _transitions(list(range(10)), [1.0] * 10)
    )
    expected, _ = reference_normalize(score, [0, 0, 0, 0, 1, 1, 1, 1, 2, 2], "global")
    _assert_matches(credit.advantage, expected)


def test_noise_aware_needs_positive_scale():
    keys = _keys()
    cfg = CreditConfig(noise_aware=True)
    with pytest.raises(ValueError, match="positive std"):
        GroupCredit(cfg).assign(torch.arange(10.0), keys, _transitions(list(range(10)), [0.0] * 10))
