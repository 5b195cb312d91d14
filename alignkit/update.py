"""The update step: clipped policy updates over an epoch's stored transitions.

Training minibatches are global: the same shuffled order of all transitions (every process) is cut into
``train.train_batch_size`` rows; each process computes the loss of the rows it holds scaled by its share,
and the gradients are summed over processes before each optimizer step (DDP: one explicit all-reduce;
FSDP: the reduce-scatter of the last backward). A step whose loss or gradient is NaN / inf on any process
is skipped on every process; under fp16 a gradient overflow is left to the loss scaler.

**Shared inputs** (``train.shared_inputs``, default on). Transitions with one ``input_id`` (the ``K`` children
of a TempFlow-GRPO branch point) share state, step and conditioning. The update then shuffles whole input
groups instead of transitions and packs them into minibatches of at most ``train.train_batch_size``
transitions without cutting a group (a group larger than that is a minibatch of its own: its memory is one
forward's, the extra transitions only add log-probs); each distinct input is evaluated once (policy forward
with grad, reference forward) and the log-probs of all its stored next states are taken from that one
distribution (:meth:`StepDistribution.index`). The loss, and so the gradient, is that of the per-transition
evaluation of the same rows (to float rounding). A group never spans processes: it belongs to one trunk,
rolled out by one process. With every id distinct (Flow-GRPO) the minibatches are those of the per-transition
path, bit for bit.

**Tied transitions** (``algo.objective.skip_tied``). A transition whose advantage is exactly 0 (every member of a
group whose rewards tie, as most ShapeEval groups do) adds nothing to the policy loss, only to the KL term. With
``skip_tied`` such transitions are left out before minibatches are formed (as the released Flow-GRPO /
TempFlow-GRPO code filters them): they cost no forward, the KL term is computed on the kept transitions only,
and each minibatch's mean runs over kept transitions. Counted as ``train/tied_skipped``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
from pathlib import Path
from typing import Any

import torch

from alignkit.checkpoint import TrainState, kept_checkpoint_phrase
from alignkit.config import RunConfig
from alignkit.cost import FlopMeter, maybe_meter, shape_key
from alignkit.distributed import Gathered, Shard
from alignkit.ema import EMA
from alignkit.errors import NonFiniteError
from alignkit.fsdp import full
from alignkit.interfaces import Sampler
from alignkit.metrics import TRAIN_METRICS  # noqa: F401  (re-exported: the keys logged here)
from alignkit.objective import ObjectiveOutput, grpo_objective
from alignkit.rollout import sample_generator
from alignkit.types import Credit, Rollout, Transitions, index_batch

logger = logging.getLogger(__name__)

# stream tags of the random streams drawn from one (seed, epoch, inner epoch); see alignkit.trainer
TAG_SUBSAMPLE, TAG_SHUFFLE = 103, 104

STATS = ("loss", "policy_loss", "kl", "ratio_mean", "clip_fraction", "approx_kl")



def distinct_inputs(input_id: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Groups of equal ids, numbered in order of first appearance.

    Args:
        input_id: ``[B]`` long.

    Returns:
        ``(first [U], group [B])``: the position of each group's first row, and each row's group.
    """
    n = len(input_id)
    _, inverse = torch.unique(input_id, return_inverse=True)  # [B], groups numbered by id value
    u = int(inverse.max()) + 1 if n else 0
    first = torch.full((u,), n, dtype=torch.long).scatter_reduce(0, inverse, torch.arange(n), "amin")  # [U]
    order = torch.argsort(first)  # groups by first appearance
    rank = torch.empty_like(order)
    rank[order] = torch.arange(u)
    return first[order], rank[inverse]


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
        meter: counts the update's model FLOPs (phase ``train``), or None.
    """

    def __init__(self, cfg: RunConfig, accelerator: Any, sampler: Sampler, module: torch.nn.Module,
                 params: list[torch.nn.Parameter], optimizer: Any, lr_scheduler: Any, ema: EMA | None,
                 shard: Shard, fsdp: bool, output_dir: Path, meter: FlopMeter | None = None) -> None:
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
        self.meter = meter
        self._warned_large_group = False

    @property
    def shared(self) -> bool:
        """Whether transitions sharing an input are evaluated once (``train.shared_inputs``)."""
        return self.cfg.train.shared_inputs

    def tied(self, credit: Credit) -> torch.Tensor:
        """``[M]`` bool: trainable transitions left out by ``algo.objective.skip_tied`` (advantage exactly 0)."""
        if not self.cfg.algo.objective.skip_tied:
            return torch.zeros_like(credit.mask)
        return credit.mask & (credit.advantage == 0)

    def training_rows(self, transitions: Transitions, credit: Credit, epoch: int, inner: int) -> torch.Tensor:
        """Global indices of the transitions to train on this inner epoch, shuffled (the same on every process).

        ``timestep_fraction < 1`` keeps a random subset of each sample's stored steps; ``skip_tied`` drops
        transitions of advantage exactly 0. With shared inputs whole input groups are shuffled: the rows of one
        group are contiguous, in index order.
        """
        tr = transitions
        keep = credit.mask & ~self.tied(credit)  # [M]
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
        gen = sample_generator(self.cfg.seed, epoch, inner, TAG_SHUFFLE)
        if not self.shared:
            return rows[torch.randperm(len(rows), generator=gen)]
        first, group = distinct_inputs(tr.input_id[rows])  # [G], [R]
        perm = torch.randperm(len(first), generator=gen)  # [G] with all groups singletons: the rows' permutation
        place = torch.empty_like(perm)
        place[perm] = torch.arange(len(perm))  # [G] position of each group in the shuffled order
        return rows[torch.argsort(place[group], stable=True)]

    def minibatches(self, transitions: Transitions, credit: Credit, epoch: int, inner: int) -> list[torch.Tensor]:
        """The global minibatches of one inner epoch: :meth:`training_rows` cut into ``train.train_batch_size``
        rows, or, with shared inputs, whole input groups packed in order into minibatches of at most that many
        transitions (a larger group alone in its own)."""
        rows = self.training_rows(transitions, credit, epoch, inner)
        size = self.cfg.train.train_batch_size
        if not self.shared or not len(rows):
            return [b for b in torch.split(rows, size) if len(b)]  # none when every row is masked
        _, group = distinct_inputs(transitions.input_id[rows])  # contiguous groups: 0, 0, 1, 2, 2, ...
        bounds = [*torch.nonzero(torch.diff(group, prepend=group.new_tensor([-1]))).flatten().tolist(), len(rows)]
        out: list[torch.Tensor] = []
        start = 0
        for a, b in itertools.pairwise(bounds):
            if b - a > size and not self._warned_large_group:
                self._warned_large_group = True
                logger.warning("an input group of %d transitions (the children of one branch point) exceeds "
                               "train.train_batch_size=%d: it forms a minibatch of its own (one forward; raise "
                               "train.train_batch_size to at least the group size to silence this)", b - a, size)
            if b - start > size and a > start:
                out.append(rows[start:a])
                start = a
        if start < len(rows):
            out.append(rows[start:])
        return out

    def minibatch_loss(self, rollout: Rollout, credit: Credit, rows: torch.Tensor,
                       global_rows: torch.Tensor | None = None) -> ObjectiveOutput:
        """Objective of this process's transitions ``rows`` (local indices ``[b]``); ``global_rows`` ``[b]``
        index ``credit`` (the same as ``rows`` for one process).

        With shared inputs each distinct input among ``rows`` is evaluated once (policy and reference) and its
        distribution indexed out to the transitions that share it; otherwise each row is evaluated.
        """
        g = rows if global_rows is None else global_rows
        tr: Transitions = rollout.transitions.select(rows)
        inputs, group = tr, None
        if self.shared:
            first, shared = distinct_inputs(tr.input_id)  # [u], [b]
            if len(first) < len(tr):  # else every row is its own input: evaluated as they are
                inputs, group = tr.select(first), shared
                _check_shared(tr, inputs, group, rollout.keys.prompt_index)
        cond = index_batch(rollout.cond, rollout.keys.prompt_index[inputs.sample_index])
        step = inputs.step.to(self.device)
        dist = self.sampler.transition(inputs.state, step, cond, stochastic=True)
        spread = dist if group is None else dist.index(group.to(self.device))  # [b] distributions
        log_prob = spread.log_prob(tr.next_state)  # [b]
        kl = None
        if self.cfg.algo.objective.beta > 0:
            with torch.no_grad(), self.sampler.reference():
                ref = self.sampler.transition(inputs.state, step, cond, stochastic=True)
            kl = dist.kl(ref)  # [u] per input: the same value for every transition sharing it
            if group is not None:
                kl = kl[group.to(kl.device)]  # [b]
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

        Counts of the epoch (all processes, inner epochs summed, skipped steps included):
        ``train/transitions_trained`` (rows of the minibatches), ``train/distinct_inputs`` (distinct inputs
        among them), ``train/inputs_evaluated`` (policy forwards: the distinct inputs with shared inputs, the
        transitions without) and ``train/tied_skipped`` (transitions left out by ``skip_tied``, once per epoch).

        Args:
            rollout: this process's rollout (states of its own transitions).
            layout: the epoch's global structure (:func:`alignkit.distributed.gather_rollout`).
            credit: global advantages and weights ``[M]``.
            epoch: the epoch (seeds the subsampling and shuffling).
            state: the run's counters, updated in place.
        """
        t = self.cfg.train
        stats = torch.zeros(len(STATS) + 1, dtype=torch.float64)  # per-minibatch means summed, + first ratio
        counts = torch.zeros(3, dtype=torch.float64)  # this process's rows, distinct inputs, inputs evaluated
        minibatches = 0
        skipped = 0
        grad_norms: list[float] = []
        self.sampler.train(True)
        for inner in range(t.inner_epochs):
            batches = self.minibatches(layout.transitions, credit, epoch, inner)
            accum = t.gradient_accumulation_steps
            for start in range(0, len(batches), accum):
                group = batches[start:start + accum]
                step_stats, norm = self._step(rollout, credit, layout, group, state, counts,
                                              first=minibatches == 0)
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
        self.shard.sum_(counts)
        out = {f"train/{k}": float(stats[i]) / minibatches if minibatches else math.nan
               for i, k in enumerate(STATS)}
        out["train/grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
        out["train/first_ratio"] = float(stats[-1]) if minibatches else math.nan
        out["train/minibatches"] = float(minibatches)
        out["train/skipped_steps"] = float(skipped)
        out["train/lr"] = float(self.lr_scheduler.get_last_lr()[0])
        out["train/transitions_trained"] = float(counts[0])
        out["train/distinct_inputs"] = float(counts[1])
        out["train/inputs_evaluated"] = float(counts[2])
        out["train/tied_skipped"] = float(self.tied(credit).sum())
        return out

    def _step(self, rollout: Rollout, credit: Credit, layout: Gathered, group: list[torch.Tensor],
              state: TrainState, counts: torch.Tensor, first: bool) -> tuple[torch.Tensor, float | None]:
        """One optimizer step over the global minibatches ``group``; ``(this process's share of the summed
        minibatch statistics, gradient norm)``, the norm None when the step was skipped as non-finite.
        ``counts`` (``[3]``: transitions, distinct inputs, inputs evaluated of this process) grows in place."""
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
            distinct = len(torch.unique(rollout.transitions.input_id[local]))
            evaluated = distinct if self.shared else len(local)
            with self._gradient_sync(last=b == len(group) - 1):
                # FLOPs depend on the rows evaluated and the per-row shapes of state and conditioning
                key = (evaluated, shape_key(rollout.transitions.state[:0], {k: v[:0] for k, v in rollout.cond.items()}))
                out, finite = maybe_meter(self.meter, "train", key, functools.partial(
                    self._forward_backward, rollout, credit, local, global_rows, share / len(group)))
                if share and not finite:
                    reason = f"loss {float(out.loss.detach())} on process {self.shard.rank}"
                    if not self.fsdp:
                        break
            if not share:
                continue
            counts += torch.tensor([len(local), distinct, evaluated], dtype=torch.float64)
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

    def _forward_backward(self, rollout: Rollout, credit: Credit, local: torch.Tensor, global_rows: torch.Tensor,
                          scale: float) -> tuple[ObjectiveOutput, bool]:
        """The objective of ``local`` rows and its backward scaled by ``scale``; ``(objective, loss finite)``.
        A non-finite loss is not backpropagated, except under FSDP (every process must run every backward)."""
        out = self.minibatch_loss(rollout, credit, local, global_rows)
        finite = bool(torch.isfinite(out.loss))
        if finite or self.fsdp:
            self.accelerator.backward(out.loss * scale)
        return out, finite

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
            kept = kept_checkpoint_phrase(self.out)
            raise NonFiniteError(
                f"{s.consecutive_nonfinite} consecutive optimizer steps had a non-finite loss or gradient (last: "
                f"{reason}; limit train.max_nonfinite_steps={limit}) at epoch {s.epoch}; {kept}. Lower "
                "train.learning_rate, check that the sampler's log-probs are finite (backbone.dtype=float32 "
                "helps), or raise train.max_nonfinite_steps"
            )


def _check_shared(tr: Transitions, inputs: Transitions, group: torch.Tensor, prompt_index: torch.Tensor) -> None:
    """Transitions given one input id must have one input: the same state, step and prompt as their group's
    first row (a broken id would silently train on the wrong distribution)."""
    g = group.to(tr.state.device)
    same = (torch.equal(tr.state, inputs.state[g]) and torch.equal(tr.step, inputs.step[group])
            and torch.equal(prompt_index[tr.sample_index], prompt_index[inputs.sample_index][group]))
    if not same:
        raise AssertionError("transitions with one input_id have different inputs (state, step or prompt); the "
                             "rollout assigned the ids wrongly. Set train.shared_inputs=false to train without them")
