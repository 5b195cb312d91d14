"""The GRPO trainer: rollout -> reward -> credit -> clipped policy updates, on accelerate."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from alignkit.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
    set_rng_state,
)
from alignkit.config import ConfigError, RunConfig, to_dict
from alignkit.credit import CreditAssigner, build_credit
from alignkit.distributed import Gathered, Shard, canonical_order, gather_rollout
from alignkit.ema import EMA
from alignkit.errors import CheckpointError, ModelLoadError, NonFiniteError, RewardError
from alignkit.fsdp import full, gather_full, shard_module, shard_optimizer_state, trainable_state
from alignkit.interfaces import Sampler
from alignkit.metrics import MetricsWriter, read_metrics
from alignkit.objective import grpo_objective
from alignkit.plans import ExplorationPlan, PlanSchedule, build_plan
from alignkit.prompts import PromptSet, load_prompts
from alignkit.registry import SAMPLERS
from alignkit.reward_set import OverlappedScorer, RewardSet, RewardTable
from alignkit.rollout import RolloutEngine, RolloutRequest, sample_generator
from alignkit.types import Credit, Rollout, Transitions, index_batch

logger = logging.getLogger(__name__)

T = TypeVar("T")

# stream tags separating the random streams drawn from one (seed, epoch)
_TAG_PROMPTS, _TAG_PLAN, _TAG_SUBSAMPLE, _TAG_SHUFFLE = 101, 102, 103, 104


__all__ = ["NonFiniteError", "TrainState", "Trainer", "build_sampler", "evaluate", "resolve_device"]

def resolve_device(name: str) -> torch.device:
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
        return factory.from_config(
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


@dataclass
class TrainState:
    """Progress counters, saved in every checkpoint (``history`` is not: it is re-read from metrics.jsonl).

    Attributes:
        epoch: completed epochs; also the position in the prompt source (epoch ``e`` draws its prompts
            from a generator seeded by ``(seed, e)``).
        global_step: optimizer steps taken.
        nonfinite_skipped: optimizer steps skipped because a loss or the gradient was NaN / inf.
        scale_overflows: fp16 steps skipped by the loss scaler (gradients overflowed; it lowered its scale);
            not counted as non-finite.
        consecutive_nonfinite: skipped steps since the last good one (``train.max_nonfinite_steps`` bounds it).
        nfe_total: model evaluations of all processes so far.
        seconds_total: training wall time so far (rollout to update; evaluation excluded).
        history: this process's per-epoch metrics.
    """

    epoch: int = 0
    global_step: int = 0
    nonfinite_skipped: int = 0
    scale_overflows: int = 0
    consecutive_nonfinite: int = 0
    nfe_total: int = 0
    seconds_total: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def prompt_fingerprint(prompts: PromptSet) -> str:
    """sha256 of the training prompts and their metadata (a resumed run must draw from the same source)."""
    body = json.dumps([prompts.prompts, prompts.metadata], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


class Trainer:
    """Runs a recipe. Everything random is drawn from generators seeded by ``(seed, epoch, ...)``.

    Under ``accelerate launch`` each process rolls out an equal, contiguous share of the epoch's prompts
    (``train.prompts_per_epoch`` is the global count) and scores its own samples; rewards, keys and the
    transitions' bookkeeping are gathered before credit assignment (:mod:`alignkit.distributed`), so groups
    span processes and every process holds the same global advantages. Training minibatches are global
    too: the same shuffled order of all transitions is cut into ``train.train_batch_size`` rows, each process
    computes the loss of the rows it holds scaled by its share, and the gradients are summed over processes
    before each optimizer step. The update therefore equals that of one process with the same recipe, up to
    floating-point summation order, whatever the number of processes.

    Args:
        cfg: the validated run configuration.
        sampler: a prebuilt sampler (tests, benchmarks); built from ``cfg.backbone`` when None.
        reward_set: prebuilt rewards; built from ``cfg.reward`` when None.
    """

    def __init__(self, cfg: RunConfig, sampler: Sampler | None = None, reward_set: RewardSet | None = None,
                 *, tensorboard: bool = True) -> None:
        from accelerate import Accelerator, DistributedDataParallelKwargs
        from accelerate.utils import set_seed

        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        on_cpu = resolve_device(cfg.device).type == "cpu"
        if cfg.train.mixed_precision == "fp16" and on_cpu:
            # accelerate would run such a run in float32 without a word
            raise ConfigError([f"train.mixed_precision=fp16 on device={cfg.device!r} (CPU): fp16 autocast and loss "
                               "scaling need a GPU; use train.mixed_precision=bf16 or no on CPU"])
        self.accelerator = Accelerator(
            mixed_precision=cfg.train.mixed_precision, cpu=on_cpu,
            # gradients are summed explicitly (see _reduce_gradients); the model's buffers are constants
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
        self.shard = Shard(self.accelerator.process_index, self.accelerator.num_processes)
        self.fsdp = cfg.train.sharding == "fsdp" and self.shard.distributed
        if cfg.train.sharding == "fsdp" and not self.shard.distributed:
            logger.warning("train.sharding=fsdp with one process: nothing to shard, the model stays whole")
        self.shard.block(list(range(cfg.train.prompts_per_epoch)), "train.prompts_per_epoch")  # fail before loading
        self.device = self.accelerator.device
        # alignkit draws from generators seeded per (seed, epoch, ...); the global RNGs (torch, CUDA, Python,
        # NumPy) are seeded too, for code outside it, and saved in checkpoints
        set_seed(cfg.seed)
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
        # the checkpoint to resume from is opened now: its trainable weights go in before sharding
        self._resume_from = self._open_checkpoint(latest_checkpoint(self.out)) if cfg.train.resume else None
        if self.fsdp:
            shard_module(self.sampler.trainable_module(), self.sampler.fsdp_units(), cfg.train.mixed_precision)

        params = self.sampler.trainable_parameters()  # after sharding: the sharded parameters
        if not params:
            raise ValueError("the backbone has no trainable parameters: enable backbone.lora or full fine-tuning")
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            params, lr=t.learning_rate, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay
        )
        warmup = t.warmup_steps
        # not prepared: accelerate would step a prepared scheduler once per process at every optimizer step
        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup > 0 else 1.0
        )
        if self.fsdp:  # sharded in place; accelerate would wrap it in DDP
            self.optimizer = self.accelerator.prepare(self.optimizer)
            module = self.sampler.trainable_module()
        else:
            module, self.optimizer = self.accelerator.prepare(self.sampler.trainable_module(), self.optimizer)
        self.sampler.set_trainable_module(module)
        self._module = module
        self.params = params
        self.ema = EMA(params, t.ema.decay) if t.ema.enabled else None
        self._last_heldout: float | None = None  # latest held-out mean of the first reward, for the progress bar
        self._pending_scorer: OverlappedScorer | None = None  # scoring during the rollout (train.overlap_rewards)
        self._gathered: Gathered | None = None  # the global structure of the epoch being trained (score())
        self.state = TrainState()
        self.metrics = MetricsWriter(self.out, tensorboard=tensorboard) if self.is_main else None
        if self.shard.distributed:
            logger.warning("process %d of %d: rolls out %d of the %d prompts per epoch", self.shard.rank,
                           self.shard.world_size, t.prompts_per_epoch // self.shard.world_size, t.prompts_per_epoch)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # --- checkpoints ----------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """Write a checkpoint of everything the next epoch depends on. Call it on every process: sharded
        state (``train.sharding=fsdp``) is gathered from all of them; the main process writes and returns
        the folder (None elsewhere).

        Raises:
            CheckpointError: the write failed; earlier checkpoints are intact.
        """
        opt_state = self.optimizer.state_dict()
        ema = self.ema.state_dict() if self.ema is not None else {}
        params = None
        if self.fsdp:
            opt_state, ema = gather_full(opt_state), gather_full(ema)
            params = trainable_state(self.sampler.trainable_module())
        if not self.is_main:
            return None
        opt_tensors, opt_meta = optimizer_to_flat(opt_state)
        tensors = {**opt_tensors, **ema}
        s = self.state
        meta = {
            "epoch": s.epoch, "global_step": s.global_step, "nonfinite_skipped": s.nonfinite_skipped,
            "scale_overflows": s.scale_overflows,
            "grad_scaler": self.accelerator.scaler.state_dict() if self.accelerator.scaler is not None else None,
            "consecutive_nonfinite": s.consecutive_nonfinite, "nfe_total": s.nfe_total,
            "seconds_total": s.seconds_total, "optimizer": opt_meta, "lr_scheduler": self.lr_scheduler.state_dict(),
            "prompts": {"fingerprint": prompt_fingerprint(self.train_prompts), "count": len(self.train_prompts),
                        "drawn": s.epoch * self.cfg.train.prompts_per_epoch},
            "world_size": self.shard.world_size, "config": to_dict(self.cfg),
        }
        return save_checkpoint(self.out, s.global_step,
                               write_trainable=functools.partial(self.sampler.save_trainable, params=params),
                               tensors=tensors, meta=meta, keep=self.cfg.train.keep_checkpoints)

    def _open_checkpoint(self, path: Path | None) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
        """Read checkpoint ``path`` and load its trainable weights into the sampler (before sharding or
        wrapping); the rest is restored by :meth:`resume`. None when ``path`` is None.

        Raises:
            CheckpointError: the checkpoint cannot be read, or was written for other training prompts.
        """
        if path is None:
            return None
        tensors, meta = load_checkpoint(path)
        saved = meta.get("prompts", {}).get("fingerprint")
        if saved is not None and saved != prompt_fingerprint(self.train_prompts):
            raise CheckpointError(
                f"checkpoint {path} was written for other training prompts (fingerprint {saved}, now "
                f"{prompt_fingerprint(self.train_prompts)}); resuming would not continue that run. Use a new "
                "output_dir, or set train.resume=false to start afresh in this one"
            )
        try:
            self.sampler.load_trainable(path / "trainable")
        except Exception as exc:  # safetensors, peft and the adapter each raise their own types
            raise CheckpointError(f"checkpoint {path}: the trainable weights cannot be loaded ({exc}); delete the "
                                  "folder to resume from an older checkpoint") from exc
        return path, tensors, meta

    def resume(self) -> bool:
        """Continue from the checkpoint opened when the trainer was built (the latest one in the output
        folder, ``train.resume``); False when there is none.

        Its trainable weights are already loaded; this restores the optimizer, LR scheduler, EMA, counters
        and global RNG states, and drops rows of ``metrics.jsonl`` written after the checkpoint (epochs that
        will be trained again).
        """
        if self._resume_from is None:
            return False
        path, tensors, meta = self._resume_from
        self._resume_from = None
        set_rng_state(tensors, meta)  # again: whatever was drawn since the checkpoint was opened is undone
        self.optimizer.load_state_dict(optimizer_from_flat(tensors, meta["optimizer"]))
        if self.fsdp:
            shard_optimizer_state(self.optimizer.optimizer)
        self.lr_scheduler.load_state_dict(meta["lr_scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict({k: v for k, v in tensors.items() if k.startswith("ema.")})
        self.state.epoch = meta["epoch"]
        self.state.global_step = meta["global_step"]
        self.state.nonfinite_skipped = meta.get("nonfinite_skipped", 0)
        self.state.scale_overflows = meta.get("scale_overflows", 0)
        if self.accelerator.scaler is not None and meta.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(meta["grad_scaler"])
        self.state.consecutive_nonfinite = meta.get("consecutive_nonfinite", 0)
        self.state.nfe_total = meta.get("nfe_total", 0)
        self.state.seconds_total = meta.get("seconds_total", 0.0)
        self.state.history = self._truncate_metrics(self.state.epoch)
        logger.info("resumed from %s (epoch %d, step %d)", path, self.state.epoch, self.state.global_step)
        return True

    def _truncate_metrics(self, epoch: int) -> list[dict[str, float]]:
        """Keep the ``metrics.jsonl`` rows of epochs ``<= epoch`` (main process rewrites the file atomically);
        returns the kept rows of trained epochs."""
        path = self.out / "metrics.jsonl"
        rows = read_metrics(path) if path.is_file() else []
        kept = [r for r in rows if r.get("epoch", 0) <= epoch]
        if self.is_main and len(kept) < len(rows):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))
            os.replace(tmp, path)
            logger.info("metrics.jsonl: dropped %d rows written after the checkpoint", len(rows) - len(kept))
        self.accelerator.wait_for_everyone()
        return [r for r in kept if r.get("epoch", 0) >= 1 and "reward/score_mean" in r]

    def _checkpoint(self) -> None:
        """Save (the main process writes); every process raises if the save failed."""
        failure = None
        try:
            self.save()
        except CheckpointError as exc:
            failure = str(exc)
        failures = [f for f in self.shard.gather(failure) if f]
        if failures:
            raise CheckpointError(failures[0])

    # --- one epoch ------------------------------------------------------------------------------------

    def rollout(self, epoch: int) -> tuple[Rollout, PlanSchedule]:
        """This process's share of epoch ``epoch``'s rollout, transitions in (sample, step) order."""
        cfg = self.cfg
        gen = sample_generator(cfg.seed, epoch, _TAG_PROMPTS)
        ids = self.train_prompts.epoch_selection(cfg.train.prompts_per_epoch, gen, cfg.prompts.shuffle)
        ids = self.shard.block(ids, "train.prompts_per_epoch")
        schedule = self.plan.schedule(self.sampler.num_steps, epoch, sample_generator(cfg.seed, epoch, _TAG_PLAN))
        request = RolloutRequest(
            prompts=[self.train_prompts.prompts[i] for i in ids], prompt_ids=ids,
            metadata=[self.train_prompts.metadata[i] for i in ids], num_seeds=cfg.algo.num_seeds,
            seed=cfg.seed, iteration=epoch,
        )
        scorer = OverlappedScorer(self.reward_set, request.prompts, request.metadata) \
            if cfg.train.overlap_rewards else None
        rollout = self.engine.run(request, schedule, sink=scorer.submit if scorer is not None else None)
        rollout = replace(rollout, transitions=canonical_order(rollout.transitions, rollout.num_steps))
        self._pending_scorer = scorer
        return rollout, schedule

    def score(self, rollout: Rollout) -> tuple[RewardTable, torch.Tensor, Credit]:
        """Rewards of this process's samples (already computed during the rollout when
        ``train.overlap_rewards``), gathered over processes; the global scores ``[S]`` and credit ``[M]``.

        Raises:
            RewardError: a reward raised on any process.
        """
        scorer, self._pending_scorer = self._pending_scorer, None
        table = self._on_every_process(
            scorer.result if scorer is not None  # waits only for the chunks still being scored
            else lambda: self.reward_set.score(rollout.samples, rollout.sample_prompts, rollout.sample_metadata))
        g = gather_rollout(self.shard, table, rollout.keys, rollout.transitions, num_prompts=len(rollout.prompts),
                           nfe=rollout.nfe)
        self._gathered = g
        groups = self.credit.groups(g.keys)
        c = self.cfg.algo.credit
        score = self.reward_set.aggregate(g.table, groups, std=c.std, eps=c.eps)
        return g.table, score, self.credit.assign(score, g.keys, g.transitions)

    def _on_every_process(self, fn: Callable[[], T]) -> T:
        """``fn()`` (scoring); an exception on any process raises :class:`RewardError` on every process, so
        that none waits in a later collective for one that failed."""
        if not self.shard.distributed:
            return fn()
        result, failure = None, None
        try:
            result = fn()
        except Exception as exc:
            failure = f"process {self.shard.rank}: {type(exc).__name__}: {exc}"
        failures = [f for f in self.shard.gather(failure) if f]
        if failures:
            raise RewardError(failures[0])
        return result  # type: ignore[return-value]

    def _layout(self, rollout: Rollout) -> Gathered:
        """The global structure :meth:`score` gathered for ``rollout`` (trivial for one process)."""
        g = self._gathered
        if g is None or g.local_transitions != len(rollout.transitions):
            if self.shard.distributed:
                raise RuntimeError("Trainer.optimize needs Trainer.score of the same rollout first")
            return Gathered(table=RewardTable({}, {}), keys=rollout.keys, transitions=rollout.transitions,
                            transition_offset=0, local_transitions=len(rollout.transitions), nfe=rollout.nfe)
        return g

    def _training_rows(self, transitions: Transitions, credit: Credit, epoch: int, inner: int) -> torch.Tensor:
        """Global indices of the transitions to train on this inner epoch, shuffled (the same on every process).

        ``timestep_fraction < 1`` keeps a random subset of each sample's stored steps.
        """
        tr = transitions
        keep = credit.mask.clone()  # [M]
        frac = self.cfg.algo.timestep_fraction
        if frac < 1.0 and len(tr):
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

    def _minibatch_loss(self, rollout: Rollout, credit: Credit, rows: torch.Tensor,
                        global_rows: torch.Tensor | None = None) -> Any:
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

    _STATS = ("loss", "policy_loss", "kl", "ratio_mean", "clip_fraction", "approx_kl")

    def optimize(self, rollout: Rollout, credit: Credit, epoch: int) -> dict[str, float]:
        """Inner epochs of clipped updates over the stored transitions.

        Each optimizer step covers ``train.gradient_accumulation_steps`` global minibatches of
        ``train.train_batch_size`` transitions; its loss is the mean over minibatches of each minibatch's
        mean. A step whose loss or gradient is NaN / inf on any process is skipped on every process and
        counted (``train/skipped_steps``, ``train/nonfinite_skipped``); more than
        ``train.max_nonfinite_steps`` consecutive skipped steps stop the run (:class:`NonFiniteError`).
        """
        t = self.cfg.train
        layout = self._layout(rollout)
        stats = torch.zeros(len(self._STATS) + 1, dtype=torch.float64)  # per-minibatch means summed, + first ratio
        minibatches = 0
        skipped = 0
        grad_norms: list[float] = []
        self.sampler.train(True)
        for inner in range(t.inner_epochs):
            rows = self._training_rows(layout.transitions, credit, epoch, inner)
            batches = list(torch.split(rows, t.train_batch_size))
            accum = t.gradient_accumulation_steps
            for start in range(0, len(batches), accum):
                group = batches[start:start + accum]
                step_stats, norm = self._update(rollout, credit, layout, group, first=minibatches == 0)
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
               for i, k in enumerate(self._STATS)}
        out["train/grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
        out["train/first_ratio"] = float(stats[-1]) if minibatches else math.nan
        out["train/minibatches"] = float(minibatches)
        out["train/skipped_steps"] = float(skipped)
        out["train/lr"] = float(self.lr_scheduler.get_last_lr()[0])
        return out

    def _update(self, rollout: Rollout, credit: Credit, layout: Gathered, group: list[torch.Tensor],
                first: bool) -> tuple[torch.Tensor, float | None]:
        """One optimizer step over the global minibatches ``group``; ``(this process's share of the summed
        minibatch statistics, gradient norm)``, the norm None when the step was skipped as non-finite."""
        stats = torch.zeros(len(self._STATS) + 1, dtype=torch.float64)
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
                out = self._minibatch_loss(rollout, credit, local, global_rows)
                if share and not bool(torch.isfinite(out.loss)):
                    reason = f"loss {float(out.loss.detach())} on process {self.shard.rank}"
                    if not self.fsdp:
                        break
                self.accelerator.backward(out.loss * (share / len(group)))
            if not share:
                continue
            values = [float(getattr(out, k).detach()) for k in self._STATS]
            stats[:-1] += torch.tensor(values, dtype=torch.float64) * share
            if first and b == 0:
                stats[-1] = float(out.ratio_mean) * share
        reason = self._reduce_gradients(reason)
        norm = None
        if not reason:
            norm = float(full(self.accelerator.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)))
            if not math.isfinite(norm):
                if self.accelerator.scaler is not None:
                    self._scale_overflow(norm)
                    return stats, None
                reason = f"gradient norm {norm}"
        if reason:
            self.optimizer.zero_grad(set_to_none=True)
            self._count_nonfinite(reason)
            return stats, None
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self.state.consecutive_nonfinite = 0
        t = self.cfg.train
        if self.ema is not None and self.state.global_step % t.ema.every == 0:
            self.ema.update()
        return stats, norm

    def _gradient_sync(self, last: bool) -> Any:
        """Context of one minibatch's backward. DDP: no synchronisation (summed in :meth:`_reduce_gradients`).
        FSDP: gradients reduce-scattered (summed) at the last minibatch of the optimizer step only."""
        if not self.fsdp:
            return self.accelerator.no_sync(self._module)
        self._module.set_requires_gradient_sync(last)
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

    def _scale_overflow(self, norm: float) -> None:
        """fp16: the scaled gradients overflowed (the loss was finite). The scaler's step skips the update and
        lowers its scale, as loss scaling intends; counted apart from non-finite steps."""
        scaler = self.accelerator.scaler
        self.optimizer.step()  # GradScaler.step sees the inf found while unscaling: no update; update() backs off
        self.optimizer.zero_grad(set_to_none=True)
        self.state.scale_overflows += 1
        logger.info("fp16 gradients overflowed (norm %s): step skipped, loss scale lowered to %g", norm,
                    scaler.get_scale())

    def _count_nonfinite(self, reason: str) -> None:
        s = self.state
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

    # --- the loop -------------------------------------------------------------------------------------

    def train(self) -> TrainState:
        cfg = self.cfg
        if cfg.train.resume:
            self.resume()
        bar = tqdm(total=cfg.train.epochs, initial=self.state.epoch, desc="alignkit", unit="epoch",
                   disable=not self.is_main, dynamic_ncols=True)
        if cfg.eval.before_after and self.state.epoch == 0:
            before = self.evaluate_heldout("eval_before")
            if self.is_main:
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
                gathered = self._layout(rollout)
                self.state.epoch += 1
                self.state.nfe_total += gathered.nfe
                self.state.seconds_total += t3 - t0
                metrics = self._epoch_metrics(gathered, table, score, credit, stats, (t0, t1, t2, t3))
                last = self.state.epoch == cfg.train.epochs
                if (cfg.eval.every and self.state.epoch % cfg.eval.every == 0) or (last and cfg.eval.before_after):
                    after = self.evaluate_heldout("eval_after" if last else f"eval_{self.state.epoch:05d}")
                    metrics.update(after)
                    if last and self.is_main:
                        bar.write("held-out after training: " + _fmt(after))
                if self.is_main:
                    if epoch % cfg.train.sample_every == 0 or self.state.epoch == cfg.train.epochs:
                        self._save_samples(rollout, score, f"epoch_{epoch:05d}")
                    metrics["time/epoch_s"] = time.perf_counter() - t0
                    self.metrics.write(self.state.epoch, metrics)
                    bar.set_postfix(self._postfix(metrics))
                    bar.update(1)
                self.state.history.append(metrics)
                self._gathered = None
                if self.state.epoch % cfg.train.checkpoint_every == 0 or self.state.epoch == cfg.train.epochs:
                    self._checkpoint()
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

    def _epoch_metrics(self, gathered: Gathered, table: RewardTable, score: torch.Tensor, credit: Credit,
                       stats: dict[str, float], times: tuple[float, float, float, float]) -> dict[str, float]:
        """Metrics of the whole epoch (all processes): rewards, credit, rollout sizes, timings, training."""
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
        m["rollout/nfe"] = float(gathered.nfe)
        m["rollout/nfe_total"] = float(self.state.nfe_total)
        m["time/total_s"] = self.state.seconds_total
        m["rollout/samples"] = float(len(gathered.keys))
        m["rollout/transitions"] = float(len(gathered.transitions))
        m["train/nonfinite_skipped"] = float(self.state.nonfinite_skipped)
        m["train/scale_overflows"] = float(self.state.scale_overflows)
        m["run/processes"] = float(self.shard.world_size)
        m["time/rollout_s"], m["time/reward_s"], m["time/train_s"] = t1 - t0, t2 - t1, t3 - t2
        m.update(stats)
        return m

    def evaluate_heldout(self, name: str) -> dict[str, float]:
        """Deterministic sampling of the evaluation prompts (EMA weights when enabled); a captioned grid.

        Every process samples and scores an equal, contiguous block of the ``eval.num_prompts`` prompts (the
        last blocks padded with repeats of the last prompt, dropped before the means: under FSDP every
        process must run as many forwards); the reward tables are gathered, so the means are those of all
        the prompts, on every process. The main process writes the preview of its block.

        Returns ``eval/<reward>`` means (NaN-masked) for the training and evaluation-only rewards.
        """
        e = self.cfg.eval
        n = min(e.num_prompts, len(self.eval_prompts))
        share = -(-n // self.shard.world_size)
        start = self.shard.rank * share
        ids = [min(i, n - 1) for i in range(start, start + share)]
        real = max(0, min(n, start + share) - start)  # prompts of this block that are not padding
        ctx = self.ema.swapped() if self.ema is not None else contextlib.nullcontext()
        with ctx:
            rollout, table = self._on_every_process(lambda: evaluate(
                self.sampler, self.eval_reward_set, self.eval_prompts, seed=e.seed,
                seeds_per_prompt=e.seeds_per_prompt, batch_size=e.batch_size, prompt_ids=ids))
        assert table is not None
        keep = rollout.keys.prompt_index < real  # [S_p]
        raw = {k: v[keep] for k, v in table.raw.items()}
        parts = self.shard.gather(raw)
        merged = {k: torch.cat([p[k] for p in parts]) for k in raw}
        out = {f"eval/{k}": float(torch.nanmean(v)) for k, v in merged.items()}
        first = next(iter(merged))  # the first training reward
        self._last_heldout = out[f"eval/{first}"]
        if self.is_main:
            self._save_samples(rollout, raw[first], name, limit=min(32, int(keep.sum())))
        return out

    def _save_samples(self, rollout: Rollout, score: torch.Tensor, name: str, limit: int = 16) -> Path | None:
        """A captioned preview of the first ``limit`` samples through the sampler's :meth:`Sampler.save_samples`
        (a PNG grid or frame strips; adapters may add media files, e.g. wav for audio, mp4 for video)."""
        samples = rollout.samples
        if not isinstance(samples, torch.Tensor):
            return None
        n = min(limit, samples.shape[0])
        prompts = rollout.sample_prompts
        captions = [f"{prompts[i]} | r={float(score[i]):.3g}" for i in range(n)]
        return self.sampler.save_samples(samples[:n], captions, self.out / "samples" / f"{name}.png")


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in metrics.items())


def evaluate(
    sampler: Sampler, reward_set: RewardSet, prompts: PromptSet, *, seed: int, seeds_per_prompt: int,
    batch_size: int, limit: int | None = None, prompt_ids: Sequence[int] | None = None,
) -> tuple[Rollout, RewardTable]:
    """Deterministic (ODE / argmax) sampling of held-out prompts and their reward table.

    Args:
        limit: the first ``limit`` prompts (all when None).
        prompt_ids: these prompts instead (indices into ``prompts``; a sample's noise depends on its id, so a
            prompt gives the same samples in any selection).
    """
    from alignkit.plans import Deterministic

    if prompt_ids is None:
        prompt_ids = range(len(prompts) if limit is None else min(limit, len(prompts)))
    ids = list(prompt_ids)
    engine = RolloutEngine(sampler, batch_size=batch_size)
    request = RolloutRequest(prompts=[prompts.prompts[i] for i in ids], prompt_ids=ids,
                             metadata=[prompts.metadata[i] for i in ids], num_seeds=seeds_per_prompt, seed=seed,
                             iteration=0)
    rollout = engine.run(request, Deterministic().schedule(sampler.num_steps, 0, torch.Generator()))
    table = reward_set.score(rollout.samples, rollout.sample_prompts, rollout.sample_metadata)
    return rollout, table
