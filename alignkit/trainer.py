"""The GRPO trainer: rollout -> reward -> credit -> clipped policy updates, on accelerate."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from alignkit.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
)
from alignkit.config import RunConfig, to_dict
from alignkit.credit import CreditAssigner, build_credit
from alignkit.ema import EMA
from alignkit.interfaces import Sampler
from alignkit.media import save_samples
from alignkit.metrics import MetricsWriter
from alignkit.objective import grpo_objective
from alignkit.plans import ExplorationPlan, PlanSchedule, build_plan
from alignkit.prompts import PromptSet, load_prompts
from alignkit.registry import SAMPLERS
from alignkit.rewards import OverlappedScorer, RewardSet, RewardTable
from alignkit.rollout import RolloutEngine, RolloutRequest, sample_generator
from alignkit.types import Credit, Rollout, Transitions, index_batch

logger = logging.getLogger(__name__)

# stream tags separating the random streams drawn from one (seed, epoch)
_TAG_PROMPTS, _TAG_PLAN, _TAG_SUBSAMPLE, _TAG_SHUFFLE = 101, 102, 103, 104


class NonFiniteError(RuntimeError):
    """Raised when too many consecutive updates had non-finite losses."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_sampler(cfg: RunConfig, device: torch.device) -> Sampler:
    """Instantiate the configured backbone adapter (``backbone.name`` in the sampler registry)."""
    factory = SAMPLERS.get(cfg.backbone.name)
    return factory.from_config(
        cfg.backbone, step_kind=cfg.algo.step_kind, noise_level=cfg.algo.noise_level, device=device
    )


@dataclass
class TrainState:
    """Progress counters, saved in every checkpoint (``history`` is not: it is in metrics.jsonl)."""

    epoch: int = 0
    global_step: int = 0
    nonfinite_skipped: int = 0
    nfe_total: int = 0
    seconds_total: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


