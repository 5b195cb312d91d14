"""Typed, validated run configuration.

Recipes are hydra configs; after composition the plain dict is bound to these dataclasses by
:func:`build_config`, which rejects unknown keys and wrong types, expands ``~`` in the path settings
(:data:`PATH_FIELDS`) and then runs every section's ``validate``: ranges, NaN / inf anywhere, the device,
the run folder and the files named. All problems are reported at once, each naming the field, the bad
value and the fix, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SEED_MAX = 2**32 - 1
"""Largest seed: NumPy's global generator, seeded with ``seed`` at the start of a run, takes 0 .. 2**32 - 1."""
LOGPROB_CONVENTIONS = ("exact", "cps_released")
"""Values of ``algo.logprob``: how a flow step's log-probability is computed (see :mod:`alignkit.flow`)."""
RESUME_MODES = (True, False, "force")
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "trackio": ("trackio",),
            "comet_ml": ("comet_ml",), "aim": ("aim",), "mlflow": ("mlflow",), "clearml": ("clearml",),
            "dvclive": ("dvclive",), "swanlab": ("swanlab",)}
"""accelerate's tracker names and the modules that provide them (any one of them)."""


def tracker_problems(names: list[str], path: str) -> list[str]:
    """Problems with ``train.log_with``: unknown tracker names, repeats and trackers whose package is not
    installed (found without importing it)."""
    import importlib.util

    problems = []
    for name in names:
        if name not in TRACKERS:
            problems.append(f"{path}: unknown tracker {name!r}; valid: {', '.join(TRACKERS)} (or [] for metrics.jsonl "
                            "only)")
        elif not any(importlib.util.find_spec(m) is not None for m in TRACKERS[name]):
            extra = f"pip install 'alignkit[{name}]'" if name == "wandb" else f"pip install {TRACKERS[name][0]}"
            problems.append(f"{path}: the {name} tracker needs the {TRACKERS[name][0]} package, which is not "
                            f"installed; {extra}, or remove {name} from {path}")
    if len(set(names)) < len(names):
        problems.append(f"{path}={names}: a tracker is named twice; list each once")
    return problems


