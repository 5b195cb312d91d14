"""The update step: clipped policy updates over an epoch's stored transitions.

Training minibatches are global: the same shuffled order of all transitions (every process) is cut into
``train.train_batch_size`` rows; each process computes the loss of the rows it holds scaled by its share,
and the gradients are summed over processes before each optimizer step (DDP: one explicit all-reduce;
FSDP: the reduce-scatter of the last backward). A step whose loss or gradient is NaN / inf on any process
is skipped on every process; under fp16 a gradient overflow is left to the loss scaler.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import torch

from alignkit.checkpoint import TrainState, latest_checkpoint
from alignkit.config import RunConfig
from alignkit.distributed import Gathered, Shard
from alignkit.ema import EMA
from alignkit.errors import NonFiniteError
from alignkit.fsdp import full
from alignkit.interfaces import Sampler
from alignkit.objective import ObjectiveOutput, grpo_objective
from alignkit.rollout import sample_generator
from alignkit.types import Credit, Rollout, Transitions, index_batch

logger = logging.getLogger(__name__)

# stream tags of the random streams drawn from one (seed, epoch, inner epoch); see alignkit.trainer
TAG_SUBSAMPLE, TAG_SHUFFLE = 103, 104

STATS = ("loss", "policy_loss", "kl", "ratio_mean", "clip_fraction", "approx_kl")


class Updater:
    """Optimizer steps of one run: holds the optimizer, LR schedule, EMA and the (accelerate-prepared)
    trainable module; the loss scaler is read from ``accelerator`` at each step.

    Args:
        cfg: the run configuration (``train``, ``algo.objective``, ``algo.timestep_fraction``, ``seed``).
        accelerator: the run's ``accelerate.Accelerator``.
        sampler: the backbone adapter (its trainable module already prepared).
        module: the prepared trainable module (DDP wrapper, or the sharded module under FSDP).
        params: the trainable parameters the optimizer holds.
        optimizer: the prepared optimizer; ``lr_scheduler`` steps once per optimizer step.
        ema: the EMA of ``params``, or None.
        shard: this process's place; ``fsdp``: whether the module is sharded.
        output_dir: the run folder (named in the error that stops a run of non-finite steps).
    """

    def __init__(self, cfg: RunConfig, accelerator: Any, sampler: Sampler, module: torch.nn.Module,
                 params: list[torch.nn.Parameter], optimizer: Any, lr_scheduler: Any, ema: EMA | None,
                 shard: Shard, fsdp: bool, output_dir: Path) -> None:
        self.cfg = cfg
        self.accelerator = accelerator
        self.sampler = sampler
        self.module = module
        self.params = params
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.ema = ema
        self.shard = shard
        self.fsdp = fsdp
        self.out = output_dir
        self.device = accelerator.device

    def training_rows(self, transitions: Transitions, credit: Credit, epoch: int, inner: int) -> torch.Tensor:
        """Global indices of the transitions to train on this inner epoch, shuffled (the same on every process).

        ``timestep_fraction < 1`` keeps a random subset of each sample's stored steps.
        """
        tr = transitions
        keep = credit.mask.clone()  # [M]
        frac = self.cfg.algo.timestep_fraction
        if frac < 1.0 and len(tr):
            gen = sample_generator(self.cfg.seed, epoch, inner, TAG_SUBSAMPLE)
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
        perm = torch.randperm(len(rows), generator=sample_generator(self.cfg.seed, epoch, inner, TAG_SHUFFLE))
        return rows[perm]

    def minibatch_loss(self, rollout: Rollout, credit: Credit, rows: torch.Tensor,
                       global_rows: torch.Tensor | None = None) -> ObjectiveOutput:
        """Objective of this process's transitions ``rows`` (local indices ``[b]``); ``global_rows`` ``[b]``
        index ``credit`` (the same as ``rows`` for one process)."""
        g = rows if global_rows is None else global_rows
        tr: Transitions = rollout.transitions.select(rows)
        cond = index_batch(rollout.cond, rollout.keys.prompt_index[tr.sample_index])
        step = tr.step.to(self.device)
        dist = self.sampler.transition(tr.state, step, cond, stochastic=True)
        log_prob = dist.log_prob(tr.next_state)  # [b]
        kl = None
        if self.cfg.algo.objective.beta > 0:
            with torch.no_grad(), self.sampler.reference():
                ref = self.sampler.transition(tr.state, step, cond, stochastic=True)
            kl = dist.kl(ref)  # [b]
        return grpo_objective(
            log_prob, tr.log_prob.to(self.device), credit.advantage[g].to(self.device),
            credit.weight[g].to(self.device), kl, self.cfg.algo.objective,
        )

    def optimize(self, rollout: Rollout, layout: Gathered, credit: Credit, epoch: int,
                 state: TrainState) -> dict[str, float]:
        """Inner epochs of clipped updates over the stored transitions; ``train/*`` metrics.

        Each optimizer step covers ``train.gradient_accumulation_steps`` global minibatches of
        ``train.train_batch_size`` transitions; its loss is the mean over minibatches of each minibatch's
        mean. A step whose loss or gradient is NaN / inf on any process is skipped on every process and
        counted in ``state`` (``train/skipped_steps``, ``train/nonfinite_skipped``); more than
        ``train.max_nonfinite_steps`` consecutive skipped steps stop the run (:class:`NonFiniteError`).

        Args:
            rollout: this process's rollout (states of its own transitions).
            layout: the epoch's global structure (:func:`alignkit.distributed.gather_rollout`).
            credit: global advantages and weights ``[M]``.
            epoch: the epoch (seeds the subsampling and shuffling).
            state: the run's counters, updated in place.
        """
        t = self.cfg.train
        stats = torch.zeros(len(STATS) + 1, dtype=torch.float64)  # per-minibatch means summed, + first ratio
        minibatches = 0
        skipped = 0
        grad_norms: list[float] = []
        self.sampler.train(True)
        for inner in range(t.inner_epochs):
            rows = self.training_rows(layout.transitions, credit, epoch, inner)
            batches = [b for b in torch.split(rows, t.train_batch_size) if len(b)]  # none when every row is masked
            accum = t.gradient_accumulation_steps
            for start in range(0, len(batches), accum):
                group = batches[start:start + accum]
                step_stats, norm = self._step(rollout, credit, layout, group, state, first=minibatches == 0)
                if norm is None:
                    skipped += 1
                    continue
                if minibatches == 0:
                    stats[-1] = step_stats[-1]
                stats[:-1] += step_stats[:-1]
                minibatches += len(group)
                grad_norms.append(norm)
        self.sampler.train(False)
        self.shard.sum_(stats)
        out = {f"train/{k}": float(stats[i]) / minibatches if minibatches else math.nan
               for i, k in enumerate(STATS)}
        out["train/grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
        out["train/first_ratio"] = float(stats[-1]) if minibatches else math.nan
        out["train/minibatches"] = float(minibatches)
        out["train/skipped_steps"] = float(skipped)
        out["train/lr"] = float(self.lr_scheduler.get_last_lr()[0])
        return out

    def _step(self, rollout: Rollout, credit: Credit, layout: Gathered, group: list[torch.Tensor],
              state: TrainState, first: bool) -> tuple[torch.Tensor, float | None]:
        """One optimizer step over the global minibatches ``group``; ``(this process's share of the summed
        minibatch statistics, gradient norm)``, the norm None when the step was skipped as non-finite."""
        stats = torch.zeros(len(STATS) + 1, dtype=torch.float64)
        reason = ""
        for b, mb in enumerate(group):
            local, global_rows = layout.local_rows(mb)
            share = len(local) / len(mb)  # this process's fraction of the global minibatch
            if not len(local):
                if not self.fsdp:
                    continue
                # every process runs every forward and backward of a sharded module: one of its own
                # transitions stands in, with weight 0
                local, global_rows = layout.stand_in()
            with self._gradient_sync(last=b == len(group) - 1):
                out = self.minibatch_loss(rollout, credit, local, global_rows)
                if share and not bool(torch.isfinite(out.loss)):
                    reason = f"loss {float(out.loss.detach())} on process {self.shard.rank}"
                    if not self.fsdp:
                        break
                self.accelerator.backward(out.loss * (share / len(group)))
            if not share:
                continue
            values = [float(getattr(out, k).detach()) for k in STATS]
            stats[:-1] += torch.tensor(values, dtype=torch.float64) * share
            if first and b == 0:
                stats[-1] = float(out.ratio_mean) * share
        reason = self._reduce_gradients(reason)
        norm = None
        if not reason:
            norm = float(full(self.accelerator.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)))
            if not math.isfinite(norm):
                if self.accelerator.scaler is not None:
                    self._scale_overflow(norm, state)
                    return stats, None
                reason = f"gradient norm {norm}"
        if reason:
            self.optimizer.zero_grad(set_to_none=True)
            self._count_nonfinite(reason, state)
            return stats, None
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        state.consecutive_nonfinite = 0
        t = self.cfg.train
        if self.ema is not None and state.global_step % t.ema.every == 0:
            self.ema.update()
        return stats, norm

    def _gradient_sync(self, last: bool) -> Any:
        """Context of one minibatch's backward. DDP: no synchronisation (summed in :meth:`_reduce_gradients`).
        FSDP: gradients reduce-scattered (summed) at the last minibatch of the optimizer step only."""
        if not self.fsdp:
            return self.accelerator.no_sync(self.module)
        self.module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def _reduce_gradients(self, reason: str) -> str:
        """Sum the gradients over processes (one collective, with a flag for a non-finite loss anywhere;
        under FSDP the flag only, the gradients were reduce-scattered in the backward); returns ``reason``
        or, if another process saw a non-finite loss, a reason naming that."""
        if not self.shard.distributed:
            return reason
        if self.fsdp:
            flag = self.shard.sum_(torch.tensor([1.0 if reason else 0.0]))
            return reason or ("loss on another process" if float(flag[0]) > 0 else "")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.detach().float().flatten() for g in grads]
                         + [torch.tensor([1.0 if reason else 0.0], device=grads[0].device)])
        self.shard.sum_(flat)
        if float(flat[-1]) > 0:
            return reason or "loss on another process"
        offset = 0
        for p in self.params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n
        return ""

    def _scale_overflow(self, norm: float, state: TrainState) -> None:
        """fp16: the scaled gradients overflowed (the loss was finite). The scaler's step skips the update and
        lowers its scale, as loss scaling intends; counted apart from non-finite steps."""
        scaler = self.accelerator.scaler
        self.optimizer.step()  # GradScaler.step sees the inf found while unscaling: no update; update() backs off
        self.optimizer.zero_grad(set_to_none=True)
        state.scale_overflows += 1
        logger.info("fp16 gradients overflowed (norm %s): step skipped, loss scale lowered to %g", norm,
                    scaler.get_scale())

    def _count_nonfinite(self, reason: str, state: TrainState) -> None:
        s = state
        s.nonfinite_skipped += 1
        s.consecutive_nonfinite += 1
        logger.warning("non-finite %s: optimizer step skipped (%d skipped so far, %d in a row)", reason,
                       s.nonfinite_skipped, s.consecutive_nonfinite)
        limit = self.cfg.train.max_nonfinite_steps
        if s.consecutive_nonfinite > limit:
            last = latest_checkpoint(self.out)
            kept = f"the last checkpoint, {last}, is kept" if last else "no checkpoint had been written yet"
            raise NonFiniteError(
                f"{s.consecutive_nonfinite} consecutive optimizer steps had a non-finite loss or gradient (last: "
                f"{reason}; limit train.max_nonfinite_steps={limit}) at epoch {s.epoch}; {kept}. Lower "
                "train.learning_rate, check that the sampler's log-probs are finite (backbone.dtype=float32 "
                "helps), or raise train.max_nonfinite_steps"
            )
