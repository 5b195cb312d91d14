"""Building a run's components from its configuration: device, sampler, rewards, plan, credit, engine,
optimizer and learning-rate schedule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from alignkit.config import RunConfig, TrainConfig
from alignkit.credit import CreditAssigner, build_credit
from alignkit.errors import ModelLoadError
from alignkit.flow import FlowMatchingSampler
from alignkit.interfaces import Sampler
from alignkit.plans import ExplorationPlan, build_plan
from alignkit.registry import SAMPLERS
from alignkit.reward_set import RewardSet
from alignkit.rollout import RolloutEngine

__all__ = ["Components", "apply_logprob", "build_components", "build_optimizer", "build_reward_sets", "build_sampler",
           "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; any other name as ``torch.device`` reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_sampler(cfg: RunConfig, device: torch.device) -> Sampler:
    """Instantiate the configured backbone adapter (``backbone.name`` in the sampler registry).

    Raises:
        ModelLoadError: the model folder is incomplete or a weights file is corrupt (the loader's own
            message, with the setting to fix).
    """
    factory = SAMPLERS.get(cfg.backbone.name)
    try:
        sampler = factory.from_config(
            cfg.backbone, step_kind=cfg.algo.step_kind, noise_level=cfg.algo.noise_level, device=device
        )
    except OSError as exc:
        if str(exc).startswith("backbone."):  # already names the setting
            raise
        raise ModelLoadError(
            f"backbone.pretrained={cfg.backbone.pretrained!r} cannot be loaded: {str(exc).strip()} Give a complete "
            "pipeline folder (model_index.json and every component's config and weights, as save_pretrained "
            "writes it) or a hub id; re-download or re-save a truncated or corrupt weights file"
        ) from exc
    return sampler


def apply_logprob(sampler: Sampler, cfg: RunConfig) -> None:
    """Set the flow sampler's log-probability convention from ``algo.logprob`` (the default, ``exact``, is
    every sampler's own).

    Raises:
        ValueError: a convention other than ``exact`` for a sampler that is not a flow sampler.
    """
    if cfg.algo.logprob == "exact":
        return
    if not isinstance(sampler, FlowMatchingSampler):
        raise ValueError(f"algo.logprob={cfg.algo.logprob!r}: backbone {cfg.backbone.name!r} is not a flow sampler; "
                         "the conventions other than exact are those of flow steps (use algo.logprob=exact)")
    sampler.use_logprob(cfg.algo.logprob)


def build_reward_sets(cfg: RunConfig, reward_set: RewardSet | None = None) -> tuple[RewardSet, RewardSet]:
    """``(training rewards, held-out rewards)``: the held-out set is the training set plus ``eval.rewards``
    (logged only); ``reward_set`` replaces the configured training rewards when given."""
    train = reward_set or RewardSet.from_config(cfg.reward, cfg.algo.reward_aggregation)
    held_out = (
        RewardSet(train.terms + RewardSet.from_config(cfg.eval.rewards, "sum_then_normalize").terms)
        if cfg.eval.rewards else train
    )
    return train, held_out


@dataclass
class Components:
    """What a run is made of, before any checkpoint, sharding or optimizer.

    Attributes:
        reward_set: the training rewards.
        eval_reward_set: the training rewards plus the evaluation-only ones.
        sampler: the backbone adapter.
        plan: the exploration plan (validated against the sampler's schedule).
        credit: the credit assigner.
        engine: the rollout engine over ``sampler``.
    """

    reward_set: RewardSet
    eval_reward_set: RewardSet
    sampler: Sampler
    plan: ExplorationPlan
    credit: CreditAssigner
    engine: RolloutEngine


def build_components(cfg: RunConfig, device: torch.device, *, sampler: Sampler | None = None,
                     reward_set: RewardSet | None = None,
                     make_sampler: Callable[[RunConfig, torch.device], Sampler] = build_sampler) -> Components:
    """Build the rewards, then the sampler (``make_sampler`` unless ``sampler`` is given), the plan, the credit
    assigner and the rollout engine, in that order (random initialisations draw from the global RNG).

    Raises:
        ValueError: the exploration plan does not fit the sampler's schedule (every problem listed).
    """
    train_rewards, eval_rewards = build_reward_sets(cfg, reward_set)
    sampler = sampler or make_sampler(cfg, device)
    apply_logprob(sampler, cfg)
    plan = build_plan(cfg.algo.plan.name, cfg.algo.plan.options)
    problems = plan.validate(sampler.num_steps)
    if problems:
        raise ValueError("; ".join(problems))
    return Components(reward_set=train_rewards, eval_reward_set=eval_rewards, sampler=sampler, plan=plan,
                      credit=build_credit(cfg.algo.credit),
                      engine=RolloutEngine(sampler, batch_size=cfg.train.rollout_batch_size))


def build_optimizer(t: TrainConfig, params: list[torch.nn.Parameter]
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``params`` and its linear-warmup schedule (``train.warmup_steps``, then constant).

    Raises:
        ValueError: ``params`` is empty (nothing would train).
    """
    if not params:
        raise ValueError("the backbone has no trainable parameters: enable backbone.lora or full fine-tuning")
    optimizer = torch.optim.AdamW(
        params, lr=t.learning_rate, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay
    )
    warmup = t.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
    )
    return optimizer, scheduler