class Trainer:
    """Runs a recipe. Everything random is drawn from generators seeded by ``(seed, epoch, ...)``.

    Args:
        cfg: the validated run configuration.
        sampler: a prebuilt sampler (tests, benchmarks); built from ``cfg.backbone`` when None.
        reward_set: prebuilt rewards; built from ``cfg.reward`` when None.
    """

    def __init__(self, cfg: RunConfig, sampler: Sampler | None = None, reward_set: RewardSet | None = None,
                 *, tensorboard: bool = True) -> None:
        from accelerate import Accelerator

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision, cpu=resolve_device(cfg.device).type == "cpu"
        )
        self.device = self.accelerator.device
        torch.manual_seed(cfg.seed)
        self.train_prompts, self.eval_prompts = load_prompts(cfg.prompts)
        self.reward_set = reward_set or RewardSet.from_config(cfg.reward, cfg.algo.reward_aggregation)
        self.eval_reward_set = (
            RewardSet(self.reward_set.terms + RewardSet.from_config(cfg.eval.rewards, "sum_then_normalize").terms)
            if cfg.eval.rewards else self.reward_set
        )
        self.sampler = sampler or build_sampler(cfg, self.device)
        self.plan: ExplorationPlan = build_plan(cfg.algo.plan.name, cfg.algo.plan.options)
        problems = self.plan.validate(self.sampler.num_steps)
        if problems:
            raise ValueError("; ".join(problems))
        self.credit: CreditAssigner = build_credit(cfg.algo.credit)
        self.engine = RolloutEngine(self.sampler, batch_size=cfg.train.rollout_batch_size)

        params = self.sampler.trainable_parameters()
        if not params:
            raise ValueError("the backbone has no trainable parameters: enable backbone.lora or full fine-tuning")
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            params, lr=t.learning_rate, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay
        )
        warmup = t.warmup_steps
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        )
        module, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.sampler.trainable_module(), self.optimizer, self.lr_scheduler
        )
        self.sampler.set_trainable_module(module)
        self.params = params
        self.ema = EMA(params, t.ema.decay) if t.ema.enabled else None
        self._last_heldout: float | None = None  # latest held-out mean of the first reward, for the progress bar
        self._pending_scorer: OverlappedScorer | None = None  # scoring during the rollout (train.overlap_rewards)
        self.state = TrainState()
        self.metrics = MetricsWriter(self.out, tensorboard=tensorboard) if self.is_main else None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # --- checkpoints ----------------------------------------------------------------------------------

    def save(self) -> Path:
        opt_tensors, opt_meta = optimizer_to_flat(self.optimizer.state_dict())
        tensors = dict(opt_tensors)
        if self.ema is not None:
            tensors.update(self.ema.state_dict())
        meta = {
            "epoch": self.state.epoch, "global_step": self.state.global_step,
            "nonfinite_skipped": self.state.nonfinite_skipped, "nfe_total": self.state.nfe_total,
            "seconds_total": self.state.seconds_total, "optimizer": opt_meta,
            "lr_scheduler": self.lr_scheduler.state_dict(), "config": to_dict(self.cfg),
        }
        return save_checkpoint(self.out, self.state.global_step, write_trainable=self.sampler.save_trainable,
                               tensors=tensors, meta=meta, keep=self.cfg.train.keep_checkpoints)

    def resume(self, path: Path | None = None) -> bool:
        """Load ``path`` or the latest checkpoint in the output folder; False when there is none."""
        path = path or latest_checkpoint(self.out)
        if path is None:
            return False
        self.sampler.load_trainable(path / "trainable")
        tensors, meta = load_checkpoint(path)
        self.optimizer.load_state_dict(optimizer_from_flat(tensors, meta["optimizer"]))
        self.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict({k: v for k, v in tensors.items() if k.startswith("ema.")})
        self.state.epoch = meta["epoch"]
        self.state.global_step = meta["global_step"]
        self.state.nonfinite_skipped = meta.get("nonfinite_skipped", 0)
        self.state.nfe_total = meta.get("nfe_total", 0)
        self.state.seconds_total = meta.get("seconds_total", 0.0)
        logger.info("resumed from %s (epoch %d, step %d)", path, self.state.epoch, self.state.global_step)
        return True

    # --- one epoch ------------------------------------------------------------------------------------

    def rollout(self, epoch: int) -> tuple[Rollout, PlanSchedule]:
        cfg = self.cfg
        gen = sample_generator(cfg.seed, epoch, _TAG_PROMPTS)
        ids = self.train_prompts.epoch_selection(cfg.train.prompts_per_epoch, gen, cfg.prompts.shuffle)
        schedule = self.plan.schedule(self.sampler.num_steps, epoch, sample_generator(cfg.seed, epoch, _TAG_PLAN))
        request = RolloutRequest(
            prompts=[self.train_prompts.prompts[i] for i in ids], prompt_ids=ids,
            metadata=[self.train_prompts.metadata[i] for i in ids], num_seeds=cfg.algo.num_seeds,
            seed=cfg.seed, iteration=epoch,
        )
        scorer = OverlappedScorer(self.reward_set, request.prompts, request.metadata) \
            if cfg.train.overlap_rewards else None
        rollout = self.engine.run(request, schedule, sink=scorer.submit if scorer is not None else None)
        self._pending_scorer = scorer
        return rollout, schedule

    def score(self, rollout: Rollout) -> tuple[RewardTable, torch.Tensor, Credit]:
        """Rewards (already computed during the rollout when ``train.overlap_rewards``), group scores, credit."""
        scorer, self._pending_scorer = self._pending_scorer, None
        if scorer is not None:
            table = scorer.result()  # waits only for the chunks still being scored
        else:
            table = self.reward_set.score(rollout.samples, rollout.sample_prompts, rollout.sample_metadata)
        groups = self.credit.groups(rollout.keys)
        c = self.cfg.algo.credit
        score = self.reward_set.aggregate(table, groups, std=c.std, eps=c.eps)
        return table, score, self.credit.assign(score, rollout.keys, rollout.transitions)

    def _training_rows(self, rollout: Rollout, credit: Credit, epoch: int, inner: int) -> torch.Tensor:
        """Indices of the transitions to train on this inner epoch, shuffled.

        ``timestep_fraction < 1`` keeps a random subset of each sample's stored steps.
        """
        tr = rollout.transitions
        keep = credit.mask.clone()  # [M]
        frac = self.cfg.algo.timestep_fraction
        if frac < 1.0:
            gen = sample_generator(self.cfg.seed, epoch, inner, _TAG_SUBSAMPLE)
            noise = torch.rand(len(tr), generator=gen)  # [M]
            # rank of each transition among its sample's transitions by random key
            order = torch.argsort(noise)
            ranks = torch.empty_like(order)
            per_sample = torch.zeros(int(tr.sample_index.max()) + 1, dtype=torch.long)
            for pos in order.tolist():
                s = int(tr.sample_index[pos])
                ranks[pos] = per_sample[s]
                per_sample[s] += 1
            counts = torch.bincount(tr.sample_index, minlength=per_sample.shape[0])  # [S]
            limit = torch.clamp((counts.float() * frac).ceil().long(), min=1)
            keep &= ranks < limit[tr.sample_index]
        rows = torch.nonzero(keep).flatten()
        perm = torch.randperm(len(rows), generator=sample_generator(self.cfg.seed, epoch, inner, _TAG_SHUFFLE))
        return rows[perm]

    def _minibatch_loss(self, rollout: Rollout, credit: Credit, rows: torch.Tensor) -> Any:
        tr: Transitions = rollout.transitions.select(rows)
        cond = index_batch(rollout.cond, rollout.keys.prompt_index[tr.sample_index])
        step = tr.step.to(self.device)
        dist = self.sampler.transition(tr.state, step, cond, stochastic=True)
        log_prob = dist.log_prob(tr.next_state)  # [B]
        kl = None
        if self.cfg.algo.objective.beta > 0:
            with torch.no_grad(), self.sampler.reference():
                ref = self.sampler.transition(tr.state, step, cond, stochastic=True)
            kl = dist.kl(ref)  # [B]
        return grpo_objective(
            log_prob, tr.log_prob.to(self.device), credit.advantage[rows].to(self.device),
            credit.weight[rows].to(self.device), kl, self.cfg.algo.objective,
        )

    def optimize(self, rollout: Rollout, credit: Credit, epoch: int) -> dict[str, float]:
        """Inner epochs of clipped updates over the stored transitions."""
        t = self.cfg.train
        sums: dict[str, float] = {}
        count = 0
        grad_norms: list[float] = []
        first_ratio = math.nan
        self.sampler.train(True)
        module = self.sampler.trainable_module()
        for inner in range(t.inner_epochs):
            rows = self._training_rows(rollout, credit, epoch, inner)
            batches = list(torch.split(rows, t.train_batch_size))
            accum = t.gradient_accumulation_steps
            for b, mb in enumerate(batches):
                group_start = (b // accum) * accum
                group_len = min(accum, len(batches) - group_start)
                sync = b == group_start + group_len - 1
                ctx = self.accelerator.no_sync(module) if not sync else _nullcontext()
                with ctx:
                    out = self._minibatch_loss(rollout, credit, mb)
                    if not torch.isfinite(out.loss):
                        self._count_nonfinite(out.loss)
                        self.optimizer.zero_grad(set_to_none=True)
                        continue
                    self.accelerator.backward(out.loss / group_len)
                if math.isnan(first_ratio):
                    first_ratio = float(out.ratio_mean)
                for key in ("loss", "policy_loss", "kl", "ratio_mean", "clip_fraction", "approx_kl"):
                    sums[key] = sums.get(key, 0.0) + float(getattr(out, key).detach())
                count += 1
                if sync:
                    norm = self.accelerator.clip_grad_norm_(self.params, t.max_grad_norm)
                    if not torch.isfinite(torch.as_tensor(norm)):
                        self._count_nonfinite(torch.as_tensor(norm))
                        self.optimizer.zero_grad(set_to_none=True)
                        continue
                    grad_norms.append(float(norm))
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.state.global_step += 1
                    self._consecutive_nonfinite = 0
                    if self.ema is not None and self.state.global_step % t.ema.every == 0:
                        self.ema.update()
        self.sampler.train(False)
        stats = {f"train/{k}": v / max(count, 1) for k, v in sums.items()}
        stats["train/grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
        stats["train/first_ratio"] = first_ratio
        stats["train/minibatches"] = float(count)
        stats["train/lr"] = float(self.lr_scheduler.get_last_lr()[0])
        return stats

    _consecutive_nonfinite = 0

    def _count_nonfinite(self, value: torch.Tensor) -> None:
        self.state.nonfinite_skipped += 1
        self._consecutive_nonfinite += 1
        logger.warning("non-finite loss or gradient (%s): update skipped (%d so far)", value.item(),
                       self.state.nonfinite_skipped)
        if self._consecutive_nonfinite > self.cfg.train.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self._consecutive_nonfinite} consecutive non-finite updates (train.max_nonfinite_steps="
                f"{self.cfg.train.max_nonfinite_steps}); lower train.learning_rate or check the rewards. "
                "The last checkpoint is kept."
            )

    # --- the loop -------------------------------------------------------------------------------------

    def train(self) -> TrainState:
        cfg = self.cfg
        if cfg.train.resume:
            self.resume()
        bar = tqdm(total=cfg.train.epochs, initial=self.state.epoch, desc="alignkit", unit="epoch",
                   disable=not self.is_main, dynamic_ncols=True)
        if cfg.eval.before_after and self.state.epoch == 0 and self.is_main:
            before = self.evaluate_heldout("eval_before")
            self.metrics.write(0, {"epoch": 0.0, "global_step": 0.0, "rollout/nfe_total": 0.0,
                                   "time/total_s": 0.0, **before})
            bar.write("held-out before training: " + _fmt(before))
            bar.set_postfix(heldout=f"{self._last_heldout:.3f}")
        try:
            while self.state.epoch < cfg.train.epochs:
                epoch = self.state.epoch
                t0 = time.perf_counter()
                rollout, _schedule = self.rollout(epoch)
                t1 = time.perf_counter()
                table, score, credit = self.score(rollout)
                t2 = time.perf_counter()
                stats = self.optimize(rollout, credit, epoch)
                t3 = time.perf_counter()
                self.state.epoch += 1
                self.state.nfe_total += rollout.nfe
                self.state.seconds_total += t3 - t0
                metrics = self._epoch_metrics(rollout, table, score, credit, stats, (t0, t1, t2, t3))
                last = self.state.epoch == cfg.train.epochs
                if self.is_main and ((cfg.eval.every and self.state.epoch % cfg.eval.every == 0)
                                     or (last and cfg.eval.before_after)):
                    after = self.evaluate_heldout("eval_after" if last else f"eval_{self.state.epoch:05d}")
                    metrics.update(after)
                    if last:
                        bar.write("held-out after training: " + _fmt(after))
                if self.is_main:
                    if epoch % cfg.train.sample_every == 0 or self.state.epoch == cfg.train.epochs:
                        self._save_samples(rollout, score, f"epoch_{epoch:05d}")
                    metrics["time/epoch_s"] = time.perf_counter() - t0
                    self.metrics.write(self.state.epoch, metrics)
                    bar.set_postfix(self._postfix(metrics))
                    bar.update(1)
                self.state.history.append(metrics)
                if self.state.epoch % cfg.train.checkpoint_every == 0 or self.state.epoch == cfg.train.epochs:
                    if self.is_main:
                        self.save()
                    self.accelerator.wait_for_everyone()
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()
        return self.state

    def _postfix(self, metrics: dict[str, float], window: int = 10) -> dict[str, str]:
        """Progress-bar fields: this epoch's reward, its mean over the last ``window`` epochs (the trend
        through the per-epoch noise of a few prompts), the latest held-out score of the first reward, KL and
        clip fraction."""
        recent = [m["reward/score_mean"] for m in self.state.history[-(window - 1):]] + [metrics["reward/score_mean"]]
        fields = {"reward": f"{metrics['reward/score_mean']:.3f}", f"avg{window}": f"{sum(recent) / len(recent):.3f}"}
        if self._last_heldout is not None:
            fields["heldout"] = f"{self._last_heldout:.3f}"
        fields["kl"] = f"{metrics.get('train/kl', float('nan')):.2g}"
        fields["clip"] = f"{metrics.get('train/clip_fraction', float('nan')):.2f}"
        return fields

    def _epoch_metrics(self, rollout: Rollout, table: RewardTable, score: torch.Tensor, credit: Credit,
                       stats: dict[str, float], times: tuple[float, float, float, float]) -> dict[str, float]:
        t0, t1, t2, t3 = times
        m: dict[str, float] = {"epoch": float(self.state.epoch), "global_step": float(self.state.global_step)}
        for name, raw in table.raw.items():
            valid = raw[~torch.isnan(raw)]
            m[f"reward/{name}_mean"] = float(valid.mean()) if len(valid) else math.nan
            m[f"reward/{name}_std"] = float(valid.std(unbiased=False)) if len(valid) else math.nan
            m[f"reward/{name}_invalid"] = float(table.invalid[name])
        valid = score[~torch.isnan(score)]
        m["reward/score_mean"] = float(valid.mean()) if len(valid) else math.nan
        m["credit/zero_std_fraction"] = credit.zero_std_fraction
        m["credit/masked_transitions"] = float((~credit.mask).sum())
        m["rollout/nfe"] = float(rollout.nfe)
        m["rollout/nfe_total"] = float(self.state.nfe_total)
        m["time/total_s"] = self.state.seconds_total
        m["rollout/samples"] = float(len(rollout.keys))
        m["rollout/transitions"] = float(len(rollout.transitions))
        m["train/nonfinite_skipped"] = float(self.state.nonfinite_skipped)
        m["time/rollout_s"], m["time/reward_s"], m["time/train_s"] = t1 - t0, t2 - t1, t3 - t2
        m.update(stats)
        return m

    def evaluate_heldout(self, name: str) -> dict[str, float]:
        """Deterministic sampling of the evaluation prompts (EMA weights when enabled); a captioned grid.

        Returns ``eval/<reward>`` means (NaN-masked) for the training and evaluation-only rewards.
        """
        e = self.cfg.eval
        ctx = self.ema.swapped() if self.ema is not None else _nullcontext()
        with ctx:
            rollout, table = evaluate(self.sampler, self.eval_reward_set, self.eval_prompts, seed=e.seed,
                                      seeds_per_prompt=e.seeds_per_prompt, batch_size=e.batch_size,
                                      limit=e.num_prompts)
        out = {f"eval/{k}": float(torch.nanmean(v)) for k, v in table.raw.items()}
        first = next(iter(table.raw.values()))  # the first training reward
        self._last_heldout = float(torch.nanmean(first))
        self._save_samples(rollout, first, name, limit=32)
        return out

    def _save_samples(self, rollout: Rollout, score: torch.Tensor, name: str, limit: int = 16) -> Path | None:
        """A captioned PNG of the first ``limit`` samples: an image grid, or one frame strip per video."""
        samples = rollout.samples
        if not isinstance(samples, torch.Tensor):
            return None
        n = min(limit, samples.shape[0])
        prompts = rollout.sample_prompts
        captions = [f"{prompts[i]} | r={float(score[i]):.3g}" for i in range(n)]
        return save_samples(samples[:n], captions, self.out / "samples" / f"{name}.png")


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in metrics.items())


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def evaluate(
    sampler: Sampler, reward_set: RewardSet, prompts: PromptSet, *, seed: int, seeds_per_prompt: int,
    batch_size: int, limit: int | None = None,
) -> tuple[Rollout, RewardTable]:
    """Deterministic (ODE / argmax) sampling of held-out prompts and their reward table."""
    from alignkit.plans import Deterministic

    n = len(prompts) if limit is None else min(limit, len(prompts))
    engine = RolloutEngine(sampler, batch_size=batch_size)
    request = RolloutRequest(prompts=prompts.prompts[:n], prompt_ids=list(range(n)), metadata=prompts.metadata[:n],
                             num_seeds=seeds_per_prompt, seed=seed, iteration=0)
    rollout = engine.run(request, Deterministic().schedule(sampler.num_steps, 0, torch.Generator()))
    table = reward_set.score(rollout.samples, rollout.sample_prompts, rollout.sample_metadata)
    return rollout, table
