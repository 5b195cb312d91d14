"""Typed containers passed between the rollout engine, rewards, credit assignment and the objective.

Shapes use: ``S`` samples (finished trajectories or branch children), ``M`` stored transitions (policy
actions), ``P`` prompts in the rollout, ``...`` the sampler's state shape (latents ``[C, H, W]`` for
images, ``[C, F, H, W]`` for video, ``[L]`` token ids for discrete models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch

Conditioning = dict[str, torch.Tensor]
"""Prompt conditioning produced by a sampler: every tensor is batch-first ``[P, ...]``."""


def map_batch(cond: Conditioning, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
    """Apply ``fn`` to every tensor of a conditioning dict."""
    return {key: fn(value) for key, value in cond.items()}


def index_batch(cond: Conditioning, index: torch.Tensor) -> Conditioning:
    """Select rows ``index`` (``[B]`` long) of every tensor in ``cond``."""
    return map_batch(cond, lambda t: t.index_select(0, index.to(t.device)))


@dataclass
class SampleKeys:
    """Identity of every sample, the structure credit assignment groups by.

    Attributes:
        prompt_index: ``[S]`` long, row into the rollout's prompt list.
        seed_index: ``[S]`` long, which initial noise of its prompt the sample started from.
        branch_step: ``[S]`` long, the step its only policy action was taken at, or -1 for a linear
            trajectory (Flow-GRPO) whose stochastic steps all share the sample's reward.
    """

    prompt_index: torch.Tensor
    seed_index: torch.Tensor
    branch_step: torch.Tensor

    def __len__(self) -> int:
        return int(self.prompt_index.shape[0])


@dataclass
class Transitions:
    """Stored policy actions of a rollout, flat over samples and steps.

    Attributes:
        state: ``[M, ...]`` state before the step.
        next_state: ``[M, ...]`` state after the step (the sampled action).
        step: ``[M]`` long, index of the step in the sampling schedule.
        log_prob: ``[M]`` float32 log-prob under the policy that sampled it (no grad).
        scale: ``[M]`` float32 exploration scale of the step (the transition std for flows); the
            noise-aware weighting uses it.
        sample_index: ``[M]`` long, the sample (row of the reward table) the action belongs to.
        input_id: ``[M]`` long, equal for transitions that share their input (state, step and conditioning):
            the ``K`` children of one branch point; unique otherwise (every Flow-GRPO transition has its own).
            The update evaluates each input once (:mod:`alignkit.update`). Default (None): all unique.
    """

    state: torch.Tensor
    next_state: torch.Tensor
    step: torch.Tensor
    log_prob: torch.Tensor
    scale: torch.Tensor
    sample_index: torch.Tensor
    input_id: torch.Tensor = None  # type: ignore[assignment]  # filled in __post_init__

    def __post_init__(self) -> None:
        if self.input_id is None:
            self.input_id = torch.arange(len(self))
        elif self.input_id.shape != self.step.shape:
            raise ValueError(f"Transitions.input_id has shape {tuple(self.input_id.shape)}, step "
                             f"{tuple(self.step.shape)}: give one id per transition")

    def __len__(self) -> int:
        return int(self.step.shape[0])

    def select(self, index: torch.Tensor) -> Transitions:
        """Rows ``index`` (``[B]`` long) of every field."""
        return Transitions(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @staticmethod
    def cat(parts: list[Transitions]) -> Transitions:
        """Concatenate along the transition axis (``input_id`` as it is: parts must use disjoint ids)."""
        return Transitions(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Transitions)})


@dataclass
class Rollout:
    """Everything one rollout phase produced.

    Attributes:
        prompts: ``P`` prompt strings.
        metadata: ``P`` per-prompt metadata dicts (given to rewards).
        cond: prompt conditioning ``[P, ...]``; a sample's conditioning is row ``keys.prompt_index``.
        keys: identity of the ``S`` samples.
        samples: decoded samples, a tensor ``[S, ...]`` (images ``[S, 3, H, W]`` in [0, 1]) or a list.
        final_state: ``[S, ...]`` final sampler state (latents / token ids).
        transitions: the ``M`` stored policy actions.
        nfe: model evaluations spent, counted per sample and step (one CFG forward counts once).
        num_steps: length of the sampling schedule.
    """

    prompts: list[str]
    metadata: list[dict[str, Any]]
    cond: Conditioning
    keys: SampleKeys
    samples: Any
    final_state: torch.Tensor
    transitions: Transitions
    nfe: int
    num_steps: int
    info: dict[str, float] = field(default_factory=dict)

    @property
    def sample_prompts(self) -> list[str]:
        """The prompt of each of the ``S`` samples."""
        return [self.prompts[i] for i in self.keys.prompt_index.tolist()]

    @property
    def sample_metadata(self) -> list[dict[str, Any]]:
        return [self.metadata[i] for i in self.keys.prompt_index.tolist()]


@dataclass
class Credit:
    """Output of a credit assigner.

    Attributes:
        advantage: ``[M]`` float32 advantage of each stored transition.
        weight: ``[M]`` float32 per-transition weight on the policy loss (1 without noise-aware weighting).
        mask: ``[M]`` bool, False where the transition must not train (its sample had no valid reward).
        sample_advantage: ``[S]`` float32 advantage per sample (NaN where masked), for logging.
        zero_std_fraction: fraction of groups whose rewards had zero spread.
    """

    advantage: torch.Tensor
    weight: torch.Tensor
    mask: torch.Tensor
    sample_advantage: torch.Tensor
    zero_std_fraction: float
