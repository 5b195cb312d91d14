"""Exploration plans: which denoising steps are policy actions in a rollout.

A plan returns a :class:`PlanSchedule` per iteration, of one of two shapes:

* **linear**: one trajectory per initial noise that explores at ``stochastic_steps`` and is
  deterministic elsewhere. Flow-GRPO / DanceGRPO explore at every step but the last; the window plan
  of Flow-GRPO-Fast / MixGRPO explores inside ``size`` consecutive steps; an empty set is ODE sampling.
* **branching** (TempFlow-GRPO): a deterministic trunk per initial noise; at each of ``branch_steps``
  the trunk state gets ``children`` stochastic one-step children, each finished deterministically. A
  child's reward credits its branch step only.

The last step (sigma -> 0) never explores: its likelihood is degenerate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.registry import EXPLORATION_PLANS


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


def build_plan(name: str, options: dict[str, Any]) -> ExplorationPlan:
    """Instantiate the plan registered as ``name`` with keyword ``options``."""
    cls = EXPLORATION_PLANS.get(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise ValueError(f"algo.plan.options={options} do not fit plan {name!r}: {exc}") from exc
