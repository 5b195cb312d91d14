"""The GRPO trainer: the epoch loop rollout -> score -> credit -> update -> log -> checkpoint, on accelerate.

The phases live in their own modules: building the components (:mod:`alignkit.build`), the update step
(:mod:`alignkit.update`), held-out evaluation (:mod:`alignkit.evaluation`) and checkpoint state
(:mod:`alignkit.checkpoint`); the trainer wires them together and passes each phase's result to the next.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from alignkit.build import build_components, build_optimizer, build_sampler, resolve_device
from alignkit.checkpoint import (
    CheckpointParts,
    TrainState,
    open_checkpoint,
    prompt_fingerprint,
    restore_checkpoint,
    save_training_checkpoint,
)
from alignkit.config import ConfigError, RunConfig
from alignkit.credit import CreditAssigner
from alignkit.distributed import Gathered, Shard, canonical_order, gather_rollout, on_every_process
from alignkit.ema import EMA
from alignkit.errors import NonFiniteError
from alignkit.evaluation import evaluate, evaluate_heldout, evaluation_prompts, save_preview
from alignkit.fsdp import shard_module
from alignkit.interfaces import Sampler
from alignkit.metrics import MetricsWriter
from alignkit.plans import ExplorationPlan, PlanSchedule
from alignkit.prompts import load_prompts
from alignkit.reward_set import OverlappedScorer, RewardSet
from alignkit.rollout import RolloutRequest, sample_generator
from alignkit.types import Credit, Rollout
from alignkit.update import Updater

logger = logging.getLogger(__name__)

# stream tags separating the random streams drawn from one (seed, epoch); 103 and 104 are alignkit.update's
_TAG_PROMPTS, _TAG_PLAN = 101, 102


__all__ = ["EpochCredit", "EpochRollout", "NonFiniteError", "TrainState", "Trainer", "build_sampler", "evaluate",
           "prompt_fingerprint", "resolve_device"]


@dataclass
class EpochRollout:
    """Result of the rollout phase: this process's share of one epoch.

    Attributes:
        rollout: the samples and stored transitions, transitions in (sample, step) order.
        schedule: the exploration plan's schedule of the epoch.
        scorer: the rewards being computed during the rollout (``train.overlap_rewards``), else None.
    """

    rollout: Rollout
    schedule: PlanSchedule
    scorer: OverlappedScorer | None = None


@dataclass
class EpochCredit:
    """Result of the credit phase, the same on every process.

    Attributes:
        groups: ``[S]`` group id of each sample (all processes' samples).
        score: ``[S]`` aggregated reward, NaN where a weighted reward could not score.
        credit: advantages and weights of all ``M`` transitions.
    """

    groups: torch.Tensor
    score: torch.Tensor
    credit: Credit


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
            # gradients are summed explicitly (see alignkit.update); the model's buffers are constants
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
        self.train_prompts, heldout = load_prompts(cfg.prompts)
        self.eval_prompts = evaluation_prompts(cfg.eval, heldout)  # eval.prompts, else the held-out split
        # build_sampler is looked up here at call time (tests wrap alignkit.trainer.build_sampler)
        c = build_components(cfg, self.device, sampler=sampler, reward_set=reward_set, make_sampler=build_sampler)
        self.reward_set, self.eval_reward_set, self.sampler = c.reward_set, c.eval_reward_set, c.sampler
        self.plan: ExplorationPlan = c.plan
        self.credit: CreditAssigner = c.credit
        self.engine = c.engine
        # the checkpoint to resume from is read now: its trainable weights go in before sharding
        opened = open_checkpoint(self.out, self.train_prompts, self.sampler) if cfg.train.resume else None
        if self.fsdp:
            shard_module(self.sampler.trainable_module(), self.sampler.fsdp_units(), cfg.train.mixed_precision)

        params = self.sampler.trainable_parameters()  # after sharding: the sharded parameters
        # the scheduler is not prepared: accelerate would step it once per process at every optimizer step
        self.optimizer, self.lr_scheduler = build_optimizer(cfg.train, params)
        if self.fsdp:  # sharded in place; accelerate would wrap it in DDP
            self.optimizer = self.accelerator.prepare(self.optimizer)
            module = self.sampler.trainable_module()
        else:
            module, self.optimizer = self.accelerator.prepare(self.sampler.trainable_module(), self.optimizer)
        self.sampler.set_trainable_module(module)
        self.params = params
        t = cfg.train
        self.ema = EMA(params, t.ema.decay) if t.ema.enabled else None
        self.state = TrainState() if opened is None else restore_checkpoint(
            opened, self._checkpoint_parts(), output_dir=self.out, is_main=self.is_main,
            barrier=self.accelerator.wait_for_everyone)
        self.updater = Updater(cfg, self.accelerator, self.sampler, module, params, self.optimizer,
                               self.lr_scheduler, self.ema, self.shard, self.fsdp, self.out)
        self._last_heldout: float | None = None  # latest held-out mean of the first reward, for the progress bar
        self.metrics = MetricsWriter(self.out, tensorboard=tensorboard) if self.is_main else None
        if self.shard.distributed:
            logger.warning("process %d of %d: rolls out %d of the %d prompts per epoch", self.shard.rank,
                           self.shard.world_size, t.prompts_per_epoch // self.shard.world_size, t.prompts_per_epoch)

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # --- checkpoints ----------------------------------------------------------------------------------

    def _checkpoint_parts(self) -> CheckpointParts:
        # the scaler is read now: accelerate may install it after the trainer is built
        return CheckpointParts(sampler=self.sampler, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                               scaler=self.accelerator.scaler, ema=self.ema, fsdp=self.fsdp)

    def save(self) -> Path | None:
        """Write a checkpoint of everything the next epoch depends on (:func:`save_training_checkpoint`).
        Call it on every process; the main process writes and returns the folder (None elsewhere).

        Raises:
            CheckpointError: the write failed (on every process); earlier checkpoints are intact.
        """
        return save_training_checkpoint(self.out, self.state, self._checkpoint_parts(), prompts=self.train_prompts,
                                        cfg=self.cfg, shard=self.shard, is_main=self.is_main)

    # --- one epoch ------------------------------------------------------------------------------------

    def rollout(self, epoch: int) -> EpochRollout:
        """This process's share of epoch ``epoch``'s rollout, transitions in (sample, step) order; with
        ``train.overlap_rewards`` its samples are scored while it runs (collected by :meth:`score`)."""
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
        return EpochRollout(rollout=rollout, schedule=schedule, scorer=scorer)

    def score(self, rolled: EpochRollout) -> Gathered:
        """Rewards of this process's samples (already computed during the rollout when
        ``train.overlap_rewards``), gathered over processes with the keys and transition bookkeeping.

        Raises:
            RewardError: a reward raised on any process.
        """
        rollout, scorer = rolled.rollout, rolled.scorer
        table = on_every_process(
            self.shard,
            scorer.result if scorer is not None  # waits only for the chunks still being scored
            else lambda: self.reward_set.score(rollout.samples, rollout.sample_prompts, rollout.sample_metadata))
        return gather_rollout(self.shard, table, rollout.keys, rollout.transitions,
                              num_prompts=len(rollout.prompts), nfe=rollout.nfe)

    def assign_credit(self, gathered: Gathered) -> EpochCredit:
        """Group ids, aggregated scores ``[S]`` and credit ``[M]`` of the whole epoch (every process)."""
        groups = self.credit.groups(gathered.keys)  # [S]
        c = self.cfg.algo.credit
        score = self.reward_set.aggregate(gathered.table, groups, std=c.std, eps=c.eps)  # [S]
        credit = self.credit.assign(score, gathered.keys, gathered.transitions, groups=groups)
        return EpochCredit(groups=groups, score=score, credit=credit)

    def optimize(self, rollout: Rollout, gathered: Gathered, credit: Credit, epoch: int) -> dict[str, float]:
        """Inner epochs of clipped updates over the stored transitions (:meth:`Updater.optimize`)."""
        return self.updater.optimize(rollout, gathered, credit, epoch, self.state)

    # --- the loop -------------------------------------------------------------------------------------

    def train(self) -> TrainState:
        """Train from the current epoch (0, or the resumed checkpoint's) to ``train.epochs``."""
        cfg = self.cfg
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
                rolled = self.rollout(epoch)
                t1 = time.perf_counter()
                gathered = self.score(rolled)
                scored = self.assign_credit(gathered)
                t2 = time.perf_counter()
                stats = self.optimize(rolled.rollout, gathered, scored.credit, epoch)
                t3 = time.perf_counter()
                self.state.epoch += 1
                self.state.nfe_total += gathered.nfe
                self.state.seconds_total += t3 - t0
                metrics = self._epoch_metrics(gathered, scored, stats, (t0, t1, t2, t3))
                last = self.state.epoch == cfg.train.epochs
                if (cfg.eval.every and self.state.epoch % cfg.eval.every == 0) or (last and cfg.eval.before_after):
                    after = self.evaluate_heldout("eval_after" if last else f"eval_{self.state.epoch:05d}")
                    metrics.update(after)
                    if last and self.is_main:
                        bar.write("held-out after training: " + _fmt(after))
                if self.is_main:
                    if epoch % cfg.train.sample_every == 0 or last:
                        save_preview(self.sampler, rolled.rollout, scored.score,
                                     self.out / "samples" / f"epoch_{epoch:05d}.png")
                    metrics["time/epoch_s"] = time.perf_counter() - t0
                    self.metrics.write(self.state.epoch, metrics)
                    bar.set_postfix(self._postfix(metrics))
                    bar.update(1)
                self.state.history.append(metrics)
                if self.state.epoch % cfg.train.checkpoint_every == 0 or last:
                    self.save()
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

    def _epoch_metrics(self, gathered: Gathered, scored: EpochCredit, stats: dict[str, float],
                       times: tuple[float, float, float, float]) -> dict[str, float]:
        """Metrics of the whole epoch (all processes): rewards, credit, rollout sizes, timings, training."""
        t0, t1, t2, t3 = times
        table, score, credit = gathered.table, scored.score, scored.credit
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
        """Deterministic sampling of the evaluation prompts over all processes (EMA weights when enabled;
        :func:`alignkit.evaluation.evaluate_heldout`); the main process writes ``samples/<name>.png``.

        Returns ``eval/<reward>`` means (NaN-masked) for the training and evaluation-only rewards.
        """
        preview = self.out / "samples" / f"{name}.png" if self.is_main else None
        out = evaluate_heldout(self.sampler, self.eval_reward_set, self.eval_prompts, self.cfg.eval, self.shard,
                               ema=self.ema, preview=preview)
        self._last_heldout = next(iter(out.values()))  # the first training reward
        return out


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in metrics.items())