class ConfigError(ValueError):
    """One or more invalid settings; ``problems`` lists them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}")


@dataclass
class LoraConfig:
    """LoRA adapter on the policy network (peft)."""

    enabled: bool = field(default=True, metadata={"help": "Train a LoRA adapter (true) or the whole network (false)."})
    rank: int = field(default=32, metadata={"help": "LoRA rank r of each adapted layer."})
    alpha: float = field(default=64.0, metadata={"help": "LoRA scaling alpha (the update is scaled by alpha / rank)."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, in [0, 1)."})
    target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        metadata={"help": "Names (suffixes) of the Linear layers that get an adapter, e.g. [to_q,to_v]."})

    def validate(self, path: str, problems: list[str]) -> None:
        if self.enabled:
            if self.rank < 1:
                problems.append(f"{path}.rank={self.rank}: must be >= 1 (e.g. 32)")
            if not self.alpha > 0:
                problems.append(f"{path}.alpha={self.alpha}: must be > 0 (commonly 2 x rank)")
            if not self.target_modules:
                problems.append(f"{path}.target_modules is empty: name the Linear layers to adapt, e.g. [to_q,to_v]")
        if not 0 <= self.dropout < 1:
            problems.append(f"{path}.dropout={self.dropout}: must be in [0, 1)")


@dataclass
class BackboneConfig:
    """Which model to align and how to sample it.

    ``num_frames`` is the number of frames per sample for video backbones (image backbones ignore it; a
    video adapter checks it against its VAE's temporal compression, e.g. ``4k + 1`` for Wan).
    ``vae_tiling`` / ``vae_slicing`` decode in spatial tiles / one sample at a time to save memory.
    """

    name: str = field(default="???", metadata={"help": "Backbone adapter (sampler) name: alignkit list samplers."})
    pretrained: str = field(default="???", metadata={
        "help": "Model to load: a hub id 'org/name', a local pipeline folder or builtin:<name> (a shipped model)."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) to load."})
    variant: str | None = field(default=None, metadata={"help": "Weights variant to load, e.g. fp16."})
    dtype: str = field(default="float32", metadata={
        "help": "Weights dtype of the frozen model: float32, bfloat16 or float16."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow a hub model's own Python code to run when it loads; only set for a model you trust."})
    height: int = field(default=512, metadata={"help": "Sample height in pixels (a positive multiple of 8)."})
    width: int = field(default=512, metadata={"help": "Sample width in pixels (a positive multiple of 8)."})
    num_frames: int = field(default=1, metadata={
        "help": "Frames per sample for video backbones (e.g. 4k + 1 for Wan); image backbones ignore it."})
    num_steps: int = field(default=10, metadata={
        "help": "Denoising steps N of the sampling schedule (>= 2; the last step never trains)."})
    guidance_scale: float = field(default=4.5, metadata={
        "help": "Classifier-free guidance scale in sampling and in the training forward (1 disables CFG)."})
    negative_prompt: str = field(default="", metadata={"help": "Negative prompt of the unconditional CFG branch."})
    max_sequence_length: int = field(default=256, metadata={
        "help": "Longest prompt in tokens for the text encoder (the prompt prefix length of masked LMs)."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute activations in the backward to save training memory (slower)."})
    vae_tiling: bool = field(default=False, metadata={"help": "Decode in spatial tiles to save memory."})
    vae_slicing: bool = field(default=False, metadata={"help": "Decode one sample at a time to save memory."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "The LoRA adapter on the policy network."})
    options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Adapter-specific settings, checked by the adapter (e.g. flow_shift for Wan, scale for masked LMs)."})

    def validate(self, path: str, problems: list[str]) -> None:
        for key in ("name", "pretrained"):
            if getattr(self, key) in ("???", "", None):
                problems.append(f"{path}.{key} is required: set it in the recipe or as {path}.{key}=...")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"{path}.dtype={self.dtype!r}: use float32, bfloat16 or float16")
        if self.num_steps < 2:
            problems.append(f"{path}.num_steps={self.num_steps}: need >= 2 steps (the last one never trains)")
        for key in ("height", "width"):
            if getattr(self, key) < 8 or getattr(self, key) % 8:
                problems.append(f"{path}.{key}={getattr(self, key)}: must be a positive multiple of 8")
        if self.num_frames < 1:
            problems.append(f"{path}.num_frames={self.num_frames}: must be >= 1 (1 for images; e.g. 33 for Wan)")
        if not self.guidance_scale >= 0:
            problems.append(f"{path}.guidance_scale={self.guidance_scale}: must be >= 0 (1 disables CFG)")
        if self.max_sequence_length < 1:
            problems.append(f"{path}.max_sequence_length={self.max_sequence_length}: must be >= 1 (text tokens per "
                            "prompt, e.g. 256)")
        self.lora.validate(f"{path}.lora", problems)


@dataclass
class RewardTermConfig:
    """One named reward of the reward set: a registry name or ``package.module:callable``.

    A ``kwargs`` value written ``env:VAR`` is read from environment variable ``VAR`` when the reward is built
    (secrets such as tokens stay out of recipes, checkpoints and the saved configuration, which keep the
    ``env:VAR`` text). ``timeout``: seconds one call of the reward may take before the run stops with an
    error naming it (None: no limit).
    """

    fn: str = field(default="???", metadata={
        "help": "The reward: a registry name (alignkit list rewards) or an import path 'package.module:callable'."})
    weight: float = field(default=1.0, metadata={"help": "Weight of this reward in the aggregated score."})
    kwargs: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Keyword arguments for the reward (a class gets them once; a function at every call)."})
    timeout: float | None = field(default=None, metadata={
        "help": "Seconds one call of the reward may take before the run stops with an error naming it; null: no "
                "limit. On the command line: +reward.<name>.timeout=600."})

    def validate(self, path: str, problems: list[str]) -> None:
        if self.fn in ("???", ""):
            problems.append(f"{path}.fn is required: a reward name (alignkit list rewards) or 'module:function'")
        if self.timeout is not None and not 0 < self.timeout < math.inf:
            problems.append(f"{path}.timeout={self.timeout}: must be a number of seconds > 0 (e.g. 600), or null "
                            "for no limit")


@dataclass
class PlanConfig:
    """Exploration plan: which steps explore and where trajectories branch.

    ``name``: ``all_stochastic`` (Flow-GRPO, DanceGRPO), ``deterministic`` (ODE only, evaluation), ``window``
    (Flow-GRPO-Fast, MixGRPO), ``branch`` (TempFlow-GRPO) or ``adaptive`` (TempFlow-GRPO branching with a fixed
    budget of branch steps spread by the signal each step has shown); ``options`` are the plan's keyword
    arguments (:mod:`alignkit.plans`).
    """

    name: str = field(default="all_stochastic", metadata={
        "help": "Exploration plan: all_stochastic, deterministic, window or branch (alignkit list plans)."})
    options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Keyword arguments of the plan (window: size, start; branch: children, select, steps, m, ...)."})


@dataclass
class CreditConfig:
    """Credit assignment: how rewards become per-transition advantages and weights."""

    name: str = field(default="group", metadata={"help": "Credit assigner name (alignkit list credit)."})
    group_by: str = field(default="prompt", metadata={
        "help": "Advantage group: 'prompt' (prompt and branch step) or 'seed' (prompt, initial noise, branch step)."})
    std: str = field(default="group", metadata={
        "help": "Normalise by the std of each group ('group') or of the whole batch ('global')."})
    eps: float = field(default=1e-4, metadata={"help": "Added to the std when normalising advantages (> 0)."})
    noise_aware: bool = field(default=False, metadata={
        "help": "Weight each transition's policy loss by its transition std over the mean std (TempFlow-GRPO)."})

    def validate(self, path: str, problems: list[str]) -> None:
        if self.group_by not in ("prompt", "seed"):
            problems.append(f"{path}.group_by={self.group_by!r}: use 'prompt' or 'seed'")
        if self.std not in ("group", "global"):
            problems.append(f"{path}.std={self.std!r}: use 'group' (per-group std) or 'global' (batch std)")
        if not self.eps > 0:
            problems.append(f"{path}.eps={self.eps}: must be > 0 (1e-4 is standard)")


@dataclass
class ObjectiveConfig:
    """Clipped GRPO objective with a KL penalty to the reference model.

    ``skip_tied``: leave transitions whose advantage is exactly 0 (groups whose rewards tie) out of training,
    as the released Flow-GRPO / TempFlow-GRPO code filters them: they cost no forward, and the KL term is then
    computed on the kept transitions only (:mod:`alignkit.update`).
    """

    clip_range: float = field(default=1e-4, metadata={
        "help": "PPO clip range epsilon of the ratio, in (0, 1) (1e-4 for images)."})
    adv_clip: float = field(default=5.0, metadata={"help": "Advantages are clamped to [-adv_clip, adv_clip]."})
    beta: float = field(default=0.004, metadata={
        "help": "Coefficient of the KL penalty to the reference (adapter-disabled) model; 0 disables it."})
    skip_tied: bool = field(default=False, metadata={
        "help": "Leave transitions whose advantage is exactly 0 (tied groups) out of training: no policy forward, "
                "no gradient; the KL term is then computed on the kept transitions only."})

    def validate(self, path: str, problems: list[str]) -> None:
        if not 0 < self.clip_range < 1:
            problems.append(f"{path}.clip_range={self.clip_range}: must be in (0, 1) (1e-4 for images)")
        if not self.adv_clip > 0:
            problems.append(f"{path}.adv_clip={self.adv_clip}: must be > 0 (5 is standard)")
        if not self.beta >= 0:
            problems.append(f"{path}.beta={self.beta}: must be >= 0 (0 disables the KL term)")


@dataclass
class AlgoConfig:
    """A GRPO variant: exploration plan + step family + credit assigner + objective.

    ``logprob``: how a flow step's log-probability is computed (:data:`LOGPROB_CONVENTIONS`, :mod:`alignkit.flow`):
    ``exact`` (the Gaussian log-density, averaged over elements) or ``cps_released`` (Flow-GRPO's released
    CPS code: ``-(x' - mean)^2`` averaged, without the ``1 / (2 std^2)`` scaling; ``step_kind=cps`` only).
    """

    name: str = field(default="flow_grpo", metadata={
        "help": "A label for the variant (kept in the checkpoints' config; not looked up)."})
    step_kind: str = field(default="flow_grpo", metadata={
        "help": "Stochastic step family: flow_grpo, cps, dance_grpo, masked_confidence (alignkit list steps)."})
    noise_level: float = field(default=0.7, metadata={
        "help": "Exploration noise: a of the SDE step, eta of dance_grpo, the temperature of masked models."})
    logprob: str = field(default="exact", metadata={
        "help": "How a flow step's log-probability is computed: 'exact' (the Gaussian log-density) or "
                "'cps_released' (Flow-GRPO's released CPS convention, without the 1/(2 s^2) factor; step_kind=cps)."})
    num_seeds: int = field(default=4, metadata={"help": "Initial noises (samples) per prompt; a group needs >= 2."})
    timestep_fraction: float = field(default=1.0, metadata={
        "help": "Share of each sample's stored transitions trained per inner epoch (a random subset), in (0, 1]."})
    reward_aggregation: str = field(default="sum_then_normalize", metadata={
        "help": "'sum_then_normalize' (weighted sum, then group-normalise; Flow-GRPO) or 'normalize_then_sum' "
                "(group-normalise each reward, then weight; GDPO / MixGRPO)."})
    plan: PlanConfig = field(default_factory=PlanConfig, metadata={
        "help": "The exploration plan: which steps explore and where trajectories branch."})
    credit: CreditConfig = field(default_factory=CreditConfig, metadata={
        "help": "Credit assignment: rewards to per-transition advantages and weights."})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig, metadata={
        "help": "The clipped policy objective and its KL penalty."})

    def validate(self, path: str, problems: list[str]) -> None:
        if self.num_seeds < 2:
            problems.append(
                f"{path}.num_seeds={self.num_seeds}: a group needs >= 2 samples to normalise advantages; "
                "set it to 2 or more"
            )
        if not 0 < self.timestep_fraction <= 1:
            problems.append(f"{path}.timestep_fraction={self.timestep_fraction}: must be in (0, 1]")
        if not self.noise_level > 0:
            problems.append(f"{path}.noise_level={self.noise_level}: must be > 0 (0.7 for Flow-GRPO)")
        elif self.step_kind == "cps" and self.noise_level > 1:
            problems.append(f"{path}.noise_level={self.noise_level} with {path}.step_kind=cps: must be in (0, 1] "
                            "(the step's std is sigma' sin(a pi / 2), which shrinks again above 1 and is 0 at 2)")
        if self.logprob not in LOGPROB_CONVENTIONS:
            problems.append(f"{path}.logprob={self.logprob!r}: use {' or '.join(LOGPROB_CONVENTIONS)} (exact: the "
                            "Gaussian log-density; cps_released: Flow-GRPO's released CPS convention)")
        elif self.logprob == "cps_released" and self.step_kind != "cps":
            problems.append(f"{path}.logprob=cps_released with {path}.step_kind={self.step_kind!r}: the released "
                            f"convention is that of the CPS step only; set {path}.step_kind=cps or "
                            f"{path}.logprob=exact")
        if self.reward_aggregation not in ("sum_then_normalize", "normalize_then_sum"):
            problems.append(
                f"{path}.reward_aggregation={self.reward_aggregation!r}: use 'sum_then_normalize' (Flow-GRPO) "
                "or 'normalize_then_sum' (GDPO / MixGRPO)"
            )
        self.credit.validate(f"{path}.credit", problems)
        self.objective.validate(f"{path}.objective", problems)


@dataclass
class EmaConfig:
    enabled: bool = field(default=False, metadata={
        "help": "Keep a moving average of the trainable weights (held-out evaluation uses it; checkpoints save it)."})
    decay: float = field(default=0.9, metadata={"help": "EMA decay per update, in [0, 1)."})
    every: int = field(default=1, metadata={"help": "Update the EMA every this many optimizer steps (>= 1)."})

    def validate(self, path: str, problems: list[str]) -> None:
        if not 0 <= self.decay < 1:
            problems.append(f"{path}.decay={self.decay}: must be in [0, 1)")
        if self.every < 1:
            problems.append(f"{path}.every={self.every}: must be >= 1")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping.

    Counts are global, whatever the number of processes (read at run time from ``accelerate launch``):
    ``prompts_per_epoch`` prompts are split evenly over the processes (so it must be a multiple of their
    number) and a training minibatch is ``train_batch_size`` transitions of all processes together, so a
    recipe gives the same updates on 1 or N processes. ``rollout_batch_size`` is per process (a memory
    setting). ``max_nonfinite_steps``: consecutive optimizer steps with a NaN / inf loss or gradient that
    are skipped (and counted) before the run stops. ``max_masked_epochs``: consecutive epochs in which every
    sample was masked (every reward None / NaN, or a non-finite decode) that are skipped (and counted,
    ``train/masked_skipped``) before the run stops. ``keep_checkpoints``: newest checkpoints kept.
    ``resume``: ``true`` continues the run in ``output_dir`` from its latest checkpoint (refusing a
    configuration that would train differently, :mod:`alignkit.run_folder`), ``force`` continues it with the
    new configuration, ``false`` starts a new run (refused when ``output_dir`` holds checkpoints).
    ``log_with``: accelerate trackers fed with every epoch's metrics (``tensorboard``, ``wandb``, ...; install
    the one named); ``metrics.jsonl`` is always written.
    ``sharding``: ``ddp`` (each process holds the whole model; gradients all-reduced) or ``fsdp`` (parameters,
    gradients and optimizer state sharded over the processes, :mod:`alignkit.fsdp`; ``no`` or ``bf16``
    mixed precision). ``shared_inputs``: evaluate each distinct training input (the ``K`` children of one
    branch point share state, step and conditioning) once, and cut minibatches on whole input groups
    (:mod:`alignkit.update`); the gradient is that of evaluating every transition.
    """

    epochs: int = field(default=100, metadata={"help": "Epochs (rollout, reward, credit, updates) to train."})
    prompts_per_epoch: int = field(default=8, metadata={
        "help": "Prompts rolled out per epoch, over all processes (a multiple of the number of processes)."})
    rollout_batch_size: int = field(default=8, metadata={
        "help": "Trajectories sampled at once per process (a memory setting)."})
    train_batch_size: int = field(default=8, metadata={
        "help": "Transitions per training minibatch, over all processes together."})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "Minibatches per optimizer step (the step's loss is their mean)."})
    inner_epochs: int = field(default=1, metadata={"help": "Passes of clipped updates over each epoch's transitions."})
    learning_rate: float = field(default=3e-4, metadata={"help": "AdamW learning rate."})
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay (>= 0)."})
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={
        "help": "AdamW betas: two values in [0, 1)."})
    adam_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon (> 0)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warm-up steps (0 disables it)."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradients are clipped to this global norm (> 0)."})
    mixed_precision: str = field(default="no", metadata={
        "help": "accelerate mixed precision: no, bf16 or fp16 (fp16 is GPU only, with a loss scaler)."})
    sharding: str = field(default="ddp", metadata={
        "help": "'ddp' (every process holds the whole model) or 'fsdp' (parameters, gradients and optimizer "
                "state sharded over the processes)."})
    ema: EmaConfig = field(default_factory=EmaConfig, metadata={"help": "Moving average of the trainable weights."})
    checkpoint_every: int = field(default=10, metadata={
        "help": "Write a checkpoint every this many epochs (and after the last)."})
    keep_checkpoints: int = field(default=3, metadata={"help": "Newest checkpoints kept; older ones are deleted."})
    sample_every: int = field(default=10, metadata={
        "help": "Write a captioned grid of training samples every this many epochs (and after the last)."})
    resume: bool | str = field(default=True, metadata={
        "help": "true: continue from the latest checkpoint in output_dir, refusing changes that alter training; "
                "force: continue and accept such changes; false: start afresh (refused when output_dir holds a run)."})
    max_nonfinite_steps: int = field(default=3, metadata={
        "help": "Consecutive optimizer steps with a NaN / inf loss or gradient skipped before the run stops."})
    max_masked_epochs: int = field(default=3, metadata={
        "help": "Consecutive epochs whose every sample is masked (no reward, non-finite decode) before the run stops."})
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={
        "help": "Experiment trackers through accelerate (tensorboard, wandb, ...); metrics.jsonl is always written."})
    overlap_rewards: bool = field(default=True, metadata={
        "help": "Score finished samples on a worker thread while the rollout goes on."})
    cpu_threads: int = field(default=0, metadata={
        "help": "torch intra-op CPU threads; 0: $OMP_NUM_THREADS when set, else the CPUs this process may use "
                "(affinity, cgroup quota) divided among the training processes on the machine."})
    shared_inputs: bool = field(default=True, metadata={
        "help": "Evaluate each distinct training input (branch children share theirs) once per minibatch; "
                "minibatches hold whole input groups. The same gradient as per transition, fewer forwards."})

    def validate(self, path: str, problems: list[str]) -> None:
        if self.cpu_threads < 0:
            problems.append(f"{path}.cpu_threads={self.cpu_threads}: use 0 (automatic) or a positive thread count")
        for key in ("epochs", "prompts_per_epoch", "rollout_batch_size", "train_batch_size",
                    "gradient_accumulation_steps", "inner_epochs", "checkpoint_every", "keep_checkpoints",
                    "sample_every"):
            if getattr(self, key) < 1:
                problems.append(f"{path}.{key}={getattr(self, key)}: must be >= 1")
        if not self.learning_rate > 0:
            problems.append(f"{path}.learning_rate={self.learning_rate}: must be > 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            problems.append(f"{path}.adam_betas={self.adam_betas}: give two values in [0, 1), e.g. [0.9,0.999]")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            problems.append(f"{path}.mixed_precision={self.mixed_precision!r}: use no, bf16 or fp16")
        if self.sharding not in ("ddp", "fsdp"):
            problems.append(f"{path}.sharding={self.sharding!r}: use ddp (every process holds the whole model) or "
                            "fsdp (parameters sharded over the processes)")
        elif self.sharding == "fsdp" and self.mixed_precision == "fp16":
            problems.append(f"{path}.mixed_precision=fp16 with {path}.sharding=fsdp: use bf16 (there is no sharded "
                            f"loss scaler here) or {path}.sharding=ddp")
        if not self.max_grad_norm > 0:
            problems.append(f"{path}.max_grad_norm={self.max_grad_norm}: must be > 0")
        if self.max_nonfinite_steps < 0:
            problems.append(f"{path}.max_nonfinite_steps={self.max_nonfinite_steps}: must be >= 0 (consecutive "
                            "optimizer steps with a NaN / inf loss skipped before the run stops; 0 stops at the first)")
        if self.max_masked_epochs < 0:
            problems.append(f"{path}.max_masked_epochs={self.max_masked_epochs}: must be >= 0 (consecutive epochs "
                            "whose every sample was masked skipped before the run stops; 0 stops at the first)")
        if self.resume not in RESUME_MODES:
            problems.append(f"{path}.resume={self.resume!r}: use true or false, or force (true: continue the run in "
                            "output_dir with the same configuration; force: continue it with a changed one; false: "
                            "a new run, output_dir must hold no checkpoints)")
        problems += tracker_problems(self.log_with, f"{path}.log_with")
        if self.warmup_steps < 0:
            problems.append(f"{path}.warmup_steps={self.warmup_steps}: must be >= 0 (0 disables warm-up)")
        if not self.adam_eps > 0:
            problems.append(f"{path}.adam_eps={self.adam_eps}: must be > 0 (1e-8 is standard)")
        if not self.weight_decay >= 0:
            problems.append(f"{path}.weight_decay={self.weight_decay}: must be >= 0")
        self.ema.validate(f"{path}.ema", problems)


@dataclass
class PromptsConfig:
    """Where training and evaluation prompts come from.

    ``source``: ``list`` (inline ``train`` / ``eval`` lists) or ``file`` (``train_file`` / ``eval_file``:
    one prompt per line; ``.jsonl`` rows with a ``prompt`` key and optional metadata; or ``.json``, an array of
    strings or of such objects). Files are UTF-8 (a byte-order mark is dropped); blank prompts are refused. A file
    written ``<required>`` in a recipe is one the user must give; it is refused when the prompts load. ``hf``: a Hugging
    Face ``datasets`` dataset (``options``: path, split, eval_split, column, metadata_columns, name; see
    :func:`alignkit.prompts.hf_source`).
    """

    source: str = field(default="list", metadata={
        "help": "Prompt source: list, file, hf (a Hugging Face datasets dataset), or a registered source such as "
                "geneval, shapes or arithmetic."})
    train: list[str] = field(default_factory=list, metadata={"help": "Training prompts (source=list)."})
    eval: list[str] = field(default_factory=list, metadata={
        "help": "Held-out evaluation prompts (source=list; the training prompts when empty)."})
    train_file: str | None = field(default=None, metadata={
        "help": "Training prompt file (source=file): .txt, one prompt per line, or .jsonl rows with a prompt key."})
    eval_file: str | None = field(default=None, metadata={
        "help": "Evaluation prompt file (source=file; the training file when unset)."})
    shuffle: bool = field(default=True, metadata={
        "help": "Draw each epoch's prompts in a random order (false: in file order)."})
    options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Settings of a registered source (e.g. train_size, eval_size, seed, categories, eval_split for the "
                "worlds; eval_split: validation (default) for choices, test for reported results)."})


