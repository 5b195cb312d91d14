"""The clipped GRPO objective on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from alignkit.config import ObjectiveConfig
from alignkit.objective import grpo_objective


def _t(values: list[float], grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def test_ratio_one_gives_minus_weighted_mean_advantage():
    cfg = ObjectiveConfig(clip_range=1e-4, adv_clip=5.0, beta=0.0)
    logp = _t([-1.0, 0.5, 2.0], grad=True)
    old = _t([-1.0, 0.5, 2.0])
    adv = _t([1.0, -2.0, 0.5])
    weight = _t([1.0, 0.5, 2.0])
    out = grpo_objective(logp, old, adv, weight, None, cfg)
    # -mean(A w) = -(1 * 1 + (-2) * 0.5 + 0.5 * 2) / 3 = -(1 - 1 + 1) / 3 = -1/3
    assert out.policy_loss.item() == pytest.approx(-1.0 / 3.0)
    assert out.loss.item() == pytest.approx(-1.0 / 3.0)
    assert out.ratio_mean.item() == pytest.approx(1.0)
    assert out.clip_fraction.item() == 0.0
    assert out.approx_kl.item() == 0.0
    assert out.kl.item() == 0.0
    out.loss.backward()
    # at r = 1 the unclipped branch is active: d/dlogp (-A w r) / B = -A w / 3
    assert logp.grad.tolist() == pytest.approx([-1.0 / 3.0, 1.0 / 3.0, -1.0 / 3.0])


def _clip_case() -> tuple[torch.Tensor, ...]:
    # eps = 0.2, so clip(r) is in [0.8, 1.2]; weights 1.
    # r     A    -A r   -A clip(r)   max (the pessimistic term)
    # 1.5  +1   -1.5    -1.2        -1.2   (clipped: above 1 + eps with A > 0)
    # 1.5  -1   +1.5    +1.2        +1.5   (unclipped: a bad action made likelier is not clipped)
    # 0.5  +1   -0.5    -0.8        -0.5   (unclipped)
    # 0.5  -2   +1.0    +1.6        +1.6   (clipped: below 1 - eps with A < 0)
    # 1.1  +2   -2.2    -2.2        -2.2   (inside the clip range)
    # mean = (-1.2 + 1.5 - 0.5 + 1.6 - 2.2) / 5 = -0.8 / 5 = -0.16
    ratios = [1.5, 1.5, 0.5, 0.5, 1.1]
    old = _t([0.3, -0.7, 1.2, 0.0, -2.0])
    logp = (old + _t([math.log(r) for r in ratios])).detach().requires_grad_(True)
    adv = _t([1.0, -1.0, 1.0, -2.0, 2.0])
    return logp, old, adv, _t([1.0] * 5)


def test_clipping_in_both_directions():
    cfg = ObjectiveConfig(clip_range=0.2, adv_clip=5.0, beta=0.0)
    logp, old, adv, weight = _clip_case()
    out = grpo_objective(logp, old, adv, weight, None, cfg)
    assert out.policy_loss.item() == pytest.approx(-0.16)
    assert out.loss.item() == pytest.approx(-0.16)
    # four of the five ratios are outside [0.8, 1.2]
    assert out.clip_fraction.item() == pytest.approx(0.8)
    # (1.5 + 1.5 + 0.5 + 0.5 + 1.1) / 5 = 1.02
    assert out.ratio_mean.item() == pytest.approx(1.02)
    # 0.5 mean(log r ^ 2) = 0.5 (2 ln(1.5)^2 + 2 ln(0.5)^2 + ln(1.1)^2) / 5
    ln = math.log
    assert out.approx_kl.item() == pytest.approx(0.5 * (2 * ln(1.5) ** 2 + 2 * ln(0.5) ** 2 + ln(1.1) ** 2) / 5)
    out.loss.backward()
    # gradient flows only where the unclipped term is the max: d(-A r)/dlogp = -A r, divided by B = 5
    # rows: clipped -> 0; -(-1)(1.5)/5 = 0.3; -(1)(0.5)/5 = -0.1; clipped -> 0; -(2)(1.1)/5 = -0.44
    assert logp.grad.tolist() == pytest.approx([0.0, 0.3, -0.1, 0.0, -0.44])


def test_weights_scale_policy_terms():
    cfg = ObjectiveConfig(clip_range=0.2, adv_clip=5.0, beta=0.0)
    logp, old, adv, _ = _clip_case()
    weight = _t([2.0, 0.0, 1.0, 0.5, 1.0])
    out = grpo_objective(logp, old, adv, weight, None, cfg)
    # (2 (-1.2) + 0 (1.5) + 1 (-0.5) + 0.5 (1.6) + 1 (-2.2)) / 5 = (-2.4 - 0.5 + 0.8 - 2.2) / 5 = -4.3 / 5
    assert out.policy_loss.item() == pytest.approx(-0.86)


def test_advantage_is_clamped():
    cfg = ObjectiveConfig(clip_range=1e-4, adv_clip=5.0, beta=0.0)
    logp = _t([0.0, 0.0, 0.0, 0.0], grad=True)
    adv = _t([10.0, -7.0, 3.0, 5.0])
    out = grpo_objective(logp, logp.detach().clone(), adv, _t([1.0] * 4), None, cfg)
    # A -> [5, -5, 3, 5]: -(5 - 5 + 3 + 5) / 4 = -2
    assert out.policy_loss.item() == pytest.approx(-2.0)
    cfg2 = ObjectiveConfig(clip_range=1e-4, adv_clip=1.0, beta=0.0)
    out2 = grpo_objective(logp, logp.detach().clone(), adv, _t([1.0] * 4), None, cfg2)
    # A -> [1, -1, 1, 1]: -(1 - 1 + 1 + 1) / 4 = -0.5
    assert out2.policy_loss.item() == pytest.approx(-0.5)
    # the caller's advantage tensor is not modified
    assert adv.tolist() == [10.0, -7.0, 3.0, 5.0]


def test_kl_penalty_is_added_unweighted():
    cfg = ObjectiveConfig(clip_range=1e-4, adv_clip=5.0, beta=0.5)
    logp = _t([0.1, 0.2, 0.3], grad=True)
    kl = _t([0.2, 0.4, 0.9], grad=True)
    weight = _t([2.0, 0.0, 1.0])
    out = grpo_objective(logp, logp.detach().clone(), _t([1.0, 1.0, 1.0]), weight, kl, cfg)
    # policy: -(2 + 0 + 1) / 3 = -1; KL: mean = 1.5 / 3 = 0.5, not weighted; loss = -1 + 0.5 * 0.5 = -0.75
    assert out.policy_loss.item() == pytest.approx(-1.0)
    assert out.kl.item() == pytest.approx(0.5)
    assert out.loss.item() == pytest.approx(-0.75)
    out.loss.backward()
    assert kl.grad.tolist() == pytest.approx([0.5 / 3] * 3)


def test_diagnostics_carry_no_graph_and_gradient_reaches_only_log_prob():
    cfg = ObjectiveConfig(clip_range=0.2, adv_clip=5.0, beta=0.0)
    logp, old, adv, weight = _clip_case()
    out = grpo_objective(logp, old, adv, weight, None, cfg)
    assert out.loss.requires_grad
    for name in ("policy_loss", "kl", "ratio_mean", "clip_fraction", "approx_kl"):
        value = getattr(out, name)
        assert value.dim() == 0, name
        assert not value.requires_grad, name
    out.loss.backward()
    assert logp.grad is not None
    assert old.grad is None and adv.grad is None and weight.grad is None
