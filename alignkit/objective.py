"""The clipped GRPO policy objective with a KL penalty to the reference model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignkit.config import ObjectiveConfig


@dataclass
class ObjectiveOutput:
    """Loss of one minibatch of transitions and its diagnostics (0-dim tensors).

    Attributes:
        loss: policy loss + beta * KL, the quantity to minimise (with grad).
        policy_loss: mean weighted clipped surrogate.
        kl: mean KL to the reference (0 when beta = 0).
        ratio_mean: mean of ``exp(logp - logp_old)``.
        clip_fraction: fraction of transitions whose ratio left ``[1 - eps, 1 + eps]``.
        approx_kl: ``0.5 * mean((logp - logp_old)^2)``, the policy's drift from the rollout policy.
    """

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    ratio_mean: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def grpo_objective(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantage: torch.Tensor,
    weight: torch.Tensor,
    kl: torch.Tensor | None,
    cfg: ObjectiveConfig,
) -> ObjectiveOutput:
    """``mean(w * max(-A r, -A clip(r, 1 - eps, 1 + eps))) + beta * mean(KL)``.

    Args:
        log_prob: ``[B]`` log-probs under the current parameters (with grad).
        old_log_prob: ``[B]`` log-probs stored at rollout.
        advantage: ``[B]`` advantages; clamped to ``[-adv_clip, adv_clip]``.
        weight: ``[B]`` per-transition weights of the policy term (noise-aware weighting); the KL term
            is not reweighted.
        kl: ``[B]`` KL to the reference, or None when ``beta == 0``. Its mean runs over the ``B`` transitions
            given: with ``algo.objective.skip_tied`` the tied ones (advantage exactly 0) are not among them, so
            the KL term is computed on the kept transitions only (:mod:`alignkit.update`).
        cfg: clip range, advantage clamp and KL coefficient.
    """
    adv = advantage.clamp(-cfg.adv_clip, cfg.adv_clip)  # [B]
    log_ratio = log_prob - old_log_prob  # [B]
    ratio = torch.exp(log_ratio)  # [B]
    unclipped = -adv * ratio  # [B]
    clipped = -adv * torch.clamp(ratio, 1.0 - cfg.clip_range, 1.0 + cfg.clip_range)  # [B]
    policy_loss = (torch.maximum(unclipped, clipped) * weight).mean()
    kl_mean = kl.mean() if kl is not None else torch.zeros((), device=log_prob.device)
    loss = policy_loss + cfg.beta * kl_mean if kl is not None else policy_loss
    with torch.no_grad():
        clip_fraction = ((ratio - 1.0).abs() > cfg.clip_range).float().mean()
        approx_kl = 0.5 * (log_ratio**2).mean()
    return ObjectiveOutput(
        loss=loss, policy_loss=policy_loss.detach(), kl=kl_mean.detach(), ratio_mean=ratio.detach().mean(),
        clip_fraction=clip_fraction, approx_kl=approx_kl,
    )
