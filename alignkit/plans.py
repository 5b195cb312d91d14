"""Exploration plans: which denoising steps are policy actions in a rollout.

A plan returns a :class:`PlanSchedule` per iteration. A linear schedule runs one trajectory per initial
noise and explores at ``stochastic_steps`` (Flow-GRPO explores at every step but the last; an empty set is
plain ODE sampling). The last step (sigma -> 0) never explores: its likelihood is degenerate.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from alignkit.registry import EXPLORATION_PLANS


@dataclass(frozen=True)
class PlanSchedule:
    """One iteration's exploration.

    Attributes:
        stochastic_steps: schedule indices that explore along each linear trajectory (sorted).
    """

    stochastic_steps: tuple[int, ...]

    def nfe_per_seed(self, num_steps: int) -> int:
        """Model evaluations per initial noise."""
        return num_steps


class ExplorationPlan(ABC):
    """Decides the exploring steps of each rollout iteration."""

    @abstractmethod
    def schedule(self, num_steps: int, iteration: int, generator: torch.Generator) -> PlanSchedule:
        """The exploration of iteration ``iteration`` for a schedule of ``num_steps`` steps."""

    def validate(self, num_steps: int) -> list[str]:
        """Problems with this plan for a schedule of ``num_steps`` steps (empty when valid)."""
        return []


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


def build_plan(name: str, options: dict[str, Any]) -> ExplorationPlan:
    """Instantiate the plan registered as ``name`` with keyword ``options``."""
    cls = EXPLORATION_PLANS.get(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise ValueError(f"algo.plan.options={options} do not fit plan {name!r}: {exc}") from exc
