"""The GRPO trainer: the epoch loop rollout -> score -> credit -> update -> log -> checkpoint, on accelerate.

The phases live in their own modules: building the components (:mod:`alignkit.build`), the update step
(:mod:`alignkit.update`), held-out evaluation (:mod:`alignkit.evaluation`) and checkpoint state
(:mod:`alignkit.checkpoint`); the trainer wires them together and passes each phase's result to the next.
"""

from __future__ import annotations

import logging
import math
import os
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from alignkit.build import build_components, build_optimizer, build_sampler, resolve_device
from alignkit.checkpoint import (
    CheckpointParts,
    TrainState,
    kept_checkpoint_phrase,
    latest_checkpoint,
    open_checkpoint,
    prompt_fingerprint,
    restore_checkpoint,
    save_training_checkpoint,
    truncate_metrics,
)
from alignkit.config import ConfigError, RunConfig, to_dict
from alignkit.cost import FlopMeter
from alignkit.cpu_threads import configure_threads
from alignkit.credit import CreditAssigner
from alignkit.distributed import Gathered, Shard, canonical_order, gather_rollout, on_every_process
from alignkit.ema import EMA
from alignkit.errors import Interrupted, MaskedError, NonFiniteError, RunFolderError
from alignkit.evaluation import evaluate, evaluate_heldout, evaluation_prompts, save_preview
from alignkit.fsdp import shard_module
from alignkit.interfaces import Sampler
from alignkit.interrupt import StopRequest
from alignkit.metrics import MetricsWriter, flat_config, tracker_settings
from alignkit.plans import ExplorationPlan, PlanSchedule
from alignkit.prompts import load_prompts
from alignkit.provenance import append_environment, environment
from alignkit.reward_set import OverlappedScorer, RewardSet
from alignkit.rollout import RolloutRequest, sample_generator
from alignkit.run_folder import ResumeCheck, RunLock, check_resume, check_run_folder, lock_run_folder
from alignkit.summary import describe_run, format_count, format_summary, short_names, write_summary
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
            **tracker_settings(self.out, cfg.train.log_with if tensorboard else []),
        )
        self.shard = Shard(self.accelerator.process_index, self.accelerator.num_processes)
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or (self.shard.world_size if self.shard.distributed else 1)
        self.threads = configure_threads(cfg.train.cpu_threads, local)
        self.fsdp = cfg.train.sharding == "fsdp" and self.shard.distributed
        if cfg.train.sharding == "fsdp" and not self.shard.distributed:
            logger.warning("train.sharding=fsdp with one process: nothing to shard, the model stays whole")
        self.shard.block(list(range(cfg.train.prompts_per_epoch)), "train.prompts_per_epoch")  # fail before loading
        self.device = self.accelerator.device
        self.metrics: MetricsWriter | None = None
        self._lock: RunLock | None = None
        try:
            from accelerate.utils import set_seed

            # alignkit draws from generators seeded per (seed, epoch, ...); the global RNGs (torch, CUDA, Python,
            # NumPy) are seeded too, for code outside it, and saved in checkpoints
            set_seed(cfg.seed)
            # prompt files are read first: a refused file leaves no run folder behind
            self.train_prompts, heldout = load_prompts(cfg.prompts)
            self.eval_prompts = evaluation_prompts(cfg.eval, heldout)  # eval.prompts, else the held-out split
            # the folder is locked and checked against train.resume before any model loads
            self._resume = self._claim_run_folder()
            self._build(sampler, reward_set)
        except BaseException:
            self.close()
            raise

    def _claim_run_folder(self) -> ResumeCheck:
        """Lock ``output_dir`` (main process) and check it against ``train.resume`` (every process); a refusal
        on any process is raised on every process."""
        failure, check = None, None
        try:
            if self.is_main:
                self._lock = lock_run_folder(self.out)
                weakref.finalize(self, self._lock.release)  # a trainer dropped without close() frees the folder
            check = check_run_folder(self.cfg)
        except RunFolderError as exc:
            failure = str(exc)
        failures = [f for f in self.shard.gather(failure) if f]
        if failures:
            raise RunFolderError(failures[0])
        assert check is not None
        return check

    def _build(self, sampler: Sampler | None, reward_set: RewardSet | None) -> None:
        cfg = self.cfg
        # build_sampler is looked up here at call time (tests wrap alignkit.trainer.build_sampler)
        c = build_components(cfg, self.device, sampler=sampler, reward_set=reward_set, make_sampler=build_sampler)
        self.reward_set, self.eval_reward_set, self.sampler = c.reward_set, c.eval_reward_set, c.sampler
        self.plan: ExplorationPlan = c.plan
        self.credit: CreditAssigner = c.credit
        self.engine = c.engine
        self.meter = FlopMeter()  # model FLOPs of rollout, decode and update (cost/* metrics)
        self.engine.meter = self.meter
        # the checkpoint to resume from is read now: its trainable weights go in before sharding
        force = cfg.train.resume == "force"
        opened = open_checkpoint(self.out, self.train_prompts, self.sampler, force=force) \
            if self._resume.checkpoint is not None else None
        if opened is not None and opened.path != self._resume.checkpoint:  # fell back to an older checkpoint
            check_resume(cfg, opened.meta.get("config"), opened.path)
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
        barrier = self.accelerator.wait_for_everyone
        if opened is None:  # a fresh start: rows an earlier start wrote before any checkpoint are trained again
            truncate_metrics(self.out, None, is_main=self.is_main, barrier=barrier)
            self.state = TrainState()
        else:
            self.state = restore_checkpoint(opened, self._checkpoint_parts(), output_dir=self.out,
                                            is_main=self.is_main, barrier=barrier,
                                            settings=cfg.train if force else None)
        self._saved_epoch = self.state.epoch  # the epoch of the latest checkpoint of this run (0: none yet)
        self.updater = Updater(cfg, self.accelerator, self.sampler, module, params, self.optimizer,
                               self.lr_scheduler, self.ema, self.shard, self.fsdp, self.out, meter=self.meter)
        self._last_heldout: float | None = None  # latest held-out mean of the first reward, for the progress bar
        if self.is_main:
            self.metrics = MetricsWriter(self.out, self.accelerator, first_step=self.state.epoch + 1 if opened else 0,
                                         config=flat_config(to_dict(cfg)))
        if self.shard.distributed:
            logger.warning("process %d of %d: rolls out %d of the %d prompts per epoch", self.shard.rank,
                           self.shard.world_size, t.prompts_per_epoch // self.shard.world_size, t.prompts_per_epoch)

    def close(self) -> None:
        """Finish the trackers and release ``output_dir``'s lock (done by :meth:`train` when it returns or
        raises; call it for a trainer that is not trained)."""
        if self.metrics is not None:
            self.metrics.close()
        if self._lock is not None:
            self._lock.release()

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # --- checkpoints ----------------------------------------------------------------------------------

    def _checkpoint_parts(self) -> CheckpointParts:
        # the scaler is read now: accelerate may install it after the trainer is built
        return CheckpointParts(sampler=self.sampler, optimizer=self.optimizer, lr_scheduler=self.lr_scheduler,
                               scaler=self.accelerator.scaler, ema=self.ema, fsdp=self.fsdp, plan=self.plan)

    def save(self) -> Path | None:
        """Write a checkpoint of everything the next epoch depends on (:func:`save_training_checkpoint`).
        Call it on every process; the main process writes and returns the folder (None elsewhere).

        Raises:
            CheckpointError: the write failed (on every process); earlier checkpoints are intact.
        """
        path = save_training_checkpoint(self.out, self.state, self._checkpoint_parts(), prompts=self.train_prompts,
                                        cfg=self.cfg, shard=self.shard, is_main=self.is_main)
        self._saved_epoch = self.state.epoch
        return path

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
        """Train from the current epoch (0, or the resumed checkpoint's) to ``train.epochs``.

        SIGINT / SIGTERM stop the run at the next safe point between phases (:mod:`alignkit.interrupt`): an
        epoch whose update has not begun is abandoned, one whose update has run is completed; a checkpoint is
        written when an epoch finished since the last one, then :class:`Interrupted` is raised. The lock of
        ``output_dir`` is released when this returns or raises.

        Raises:
            Interrupted: stopped by a signal; names the last checkpoint.
            MaskedError: ``train.max_masked_epochs`` was exceeded.
            NonFiniteError: ``train.max_nonfinite_steps`` was exceeded.
        """
        cfg = self.cfg
        if self.is_main:
            logger.info("%s", describe_run(cfg))
            logger.info("%s", self.threads.describe())
            append_environment(self.out, {"start_epoch": self.state.epoch,
                                          **environment(self.device, self.shard.world_size)})
        bar = tqdm(total=cfg.train.epochs, initial=self.state.epoch, desc="alignkit", unit="epoch",
                   disable=not self.is_main, dynamic_ncols=True)
        summary = None
        try:
            with StopRequest() as stop:
                if cfg.eval.before_after and self.state.epoch == 0:
                    before = self.evaluate_heldout("eval_before")
                    if self.is_main:
                        self.metrics.write(0, {"epoch": 0.0, "global_step": 0.0, "rollout/nfe_total": 0.0,
                                               "time/total_s": 0.0, "time/cpu_total_s": 0.0, **before})
                        bar.write("held-out before training: " + _fmt(before))
                        bar.set_postfix(heldout=f"{self._last_heldout:.3f}")
                while self.state.epoch < cfg.train.epochs:
                    self._stop_if_asked(stop)
                    self._epoch(stop, bar)
            summary = write_summary(self.out, to_dict(cfg)) if self.is_main else None
        finally:
            bar.close()
            self.close()
        if summary is not None:  # the run is complete: what it did and whether the held-out scores moved
            tqdm.write(format_summary(summary))
        return self.state

    def _epoch(self, stop: StopRequest, bar: Any) -> None:
        """One epoch: rollout -> score -> credit -> update -> log -> checkpoint. A stop asked before the update
        abandons the epoch (nothing of it is kept); once the update ran, the epoch is completed."""
        cfg = self.cfg
        epoch, steps_before = self.state.epoch, self.state.global_step
        t0, c0 = time.perf_counter(), time.process_time()
        self.meter.take_seconds()  # model time of this epoch only
        rolled = self.rollout(epoch)
        t1 = time.perf_counter()
        try:
            self._stop_if_asked(stop)
        except Interrupted:
            if rolled.scorer is not None:
                rolled.scorer.cancel()
            raise
        gathered = self.score(rolled)
        scored = self.assign_credit(gathered)
        t2 = time.perf_counter()
        self._stop_if_asked(stop)
        # the epoch is now completed whatever happens: its signal may update the plan (saved with the checkpoint)
        self.plan.observe(rolled.schedule, gathered.keys, scored.credit, scored.groups)
        self._count_masked(gathered, scored)
        stats = self.optimize(rolled.rollout, gathered, scored.credit, epoch)
        t3, cpu = time.perf_counter(), time.process_time() - c0
        self.state.epoch += 1
        self.state.nfe_total += gathered.nfe
        self.state.seconds_total += t3 - t0
        self.state.cpu_seconds_total += cpu
        metrics = self._epoch_metrics(gathered, scored, stats, (t0, t1, t2, t3))
        metrics["time/cpu_s"], metrics["time/cpu_total_s"] = cpu, self.state.cpu_seconds_total
        metrics["time/model_s"] = sum(self.meter.take_seconds().values())
        metrics.update(self._cost_metrics(gathered, stats, self.state.global_step - steps_before))
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

    def _stop_if_asked(self, stop: StopRequest) -> None:
        """At a safe point: when a stop signal arrived (on any process), write a checkpoint if an epoch finished
        since the last one and raise :class:`Interrupted` naming the last checkpoint."""
        signum = stop.signum
        if self.shard.distributed:  # every process stops at the same point
            signum = next((s for s in self.shard.gather(signum) if s is not None), None)
        if signum is None:
            return
        if self.state.epoch > self._saved_epoch:
            self.save()
        last = latest_checkpoint(self.out)
        if last is None:
            raise Interrupted("interrupted; no checkpoint was written yet (the first epoch had not finished); rerun "
                              "the same command to start again", signum)
        raise Interrupted(f"interrupted; the last checkpoint is {last}; rerun the same command to resume", signum)

    def _count_masked(self, gathered: Gathered, scored: EpochCredit) -> None:
        """Count an epoch in which no transition can train because every sample is masked (its update is
        skipped: ``train/masked_skipped``); more than ``train.max_masked_epochs`` in a row stop the run."""
        s = self.state
        if bool(scored.credit.mask.any()):
            s.consecutive_masked = 0
            return
        s.masked_skipped += 1
        s.consecutive_masked += 1
        n = len(gathered.keys)
        causes = [f"reward {name!r} could not score {bad} of {n} samples"
                  for name, bad in gathered.table.invalid.items() if bad] or ["no sample has a valid score"]
        cause = "; ".join(causes)
        logger.warning("epoch %d: every sample is masked (%s): its update is skipped (%d such epochs in a row)",
                       s.epoch, cause, s.consecutive_masked)
        limit = self.cfg.train.max_masked_epochs
        if s.consecutive_masked > limit:
            kept = kept_checkpoint_phrase(self.out)
            raise MaskedError(
                f"{s.consecutive_masked} consecutive epochs had every sample masked, so nothing could train (last: "
                f"epoch {s.epoch}, {cause}; limit train.max_masked_epochs={limit}); {kept}. A reward that returns "
                "None / NaN for every sample (a reward service that is down, inputs it cannot read) or samples "
                "that decode to NaN / inf (backbone.dtype=float32 helps) cause this; fix it and rerun the same "
                "command to resume, or raise train.max_masked_epochs"
            )

    def _postfix(self, metrics: dict[str, float], window: int = 10) -> dict[str, str]:
        """Progress-bar fields: each training reward's mean this epoch (short names), the aggregate (the weighted
        sum of those means, whatever the aggregation: under normalize_then_sum the aggregated score itself is
        about 0 by construction), its mean over the last ``window`` epochs (the trend through the noise of a
        few prompts), the rollout NFE so far, the latest held-out score of the first reward, KL and clip
        fraction."""
        weights = {name: term.weight for name, term in self.cfg.reward.items()}
        labels = short_names(list(weights))

        def aggregate(m: dict[str, float]) -> float:
            return sum(w * m.get(f"reward/{name}_mean", math.nan) for name, w in weights.items() if w != 0)

        fields = {labels[name]: f"{metrics.get(f'reward/{name}_mean', math.nan):.3f}" for name in weights}
        recent = [aggregate(m) for m in self.state.history[-(window - 1):]] + [aggregate(metrics)]
        recent = [v for v in recent if not math.isnan(v)]
        fields["agg"] = f"{aggregate(metrics):.3f}"
        fields[f"avg{window}"] = f"{sum(recent) / len(recent):.3f}" if recent else "nan"
        fields["nfe"] = format_count(float(self.state.nfe_total))
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
        m["train/masked_skipped"] = float(self.state.masked_skipped)
        m["train/scale_overflows"] = float(self.state.scale_overflows)
        m["run/processes"] = float(self.shard.world_size)
        m["time/rollout_s"], m["time/reward_s"], m["time/train_s"] = t1 - t0, t2 - t1, t3 - t2
        m.update(stats)
        m.update(self.plan.metrics())
        return m

    def _cost_metrics(self, gathered: Gathered, stats: dict[str, float], steps: int) -> dict[str, float]:
        """``cost/*`` of the epoch, all processes together, and their running totals
        (:data:`alignkit.cost.COST_METRICS`); call it on every process (the FLOPs are summed)."""
        flops = self.meter.take()
        summed = self.shard.sum_(torch.tensor([flops[k] for k in ("rollout", "decode", "train")], dtype=torch.int64))
        epoch = {"rollout_flops": float(summed[0]), "decode_flops": float(summed[1]), "train_flops": float(summed[2]),
                 "flops": float(summed.sum()), "train_inputs": stats["train/inputs_evaluated"],
                 "decodes": float(len(gathered.keys)),
                 "reward_calls": float(len(gathered.keys) * len(self.reward_set.terms)),
                 "optimizer_steps": float(steps)}
        totals = self.state.cost_totals
        for k, v in epoch.items():
            totals[k] = totals.get(k, 0.0) + v
        return {**{f"cost/{k}": v for k, v in epoch.items()}, **{f"cost/{k}_total": totals[k] for k in epoch}}

    def evaluate_heldout(self, name: str) -> dict[str, float]:
        """Deterministic sampling of the evaluation prompts over all processes (EMA weights when enabled;
        :func:`alignkit.evaluation.evaluate_heldout`); the main process writes ``samples/<name>.png`` and
        ``eval/<name>.jsonl`` (every sample's scores), each process its samples' files into ``eval/<name>/``.

        Returns ``eval/<reward>`` means (NaN-masked) for the training and evaluation-only rewards.
        """
        preview = self.out / "samples" / f"{name}.png" if self.is_main else None
        out = evaluate_heldout(self.sampler, self.eval_reward_set, self.eval_prompts, self.cfg.eval, self.shard,
                               ema=self.ema, preview=preview, record=self.out / "eval" / name,
                               epoch=self.state.epoch)
        self._last_heldout = next(iter(out.values()))  # the first training reward
        return out


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in metrics.items())
