"""Exploration plans: which denoising steps are policy actions in a rollout.

A plan returns a :class:`PlanSchedule` per iteration, of one of two shapes:

* **linear**: one trajectory per initial noise that explores at ``stochastic_steps`` and is
  deterministic elsewhere. Flow-GRPO / DanceGRPO explore at every step but the last; the window plan
  of Flow-GRPO-Fast / MixGRPO explores inside ``size`` consecutive steps; an empty set is ODE sampling.
* **branching** (TempFlow-GRPO): a deterministic trunk per initial noise; at each of ``branch_steps``
  the trunk state gets ``children`` stochastic one-step children, each finished deterministically. A
  child's reward credits its branch step only.

The last step (sigma -> 0) never explores: its likelihood is degenerate.

A plan may learn from the rollouts it planned: after credit assignment the trainer calls
:meth:`ExplorationPlan.observe` with the epoch's schedule, keys, credit and groups (the same on every
process); such a plan's state is saved in checkpoints (:meth:`~ExplorationPlan.state_dict`) and restored on
resume. :class:`Adaptive` is one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.credit import group_ids
from alignkit.registry import EXPLORATION_PLANS
from alignkit.types import Credit, SampleKeys


@dataclass(frozen=True)
class PlanSchedule:
    """One iteration's exploration.

    Attributes:
        stochastic_steps: linear plans: the exploring schedule indices (sorted).
        branch_steps: branching plans: the trunk steps that branch (sorted); None for a linear plan.
        children: branching plans: stochastic children per branch step and initial noise (K).
    """

    stochastic_steps: tuple[int, ...] = ()
    branch_steps: tuple[int, ...] | None = None
    children: int = 1

    @property
    def branching(self) -> bool:
        return self.branch_steps is not None

    def samples_per_seed(self) -> int:
        """Scored samples per initial noise."""
        return len(self.branch_steps) * self.children if self.branch_steps is not None else 1

    def nfe_per_seed(self, num_steps: int) -> int:
        """Model evaluations per initial noise.

        Linear: ``N``. Branching: the trunk runs up to and including the last branch step (``max k + 1``
        evaluations; at a branch step its one evaluation also gives the children's distribution) and each
        child of step ``k`` evaluates steps ``k + 1 .. N - 1``: ``max k + 1 + K * sum_k (N - 1 - k)``.
        """
        if self.branch_steps is None:
            return num_steps
        if not self.branch_steps:
            return 0
        return max(self.branch_steps) + 1 + self.children * sum(num_steps - 1 - k for k in self.branch_steps)

    def trained_steps(self) -> tuple[int, ...]:
        """The schedule indices whose transitions are stored (and train)."""
        return self.branch_steps if self.branch_steps is not None else self.stochastic_steps


class ExplorationPlan(ABC):
    """Decides the exploring steps of each rollout iteration."""

    @abstractmethod
    def schedule(self, num_steps: int, iteration: int, generator: torch.Generator) -> PlanSchedule:
        """The exploration of iteration ``iteration`` for a schedule of ``num_steps`` steps."""

    def validate(self, num_steps: int) -> list[str]:
        """Problems with this plan for a schedule of ``num_steps`` steps (empty when valid)."""
        return []

    def samples_per_seed(self, num_steps: int) -> int:
        """Scored samples per initial noise (constant across iterations)."""
        return self.schedule(num_steps, 0, torch.Generator().manual_seed(0)).samples_per_seed()

    def observe(self, schedule: PlanSchedule, keys: SampleKeys, credit: Credit,
                groups: torch.Tensor | None = None) -> None:
        """Feedback after credit assignment of an iteration planned by ``schedule``: the ``keys`` of all its
        samples, their ``credit`` and ``groups`` (``[S]`` the credit assigner's group ids; None: each branch
        point's children, :func:`alignkit.credit.group_ids` by ``seed``). Default: nothing to learn."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """What :meth:`observe` learned, as JSON data (saved in checkpoints). Default: nothing."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (from a checkpoint)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds plan state with keys "
                             f"{sorted(state)}: it was written with another algo.plan.name; resume with that plan "
                             "or start a new output_dir")

    def metrics(self) -> dict[str, float]:
        """``plan/*`` metrics of the plan's state, logged every epoch. Default: none."""
        return {}


@EXPLORATION_PLANS.register("all_stochastic")
class AllStochastic(ExplorationPlan):
    """Every step but the last explores (Flow-GRPO, DanceGRPO)."""

    def schedule(self, num_steps: int, iteration: int, generator: torch.Generator) -> PlanSchedule:
        return PlanSchedule(stochastic_steps=tuple(range(num_steps - 1)))


@EXPLORATION_PLANS.register("deterministic")
class Deterministic(ExplorationPlan):
    """No step explores: ODE / argmax sampling, for evaluation."""

    def schedule(self, num_steps: int, iteration: int, generator: torch.Generator) -> PlanSchedule:
        return PlanSchedule(stochastic_steps=())


def window_start(num_steps: int, size: int, iteration: int, generator: torch.Generator, *, start: str,
                 shift_every: int, max_start: int | None) -> int:
    """First step of a ``size``-step window inside the explorable steps ``0 .. N-2``.

    ``random``: uniform over the allowed starts each iteration (Flow-GRPO-Fast). ``progressive``: starts
    at the noisiest step and moves one step towards low noise every ``shift_every`` iterations,
    wrapping around (MixGRPO's sliding window).
    """
    last = num_steps - 1 - size  # largest start keeping the window off the final step
    if max_start is not None:
        last = min(last, max_start)
    if start == "random":
        return int(torch.randint(0, last + 1, (1,), generator=generator))
    if start == "progressive":
        return (iteration // shift_every) % (last + 1)
    raise ValueError(f"algo.plan.options.start={start!r}: use 'random' or 'progressive'")


def _window_problems(num_steps: int, size: int, start: str, shift_every: int) -> list[str]:
    problems = []
    if not 1 <= size <= num_steps - 1:
        problems.append(f"algo.plan.options.size={size}: the window must hold 1..{num_steps - 1} steps for "
                        f"backbone.num_steps={num_steps}")
    if start not in ("random", "progressive"):
        problems.append(f"algo.plan.options.start={start!r}: use 'random' or 'progressive'")
    if shift_every < 1:
        problems.append(f"algo.plan.options.shift_every={shift_every}: must be >= 1")
    return problems


@EXPLORATION_PLANS.register("window")
class Window(ExplorationPlan):
    """Explore inside ``size`` consecutive steps, ODE outside (Flow-GRPO-Fast, MixGRPO).

    Args:
        size: window length ``w``.
        start: ``random`` (a new start each iteration) or ``progressive`` (high to low noise over training).
        shift_every: iterations per one-step move of a progressive window.
        max_start: optional cap on the window start (e.g. only the noisier half of the schedule).
    """

    def __init__(self, size: int = 2, start: str = "random", shift_every: int = 1, max_start: int | None = None):
        self.size, self.start, self.shift_every, self.max_start = size, start, shift_every, max_start

    def validate(self, num_steps: int) -> list[str]:
        return _window_problems(num_steps, self.size, self.start, self.shift_every)

    def schedule(self, num_steps: int, iteration: int, generator: torch.Generator) -> PlanSchedule:
        s = window_start(num_steps, self.size, iteration, generator, start=self.start,
                         shift_every=self.shift_every, max_start=self.max_start)
        return PlanSchedule(stochastic_steps=tuple(range(s, s + self.size)))


@EXPLORATION_PLANS.register("branch")
class Branch(ExplorationPlan):
    """TempFlow-GRPO trajectory branching with a budgeted branch-step schedule.

    Args:
        children: stochastic children ``K`` per branch step and initial noise.
        select: which trunk steps branch: ``all`` (every step but the last, the released method),
            ``fixed`` (``steps``), ``random`` (``m`` distinct steps drawn each iteration) or ``window``
            (``size`` consecutive steps placed as in :class:`Window`).
        steps: the branch steps for ``select=fixed``.
        m: branch steps per iteration for ``select=random``.
        size, start, shift_every, max_start: the window for ``select=window``.
    """

    def __init__(self, children: int = 6, select: str = "all", steps: Sequence[int] | None = None,
                 m: int | None = None, size: int = 2, start: str = "progressive", shift_every: int = 1,
                 max_start: int | None = None) -> None:
        self.children, self.select, self.steps, self.m = children, select, steps, m
        self.size, self.start, self.shift_every, self.max_start = size, start, shift_every, max_start

    def validate(self, num_steps: int) -> list[str]:
        problems = []
        if self.children < 2:
            problems.append(f"algo.plan.options.children={self.children}: a seed group needs >= 2 children "
                            "to normalise advantages; set 2 or more")
        explorable = num_steps - 1
        if self.select == "fixed":
            steps = list(self.steps or [])
            bad = [k for k in steps if not 0 <= k < explorable]
            if not steps:
                problems.append("algo.plan.options.steps is empty: list the branch steps for select=fixed")
            if bad:
                problems.append(f"algo.plan.options.steps={steps}: steps {bad} are outside the schedule; branch "
                                f"steps must be in 0..{explorable - 1} for backbone.num_steps={num_steps}")
            if len(set(steps)) != len(steps):
                problems.append(f"algo.plan.options.steps={steps}: repeated steps; list each step once")
        elif self.select == "random":
            if self.m is None or not 1 <= self.m <= explorable:
                problems.append(f"algo.plan.options.m={self.m}: pick 1..{explorable} branch steps per iteration "
                                f"for backbone.num_steps={num_steps}")
        elif self.select == "window":
            problems += _window_problems(num_steps, self.size, self.start, self.shift_every)
        elif self.select != "all":
            problems.append(f"algo.plan.options.select={self.select!r}: use all, fixed, random or window")
        return problems

    def schedule(self, num_steps: int, iteration: int, generator: torch.Generator) -> PlanSchedule:
        explorable = num_steps - 1
        if self.select == "all":
            steps = list(range(explorable))
        elif self.select == "fixed":
            steps = sorted(self.steps or [])
        elif self.select == "random":
            steps = sorted(torch.randperm(explorable, generator=generator)[: self.m].tolist())
        elif self.select == "window":
            s = window_start(num_steps, self.size, iteration, generator, start=self.start,
                             shift_every=self.shift_every, max_start=self.max_start)
            steps = list(range(s, s + self.size))
        else:
            raise ValueError(f"algo.plan.options.select={self.select!r}: use all, fixed, random or window")
        return PlanSchedule(branch_steps=tuple(steps), children=self.children)


SIGNALS = ("nontied", "advantage_var")

PLAN_METRICS: dict[str, str] = {
    "plan/signal_step{name}": "Adaptive branch plan: the running estimate of the signal branch step `{name}` has "
        "shown (the step index), which sets how often it branches.",
}
"""The ``plan/*`` keys of ``metrics.jsonl`` (adaptive plan only), in the form of :data:`alignkit.metrics.METRICS`."""


def step_signal(signal: str, keys: SampleKeys, credit: Credit, groups: torch.Tensor | None = None) -> dict[int, float]:
    """Per branch step of ``keys``, the learning signal its groups showed.

    ``nontied``: the fraction of groups (with a valid reward) whose advantages are not all exactly 0, i.e. whose
    rewards did not tie. ``advantage_var``: the mean squared advantage of the step's valid samples (their
    variance: group advantages have mean 0). ``groups``: ``[S]`` group ids (None: by prompt, seed and branch step).
    """
    if groups is None:
        groups = group_ids(keys, "seed")
    adv = credit.sample_advantage.double()  # [S], NaN where masked
    valid = ~torch.isnan(adv)
    out: dict[int, float] = {}
    for k in torch.unique(keys.branch_step).tolist():
        at = (keys.branch_step == k) & valid  # [S]
        if not bool(at.any()):
            continue
        if signal == "nontied":
            moving = torch.unique(groups[at & (adv != 0)])
            out[int(k)] = len(moving) / len(torch.unique(groups[at]))
        elif signal == "advantage_var":
            out[int(k)] = float((adv[at] ** 2).mean())
        else:
            raise ValueError(f"algo.plan.options.signal={signal!r}: use {' or '.join(SIGNALS)}")
    return out


def inclusion_probabilities(share: Sequence[float], budget: int) -> list[float]:
    """Probabilities ``pi`` (each <= 1, summing to ``budget``) proportional to ``share`` where possible: steps
    whose ``budget * share`` exceeds 1 are always taken and the rest of the budget is spread over the others."""
    pi = [0.0] * len(share)
    free = list(range(len(share)))
    left = float(budget)
    while free:
        total = sum(share[j] for j in free)
        scaled = {j: left * share[j] / total if total > 0 else left / len(free) for j in free}
        full = [j for j in free if scaled[j] >= 1.0]
        if not full:
            for j in free:
                pi[j] = scaled[j]
            break
        for j in full:
            pi[j] = 1.0
        left -= len(full)
        free = [j for j in free if j not in full]
    return pi


def systematic_sample(pi: Sequence[float], generator: torch.Generator) -> list[int]:
    """Indices drawn by systematic sampling: index ``j`` is taken with probability exactly ``pi[j]`` (each
    ``pi <= 1``, their sum an integer ``n``), ``n`` distinct indices in all, from one uniform draw."""
    n = round(sum(pi))
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    chosen: list[int] = []
    low = 0.0
    for j, p in enumerate(pi):
        high = low + p
        # the points u, u + 1, ..., u + n - 1 that fall in [low, high): at most one, as p <= 1
        if math.ceil(high - u) > math.ceil(low - u) and len(chosen) < n:
            chosen.append(j)
        low = high
    if len(chosen) < n:  # rounding left the last point just past the end: the last positive index owns it
        rest = [j for j in range(len(pi)) if pi[j] > 0 and j not in chosen]
        chosen += rest[len(rest) - (n - len(chosen)):]
    return sorted(chosen)


@EXPLORATION_PLANS.register("adaptive")
class Adaptive(ExplorationPlan):
    """TempFlow-GRPO branching that spends a fixed budget of branch steps where the signal has been.

    Every iteration each initial noise branches at ``budget`` of the ``N - 1`` explorable steps (``children``
    children each: ``budget`` branch points per initial noise, the same count every epoch). Step ``j`` is taken
    with probability ``pi_j = budget * p_j`` (capped at 1, the excess spread over the others; systematic
    sampling, one uniform draw from the iteration's generator), where

    ``p_j = min_share / (N - 1) + (1 - min_share) * e_j / sum(e)``

    and ``e_j`` is a running estimate (EMA with ``decay``) of the ``signal`` step ``j`` showed when it branched:
    ``nontied``, the fraction of its groups whose rewards did not tie, or ``advantage_var``, its mean squared
    advantage (:func:`step_signal`). Steps start at ``e_j = 1`` (optimistic: every step is tried), and a step
    not taken keeps its estimate. ``min_share`` is the exploration floor: no step's probability falls below
    ``budget * min_share / (N - 1)``. The schedule depends only on the seed and the observed credit; the
    estimates are saved in checkpoints.

    Args:
        children: stochastic children ``K`` per branch point.
        budget: branch steps per initial noise and iteration, ``1 <= budget <= N - 1``.
        min_share: exploration floor in ``[0, 1)``.
        decay: EMA decay in ``[0, 1)`` (0: the last observation only).
        signal: ``nontied`` or ``advantage_var``.
    """

    def __init__(self, children: int = 6, budget: int = 3, min_share: float = 0.2, decay: float = 0.8,
                 signal: str = "nontied") -> None:
        self.children, self.budget, self.min_share, self.decay, self.signal = (
            children, budget, min_share, decay, signal)
        self.estimate: list[float] | None = None  # e_j per explorable step; None: all 1 (nothing observed yet)
        self._num_steps: int | None = None  # the schedule length of the last schedule() (configuration, not state)

    def validate(self, num_steps: int) -> list[str]:
        problems = []
        explorable = num_steps - 1
        if not isinstance(self.children, int) or self.children < 2:
            problems.append(f"algo.plan.options.children={self.children}: a seed group needs >= 2 children to "
                            "normalise advantages; set 2 or more")
        if not isinstance(self.budget, int) or not 1 <= self.budget <= explorable:
            problems.append(f"algo.plan.options.budget={self.budget}: branch 1..{explorable} steps per initial noise "
                            f"for backbone.num_steps={num_steps} (the last step never branches)")
        if not isinstance(self.min_share, (int, float)) or not 0 <= self.min_share < 1:
            problems.append(f"algo.plan.options.min_share={self.min_share}: the exploration floor must be in [0, 1) "
                            "(e.g. 0.2; 0 lets a step without signal starve)")
        if not isinstance(self.decay, (int, float)) or not 0 <= self.decay < 1:
            problems.append(f"algo.plan.options.decay={self.decay}: the EMA decay must be in [0, 1) (e.g. 0.8)")
        if self.signal not in SIGNALS:
            problems.append(f"algo.plan.options.signal={self.signal!r}: use {' or '.join(SIGNALS)}")
        return problems

    def _estimates(self, num_steps: int) -> list[float]:
        if self.estimate is None:
            return [1.0] * (num_steps - 1)
        if len(self.estimate) != num_steps - 1:
            raise ValueError(f"the adaptive plan's state covers {len(self.estimate)} branch steps, the schedule has "
                             f"{num_steps - 1} (backbone.num_steps={num_steps}); resume with the run's num_steps")
        return self.estimate

    def probabilities(self, num_steps: int) -> list[float]:
        """``pi_j``, the probability that step ``j`` branches in the next iteration (they sum to ``budget``)."""
        e = self._estimates(num_steps)
        n, total = len(e), sum(e)
        share = [self.min_share / n + (1 - self.min_share) * (x / total if total > 0 else 1 / n) for x in e]
        return inclusion_probabilities(share, self.budget)

    def schedule(self, num_steps: int, iteration: int, generator: torch.Generator) -> PlanSchedule:
        self._num_steps = num_steps
        steps = systematic_sample(self.probabilities(num_steps), generator)
        return PlanSchedule(branch_steps=tuple(steps), children=self.children)

    def samples_per_seed(self, num_steps: int) -> int:
        return self.budget * self.children

    def observe(self, schedule: PlanSchedule, keys: SampleKeys, credit: Credit,
                groups: torch.Tensor | None = None) -> None:
        """Move the estimate of every step that branched towards the signal it showed."""
        if schedule.branch_steps is None or self._num_steps is None:
            raise ValueError("the adaptive plan observes the branching rollouts it scheduled: call schedule() first")
        e = list(self._estimates(self._num_steps))
        for k, value in step_signal(self.signal, keys, credit, groups).items():
            e[k] = self.decay * e[k] + (1 - self.decay) * value
        self.estimate = e

    def state_dict(self) -> dict[str, Any]:
        return {"estimate": list(self.estimate)} if self.estimate is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = sorted(set(state) - {"estimate"})
        if unknown:
            raise ValueError(f"plan state keys {unknown} are not the adaptive plan's (estimate): the checkpoint was "
                             "written with another algo.plan.name; resume with that plan or start a new output_dir")
        est = state.get("estimate")
        self.estimate = [float(x) for x in est] if est is not None else None

    def metrics(self) -> dict[str, float]:
        if self.estimate is None:
            return {}
        return {f"plan/signal_step{j}": x for j, x in enumerate(self.estimate)}


def build_plan(name: str, options: dict[str, Any]) -> ExplorationPlan:
    """Instantiate the plan registered as ``name`` with keyword ``options``."""
    cls = EXPLORATION_PLANS.get(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise ValueError(f"algo.plan.options={options} do not fit plan {name!r}: {exc}") from exc
