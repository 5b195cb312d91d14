"""Credit assignment: per-sample scores and rollout structure to per-transition advantages and weights."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from alignkit.config import CreditConfig
from alignkit.registry import CREDIT_ASSIGNERS
from alignkit.types import Credit, SampleKeys, Transitions


def group_ids(keys: SampleKeys, group_by: str) -> torch.Tensor:
    """``[S]`` long group id per sample.

    ``prompt``: samples of one prompt at one branch step (all seeds); ``seed``: samples of one prompt,
    one initial noise and one branch step (TempFlow-GRPO's seed group). Linear trajectories have branch
    step -1, so ``prompt`` grouping is Flow-GRPO's per-prompt group.
    """
    if group_by == "prompt":
        cols = [keys.prompt_index, keys.branch_step]
    elif group_by == "seed":
        cols = [keys.prompt_index, keys.seed_index, keys.branch_step]
    else:
        raise ValueError(f"algo.credit.group_by={group_by!r}: use 'prompt' or 'seed'")
    table = torch.stack([c.long() for c in cols], dim=1)  # [S, K]
    _, inverse = torch.unique(table, dim=0, return_inverse=True)
    return inverse


def group_normalize(
    score: torch.Tensor, groups: torch.Tensor, *, std: str = "group", eps: float = 1e-4
) -> tuple[torch.Tensor, float]:
    """``(score - group mean) / (std + eps)`` ignoring NaN scores.

    Args:
        score: ``[S]`` float, NaN where a sample has no valid reward.
        groups: ``[S]`` long group ids.
        std: ``group`` (std within the group) or ``global`` (std over all valid scores).
        eps: added to the std.

    Returns:
        ``[S]`` normalised scores (NaN where ``score`` was NaN) and the fraction of groups (with at
        least one valid score) whose valid scores all coincide.
    """
    score = score.double()
    valid = ~torch.isnan(score)
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    filled = torch.where(valid, score, torch.zeros_like(score))
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, valid.double())  # [G]
    total = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, filled)  # [G]
    mean = total / count.clamp_min(1)  # [G]
    dev = torch.where(valid, score - mean[groups], torch.zeros_like(score))  # [S]
    var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, groups, dev**2) / count.clamp_min(1)
    group_std = var.sqrt()  # [G] population std, as numpy's default
    if std == "group":
        denom = group_std[groups]
    elif std == "global":
        denom = score[valid].std(unbiased=False).expand_as(score) if valid.any() else torch.zeros_like(score)
    else:
        raise ValueError(f"algo.credit.std={std!r}: use 'group' or 'global'")
    out = torch.where(valid, dev / (denom + eps), torch.full_like(score, float("nan")))
    present = count > 0
    zero_std = float((group_std[present] == 0).double().mean()) if present.any() else 0.0
    return out.float(), zero_std


class CreditAssigner(ABC):
    """Maps per-sample scores to advantages and weights of the stored transitions."""

    @abstractmethod
    def groups(self, keys: SampleKeys) -> torch.Tensor:
        """``[S]`` long group ids (also used by group-normalising reward aggregation)."""

    @abstractmethod
    def assign(self, score: torch.Tensor, keys: SampleKeys, transitions: Transitions,
               groups: torch.Tensor | None = None) -> Credit:
        """Advantages ``[M]`` and weights ``[M]`` from ``score`` ``[S]`` (NaN = no valid reward); ``groups``
        ``[S]`` are :meth:`groups` of ``keys`` when already computed (e.g. for reward aggregation)."""


@CREDIT_ASSIGNERS.register("group")
class GroupCredit(CreditAssigner):
    """GRPO group advantages, optionally with noise-aware step weights.

    Each transition gets its sample's normalised advantage. With ``noise_aware`` the policy loss of a
    transition is weighted by ``w = s / mean(s)`` over the transitions of the rollout, ``s`` its
    exploration scale (the transition std), so the weights average 1.
    """

    def __init__(self, cfg: CreditConfig) -> None:
        self.cfg = cfg

    def groups(self, keys: SampleKeys) -> torch.Tensor:
        return group_ids(keys, self.cfg.group_by)

    def assign(self, score: torch.Tensor, keys: SampleKeys, transitions: Transitions,
               groups: torch.Tensor | None = None) -> Credit:
        if groups is None:
            groups = self.groups(keys)
        elif groups.shape != score.shape:
            raise ValueError(f"credit groups have shape {tuple(groups.shape)}, the scores {tuple(score.shape)}: "
                             "pass the group ids of the same samples (CreditAssigner.groups(keys))")
        sample_adv, zero_std = group_normalize(score, groups, std=self.cfg.std, eps=self.cfg.eps)  # [S]
        adv = sample_adv[transitions.sample_index]  # [M]
        mask = ~torch.isnan(adv)  # [M]
        if self.cfg.noise_aware:
            scale = transitions.scale.float()  # [M]
            ref = scale[mask].mean() if mask.any() else scale.new_tensor(1.0)
            if not bool(ref > 0):
                raise ValueError("noise-aware weighting needs exploring transitions with positive std")
            weight = scale / ref  # [M]
        else:
            weight = torch.ones_like(adv)
        return Credit(
            advantage=torch.nan_to_num(adv, nan=0.0), weight=weight, mask=mask,
            sample_advantage=sample_adv, zero_std_fraction=zero_std,
        )


def build_credit(cfg: CreditConfig) -> CreditAssigner:
    return CREDIT_ASSIGNERS.get(cfg.name)(cfg)