@dataclass
class EvalConfig:
    """Held-out evaluation: deterministic (ODE) sampling of the evaluation prompts.

    ``every``: also evaluate every N epochs during training (0: only before and after, when
    ``before_after``). ``rewards``: extra evaluation-only rewards (e.g. a strict variant), scored besides
    the training rewards. ``checkpoint``: weights to evaluate with ``alignkit eval``.
    """

    num_prompts: int = field(default=8, metadata={"help": "Held-out prompts evaluated (the first ones)."})
    seeds_per_prompt: int = field(default=1, metadata={"help": "Initial noises per evaluation prompt."})
    batch_size: int = field(default=8, metadata={"help": "Samples generated at once during evaluation."})
    checkpoint: str | None = field(default=None, metadata={
        "help": "Checkpoint folder whose weights alignkit eval loads (e.g. outputs/run/checkpoints/step-00000010)."})
    seed: int = field(default=1234, metadata={"help": "Seed of the evaluation noise (the same every evaluation)."})
    every: int = field(default=0, metadata={"help": "Also evaluate every N epochs while training (0: never)."})
    before_after: bool = field(default=False, metadata={"help": "Evaluate before the first and after the last epoch."})
    rewards: dict[str, RewardTermConfig] = field(default_factory=dict, metadata={
        "help": "Evaluation-only rewards scored besides the training rewards (e.g. a strict variant)."})
    num_steps: int | None = field(default=None, metadata={
        "help": "Denoising steps of evaluation sampling (e.g. 40 when training samples 10); null: backbone.num_steps."})
    guidance: float | None = field(default=None, metadata={
        "help": "Guidance scale of evaluation sampling; null: backbone.guidance_scale."})
    resolution: list[int] | None = field(default=None, metadata={
        "help": "[height, width] of evaluation samples in pixels ([size] for a square); null: backbone.height and "
                "backbone.width."})
    prompts: str | None = field(default=None, metadata={
        "help": "Fixed evaluation prompts: a .txt / .jsonl / .json file, or a prompt source name (its held-out split, "
                "options in eval.prompt_options); null: the held-out split of the recipe's prompts."})
    prompt_options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "Options of the eval.prompts source, as prompts.options (e.g. {eval: benchmark} for geneval)."})

    def validate(self, path: str, problems: list[str]) -> None:
        for key in ("num_prompts", "seeds_per_prompt", "batch_size"):
            if getattr(self, key) < 1:
                problems.append(f"{path}.{key}={getattr(self, key)}: must be >= 1")
        if self.num_steps is not None and self.num_steps < 1:
            problems.append(f"{path}.num_steps={self.num_steps}: must be >= 1 (e.g. 40), or null to sample with "
                            "backbone.num_steps")
        if self.guidance is not None and not 0 <= self.guidance < math.inf:
            problems.append(f"{path}.guidance={self.guidance}: must be a finite number >= 0 (1 disables CFG), or null "
                            "to sample with backbone.guidance_scale")
        if self.resolution is not None:
            if len(self.resolution) not in (1, 2):
                problems.append(f"{path}.resolution={self.resolution}: give [height, width] (or [size] for a square), "
                                "e.g. [512,512], or null for backbone.height / backbone.width")
            elif any(v < 8 or v % 8 for v in self.resolution):
                problems.append(f"{path}.resolution={self.resolution}: each side must be a positive multiple of 8 "
                                "pixels, e.g. [512,512]")
        if self.prompts is not None:
            problems += eval_prompts_problems(self.prompts, f"{path}.prompts")
        if self.prompt_options and self.prompts is None:
            problems.append(f"{path}.prompt_options={self.prompt_options}: options of the eval.prompts source, but "
                            "eval.prompts is null; name the source (e.g. eval.prompts=geneval) or drop the options")
        if self.every < 0:
            problems.append(f"{path}.every={self.every}: must be >= 0 (0 disables periodic evaluation)")
        _check_seed(f"{path}.seed", self.seed, problems)
        if self.checkpoint is not None and not Path(self.checkpoint).exists():
            problems.append(f"{path}.checkpoint={self.checkpoint!r}: no such file or folder; give a checkpoint "
                            "folder, e.g. outputs/<run>/checkpoints/step-00000108")
        for name, term in self.rewards.items():
            term.validate(f"{path}.rewards.{name}", problems)


