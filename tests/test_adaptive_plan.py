"""The adaptive branch budget (``algo.plan.name=adaptive``): a fixed number of branch steps per initial noise,
spread over the steps in proportion to a running estimate of the signal each has shown, with an exploration
floor; deterministic given the seed, its state saved and restored (the resume test is in tests/test_resume.py)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from alignkit.compose import load_run_config
from alignkit.config import ConfigError
from alignkit.plans import Adaptive, Branch, build_plan, inclusion_probabilities, step_signal
from alignkit.registry import EXPLORATION_PLANS, RegistryError
from alignkit.types import Credit, SampleKeys

N = 8  # schedule length: steps 0..6 may branch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_adaptive_is_a_registered_plan_and_its_recipe_composes() -> None:
    assert "adaptive" in EXPLORATION_PLANS.names()
    plan = build_plan("adaptive", {"children": 3, "budget": 2})
    assert isinstance(plan, Adaptive) and plan.validate(N) == []
    with pytest.raises(RegistryError, match="adaptive"):
        EXPLORATION_PLANS.get("adaptiv")
    cfg = load_run_config("default", ["algo=tempflow_grpo_adaptive"])
    assert cfg.algo.plan.name == "adaptive" and cfg.algo.plan.options["budget"] == 3
    assert cfg.algo.credit.group_by == "seed" and cfg.algo.credit.noise_aware


@pytest.mark.parametrize(("option", "value", "message"), [
    ("budget", 0, "algo.plan.options.budget=0: branch 1..7 steps"),
    ("budget", 8, "algo.plan.options.budget=8: branch 1..7 steps"),
    ("min_share", 1.0, "algo.plan.options.min_share=1.0: the exploration floor must be in [0, 1)"),
    ("min_share", -0.1, "min_share=-0.1"),
    ("decay", 1.0, "algo.plan.options.decay=1.0: the EMA decay must be in [0, 1)"),
    ("children", 1, "algo.plan.options.children=1: a seed group needs >= 2 children"),
    ("signal", "variance", "algo.plan.options.signal='variance': use nontied or advantage_var"),
])
def test_bad_settings_are_named_before_any_model_loads(option: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_run_config("default", ["algo=tempflow_grpo_adaptive", f"algo.plan.options.{option}={value}"])
    assert message in str(info.value)
    with pytest.raises(ConfigError, match="do not fit plan 'adaptive'"):
        load_run_config("default", ["algo=tempflow_grpo_adaptive", "+algo.plan.options.m=3"])


def test_every_schedule_spends_the_budget_and_depends_only_on_the_seed() -> None:
    plan = Adaptive(children=4, budget=3)
    plan.estimate = [0.9, 0.1, 0.0, 0.5, 0.3, 0.05, 1.0]
    for seed in range(50):
        s = plan.schedule(N, seed, _gen(seed))
        assert len(s.branch_steps) == 3 == len(set(s.branch_steps)) and s.children == 4
        assert all(0 <= k < N - 1 for k in s.branch_steps) and list(s.branch_steps) == sorted(s.branch_steps)
        assert s == plan.schedule(N, seed, _gen(seed))
        assert s.nfe_per_seed(N) == max(s.branch_steps) + 1 + 4 * sum(N - 1 - k for k in s.branch_steps)
    assert plan.samples_per_seed(N) == 12


def test_steps_are_drawn_in_proportion_to_the_estimate_above_the_floor() -> None:
    plan = Adaptive(budget=2, min_share=0.35)
    plan.estimate = [2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    share = [0.05 + 0.65 * e / 4 for e in plan.estimate]  # floor 0.35 / 7 each, the rest by the estimate
    pi = plan.probabilities(N)
    assert sum(pi) == pytest.approx(2.0)
    assert pi == pytest.approx([2 * x for x in share])  # none exceeds 1 here
    drawn = Counter(k for seed in range(4000) for k in plan.schedule(N, seed, _gen(seed)).branch_steps)
    freq = [drawn[k] / 4000 for k in range(N - 1)]
    assert freq == pytest.approx(pi, abs=0.03)
    assert min(freq) > 0.07, "the floor keeps every step in play (2 x 0.05 = 0.1 each)"
    # a step whose share would exceed one draw per iteration is always taken, the rest spread over the others
    assert inclusion_probabilities([0.9, 0.05, 0.05], 2) == pytest.approx([1.0, 0.5, 0.5])
    assert Adaptive(budget=7).probabilities(N) == pytest.approx([1.0] * 7)


def _observation() -> tuple[SampleKeys, torch.Tensor, Credit]:
    """Step 0: two groups, one tied; step 3: one group, tied; step 5: one group with spread, one sample masked."""
    adv = torch.tensor([0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.5, float("nan"), -0.5])
    keys = SampleKeys(prompt_index=torch.zeros(9, dtype=torch.long), seed_index=torch.zeros(9, dtype=torch.long),
                      branch_step=torch.tensor([0, 0, 0, 0, 3, 3, 5, 5, 5]))
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 3])
    credit = Credit(advantage=torch.zeros(9), weight=torch.ones(9), mask=torch.ones(9, dtype=torch.bool),
                    sample_advantage=adv, zero_std_fraction=0.5)
    return keys, groups, credit


def test_observe_moves_the_estimate_of_the_steps_that_branched() -> None:
    keys, groups, credit = _observation()
    assert step_signal("nontied", keys, credit, groups) == {0: 0.5, 3: 0.0, 5: 1.0}
    # without the assigner's groups, the children of one branch point (prompt, seed, step) form a group
    assert step_signal("nontied", keys, credit) == {0: 1.0, 3: 0.0, 5: 1.0}
    var = step_signal("advantage_var", keys, credit, groups)
    assert var == pytest.approx({0: 0.5, 3: 0.0, 5: 0.25})
    plan = Adaptive(budget=3, decay=0.75)
    schedule = plan.schedule(N, 0, _gen(0))
    plan.observe(schedule, keys, credit, groups)
    assert plan.estimate == pytest.approx([0.875, 1.0, 1.0, 0.75, 1.0, 1.0, 1.0])  # 0.75 e + 0.25 x, e = 1 before
    plan.observe(schedule, keys, credit, groups)
    assert plan.estimate[3] == pytest.approx(0.5625) and plan.estimate[5] == 1.0
    assert plan.metrics()["plan/signal_step3"] == pytest.approx(0.5625)
    # the tied step is now drawn less often than the one with spread
    pi = plan.probabilities(N)
    assert pi[3] < pi[0] < pi[5]


def test_state_round_trips_through_json_and_gives_the_same_schedules() -> None:
    keys, groups, credit = _observation()
    plan = Adaptive(budget=2, decay=0.3)
    plan.observe(plan.schedule(N, 0, _gen(0)), keys, credit, groups)
    saved = json.loads(json.dumps(plan.state_dict()))
    fresh = Adaptive(budget=2, decay=0.3)
    fresh.load_state_dict(saved)
    assert fresh.estimate == plan.estimate  # exactly: JSON keeps every bit of a float
    assert [fresh.schedule(N, e, _gen(e)) for e in range(20)] == [plan.schedule(N, e, _gen(e)) for e in range(20)]
    with pytest.raises(ValueError, match=r"plan state keys \['m'\] are not the adaptive plan's"):
        fresh.load_state_dict({"m": 3})
    with pytest.raises(ValueError, match=r"Branch keeps no state.*another algo.plan.name"):
        Branch().load_state_dict(saved)
    Branch().load_state_dict({})  # a plan without state takes an empty one
    with pytest.raises(ValueError, match="covers 7 branch steps, the schedule has 4"):
        fresh.schedule(5, 0, _gen(0))