PROMPT_FILE_SUFFIXES = (".txt", ".jsonl", ".json")
"""Suffixes of prompt files (:func:`alignkit.prompts.read_prompt_file`; other suffixes read as plain text)."""


def is_prompt_file(value: str) -> bool:
    """Whether ``eval.prompts`` names a file rather than a prompt source: a path (a separator, a prompt-file suffix,
    ``~``) or an existing file."""
    return (value.endswith(PROMPT_FILE_SUFFIXES) or "/" in value or os.sep in value or value.startswith("~")
            or Path(value).is_file())


def eval_prompts_problems(value: str, path: str) -> list[str]:
    """Problems with ``eval.prompts`` that need no registry: a blank value, a missing file, an inline-only source.
    (A source name is checked against the registry by :func:`alignkit.compose.check_names`.)"""
    if not value.strip() or left_to_user(value):
        return [f"{path}={value!r}: give a prompt file (.txt, .jsonl or .json) or a prompt source name, or null for "
                "the held-out split of the recipe's prompts"]
    if value in ("list", "file"):
        return [f"{path}={value!r}: give the prompt file's path itself (eval.prompts=path/to/prompts.txt); {value!r} "
                "is a source that takes its prompts from the prompts section"]
    if is_prompt_file(value) and not Path(value).is_file():
        what = "is a folder, not a file" if Path(value).is_dir() else "no such file"
        return [f"{path}={value!r}: {what}; give the path of a .txt (one prompt per line), .jsonl or .json prompt "
                "file, or a prompt source name"]
    return []


MISSING = "???"
"""Hydra's mandatory-value marker (lost when a recipe merges it over a typed default, hence :data:`REQUIRED`)."""

REQUIRED = "<required>"
"""A file setting a recipe leaves for the user to give (e.g. ``prompts.train_file: <required>``): the recipe composes
and validates, ``alignkit show`` prints it, and the run is refused when the prompts load, before any model."""


def left_to_user(value: object) -> bool:
    """Whether ``value`` is a recipe's placeholder for a setting the user must give (:data:`REQUIRED`, ``???``)."""
    return value in (REQUIRED, MISSING)


@dataclass
class RunConfig:
    """A whole run: the composed recipe."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig, metadata={
        "help": "The model to align and how to sample it."})
    reward: dict[str, RewardTermConfig] = field(default_factory=dict, metadata={
        "help": "Named, weighted rewards (the reward set); at least one."})
    algo: AlgoConfig = field(default_factory=AlgoConfig, metadata={
        "help": "The GRPO variant: step family, plan, credit and objective."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "Optimisation and bookkeeping."})
    prompts: PromptsConfig = field(default_factory=PromptsConfig, metadata={
        "help": "Where training and evaluation prompts come from."})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "Held-out evaluation."})
    output_dir: str = field(default="outputs/run", metadata={
        "help": "Run folder: metrics.jsonl, tensorboard/, samples/, checkpoints/."})
    seed: int = field(default=0, metadata={"help": "Run seed: every prompt draw and noise derives from it."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available), cpu or cuda[:N]."})
    recipe: str = field(default="", metadata={"help": "The recipe name (set by alignkit when it composes a recipe)."})

    def validate(self, problems: list[str]) -> None:
        self.backbone.validate("backbone", problems)
        self.algo.validate("algo", problems)
        self.train.validate("train", problems)
        self.eval.validate("eval", problems)
        if not self.reward:
            problems.append("reward is empty: add at least one reward, e.g. reward=jpeg_compressibility")
        for name, term in self.reward.items():
            term.validate(f"reward.{name}", problems)
        weights = [t.weight for t in self.reward.values()]
        if self.reward and all(w == 0 for w in weights):
            problems.append("reward: every weight is 0, so nothing would be optimised; give one a weight > 0")
        samples = self.train.prompts_per_epoch * self.algo.num_seeds
        if samples % self.train.rollout_batch_size and self.train.rollout_batch_size < samples:
            problems.append(
                f"train.rollout_batch_size={self.train.rollout_batch_size} does not divide the "
                f"{samples} samples per epoch (train.prompts_per_epoch={self.train.prompts_per_epoch} x "
                f"algo.num_seeds={self.algo.num_seeds}); pick a divisor"
            )
        if self.prompts.source == "list" and not self.prompts.train:
            problems.append("prompts.train is empty: list training prompts or set prompts.source=file")
        if self.prompts.source == "list":
            for key in ("train", "eval"):
                for i, prompt in enumerate(getattr(self.prompts, key)):
                    if isinstance(prompt, str) and not prompt.strip():
                        problems.append(f"prompts.{key}[{i}]={prompt!r}: a blank prompt (item {i + 1} of the list); "
                                        "remove it or write the prompt")
        if self.prompts.source == "file":
            if not self.prompts.train_file:
                problems.append("prompts.train_file is required with prompts.source=file")
            for key in ("train_file", "eval_file"):
                value = getattr(self.prompts, key)
                # a file the recipe leaves to the user is refused when the prompts load, before any model
                if value and not left_to_user(value) and not Path(value).is_file():
                    what = "is a folder, not a file" if Path(value).is_dir() else "no such file"
                    problems.append(f"prompts.{key}={value!r}: {what}; give the path of a .txt (one prompt per "
                                    "line), .jsonl or .json prompt file")
        _check_output_dir(self.output_dir, problems)
        _check_seed("seed", self.seed, problems)
        _check_device(self.device, problems)
        _check_finite(self, "", problems)


# --- checks shared by several sections ------------------------------------------------------------------


def _reported(path: str, problems: list[str]) -> bool:
    """Whether a problem already names setting ``path`` (or the list holding it: ``x`` for ``x[1]``)."""
    names = {path, re.sub(r"\[\d+\]$", "", path)}
    return any(p.startswith((f"{n}=", f"{n}:", f"{n} ")) for n in names for p in problems)


def _check_finite(value: Any, path: str, problems: list[str]) -> None:
    """A problem for every NaN / inf float of the configuration (``options`` and ``kwargs`` included) that no
    range check has reported yet: ``nan <= 0`` is false, so a NaN would pass such checks silently."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _check_finite(getattr(value, f.name), _join(path, f.name), problems)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{path}.{key}", problems)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(item, f"{path}[{i}]", problems)
    elif isinstance(value, float) and not math.isfinite(value) and not _reported(path, problems):
        problems.append(f"{path}={value}: must be a finite number (NaN and inf are not settings)")


def _check_seed(path: str, seed: int, problems: list[str]) -> None:
    if isinstance(seed, int) and not 0 <= seed <= SEED_MAX:
        problems.append(f"{path}={seed}: must be in 0..{SEED_MAX} (NumPy's seed range), e.g. 0")


_DEVICE = re.compile(r"(auto|cpu|cuda(:\d+)?)")


def _check_device(device: str, problems: list[str]) -> None:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; a CUDA device must exist on this machine."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        problems.append(f"device={device!r}: not a device; use auto (a GPU when there is one), cpu, cuda or cuda:N "
                        "(N: the GPU index, e.g. cuda:0)")
        return
    if not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        problems.append(f"device={device!r}: no usable CUDA GPU on this machine (torch.cuda.is_available() is False, "
                        f"torch {torch.__version__}); use device=cpu, or device=auto to take a GPU when there is one")
        return
    index = int(device.partition(":")[2] or 0)
    count = torch.cuda.device_count()
    if index >= count:
        problems.append(f"device={device!r}: this machine has {count} CUDA GPU{'s' * (count != 1)} "
                        f"(cuda:0..cuda:{count - 1}); pick one of them or use device=auto")


def _check_output_dir(output_dir: str, problems: list[str]) -> None:
    """The run folder must be creatable and writable (checked before any model loads)."""
    if not isinstance(output_dir, str) or not output_dir.strip():
        problems.append(f"output_dir={output_dir!r}: empty; give the run's folder, e.g. output_dir=outputs/my_run")
        return
    path = Path(output_dir).absolute()
    if path.exists() and not path.is_dir():
        problems.append(f"output_dir={output_dir!r} is a file, not a folder; choose another output_dir")
        return
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        problems.append(f"output_dir={output_dir!r} cannot be created: {existing} is a file; choose another "
                        "output_dir")
    elif not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == path else f"{existing}"
        problems.append(f"output_dir={output_dir!r} is not writable ({where} denies writing to this user); choose a "
                        "folder you can write to")


PATH_FIELDS = ("output_dir", "prompts.train_file", "prompts.eval_file", "eval.checkpoint", "eval.prompts",
               "backbone.pretrained")
"""Settings that name local files or folders; a leading ``~`` is expanded once, by :func:`build_config`."""


def expand_paths(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with ``~`` expanded in :data:`PATH_FIELDS`, so that the checks and the run read the
    same path."""
    cfg = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone),
                              prompts=dataclasses.replace(cfg.prompts), eval=dataclasses.replace(cfg.eval))
    for dotted in PATH_FIELDS:
        *parents, name = dotted.split(".")
        owner = cfg
        for part in parents:
            owner = getattr(owner, part)
        value = getattr(owner, name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(owner, name, os.path.expanduser(value))
    return cfg


# --- binding dicts to dataclasses --------------------------------------------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _bind(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """Convert ``value`` to type ``tp``; append a problem (and return the value unchanged) on mismatch."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1:  # the first alternative that binds without a problem, else the first's problems
            for alternative in inner:
                scratch: list[str] = []
                bound = _bind(alternative, value, path, scratch)
                if not scratch:
                    return bound
        return _bind(inner[0], value, path, problems)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
            return tp()
        hints = typing.get_type_hints(tp)
        known = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - known)
        for key in unknown:
            problems.append(f"{_join(path, key)}: unknown setting; valid settings of {path or 'the run'}: "
                            f"{', '.join(sorted(known))}")
        kwargs = {k: _bind(hints[k], v, _join(path, k), problems) for k, v in value.items() if k in known}
        return tp(**kwargs)
    if origin is dict:
        _key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            problems.append(f"{path}={value!r}: expected a mapping")
            return {}
        return {k: _bind(val_tp, v, f"{path}.{k}", problems) for k, v in value.items()}
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            problems.append(f"{path}={value!r}: expected a list, e.g. {path}=[a,b]")
            return []
        return [_bind(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            problems.append(f"{path}: a {value.bit_length()}-bit integer is too large for a float; give a finite "
                            "number")
            return value
    if tp is bool and not isinstance(value, bool):
        problems.append(f"{path}={value!r}: expected true or false")
        return value
    if tp in (int, float) and (isinstance(value, bool) or not isinstance(value, tp)):
        problems.append(f"{path}={value!r}: expected {_type_name(tp)}")
        return value
    if tp is str and not isinstance(value, str):
        problems.append(f"{path}={value!r}: expected a string")
        return value
    return value


def build_config(data: dict[str, Any]) -> RunConfig:
    """Bind a composed recipe dict to :class:`RunConfig` and validate it.

    Raises:
        ConfigError: listing every problem found.
    """
    problems: list[str] = []
    reward = data.get("reward")
    if isinstance(reward, dict):
        data = dict(data)
        data["reward"] = {k: v for k, v in reward.items() if v is not None}
    cfg = _bind(RunConfig, data, "", problems)
    if not problems:
        cfg = expand_paths(cfg)
        cfg.validate(problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
