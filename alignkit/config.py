"""Typed, validated run configuration.

Recipes are hydra configs; after composition the plain dict is bound to these dataclasses by
:func:`build_config`, which rejects unknown keys and wrong types and then runs every section's
``validate``. All problems are reported at once, each naming the field, the bad value and the fix,
before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """One or more invalid settings; ``problems`` lists them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid configuration ({len(problems)} problem{'s' * (len(problems) > 1)}):\n{lines}")


@dataclass
class LoraConfig:
    """LoRA adapter on the policy network (peft)."""

    enabled: bool = True
    rank: int = 32
    alpha: float = 64.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])

    def validate(self, path: str, problems: list[str]) -> None:
        if self.enabled:
            if self.rank < 1:
                problems.append(f"{path}.rank={self.rank}: must be >= 1 (e.g. 32)")
            if self.alpha <= 0:
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

    name: str = "???"
    pretrained: str = "???"
    revision: str | None = None
    variant: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    height: int = 512
    width: int = 512
    num_frames: int = 1
    num_steps: int = 10
    guidance_scale: float = 4.5
    negative_prompt: str = ""
    max_sequence_length: int = 256
    gradient_checkpointing: bool = False
    vae_tiling: bool = False
    vae_slicing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    options: dict[str, Any] = field(default_factory=dict)

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
        if self.guidance_scale < 0:
            problems.append(f"{path}.guidance_scale={self.guidance_scale}: must be >= 0 (1 disables CFG)")
        self.lora.validate(f"{path}.lora", problems)


@dataclass
class RewardTermConfig:
    """One named reward of the reward set: a registry name or ``package.module:callable``."""

    fn: str = "???"
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self, path: str, problems: list[str]) -> None:
        if self.fn in ("???", ""):
            problems.append(f"{path}.fn is required: a reward name (alignkit list rewards) or 'module:function'")


@dataclass
class PlanConfig:
    """Exploration plan: which steps explore and where trajectories branch.

    ``name``: ``all_stochastic`` (Flow-GRPO, DanceGRPO), ``deterministic`` (ODE only, evaluation), ``window``
    (Flow-GRPO-Fast, MixGRPO), ``branch`` (TempFlow-GRPO) or ``adaptive`` (TempFlow-GRPO branching with a fixed
    budget of branch steps spread by the signal each step has shown); ``options`` are the plan's keyword
    arguments (:mod:`alignkit.plans`).
    """

    name: str = "all_stochastic"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CreditConfig:
    """Credit assignment: how rewards become per-transition advantages and weights."""

    name: str = "group"
    group_by: str = "prompt"
    std: str = "group"
    eps: float = 1e-4
    noise_aware: bool = False

    def validate(self, path: str, problems: list[str]) -> None:
        if self.group_by not in ("prompt", "seed"):
            problems.append(f"{path}.group_by={self.group_by!r}: use 'prompt' or 'seed'")
        if self.std not in ("group", "global"):
            problems.append(f"{path}.std={self.std!r}: use 'group' (per-group std) or 'global' (batch std)")
        if self.eps <= 0:
            problems.append(f"{path}.eps={self.eps}: must be > 0 (1e-4 is standard)")


@dataclass
class ObjectiveConfig:
    """Clipped GRPO objective with a KL penalty to the reference model.

    ``skip_tied``: leave transitions whose advantage is exactly 0 (groups whose rewards tie) out of training,
    as the released Flow-GRPO / TempFlow-GRPO code filters them: they cost no forward, and the KL term is then
    computed on the kept transitions only (:mod:`alignkit.update`).
    """

    clip_range: float = 1e-4
    adv_clip: float = 5.0
    beta: float = 0.004
    skip_tied: bool = False

    def validate(self, path: str, problems: list[str]) -> None:
        if not 0 < self.clip_range < 1:
            problems.append(f"{path}.clip_range={self.clip_range}: must be in (0, 1) (1e-4 for images)")
        if self.adv_clip <= 0:
            problems.append(f"{path}.adv_clip={self.adv_clip}: must be > 0 (5 is standard)")
        if self.beta < 0:
            problems.append(f"{path}.beta={self.beta}: must be >= 0 (0 disables the KL term)")


@dataclass
class AlgoConfig:
    """A GRPO variant: exploration plan + step family + credit assigner + objective."""

    name: str = "flow_grpo"
    step_kind: str = "flow_grpo"
    noise_level: float = 0.7
    num_seeds: int = 4
    timestep_fraction: float = 1.0
    reward_aggregation: str = "sum_then_normalize"
    plan: PlanConfig = field(default_factory=PlanConfig)
    credit: CreditConfig = field(default_factory=CreditConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def validate(self, path: str, problems: list[str]) -> None:
        if self.num_seeds < 2:
            problems.append(
                f"{path}.num_seeds={self.num_seeds}: a group needs >= 2 samples to normalise advantages; "
                "set it to 2 or more"
            )
        if not 0 < self.timestep_fraction <= 1:
            problems.append(f"{path}.timestep_fraction={self.timestep_fraction}: must be in (0, 1]")
        if self.noise_level <= 0:
            problems.append(f"{path}.noise_level={self.noise_level}: must be > 0 (0.7 for Flow-GRPO)")
        if self.reward_aggregation not in ("sum_then_normalize", "normalize_then_sum"):
            problems.append(
                f"{path}.reward_aggregation={self.reward_aggregation!r}: use 'sum_then_normalize' (Flow-GRPO) "
                "or 'normalize_then_sum' (GDPO / MixGRPO)"
            )
        self.credit.validate(f"{path}.credit", problems)
        self.objective.validate(f"{path}.objective", problems)


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9
    every: int = 1

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
    are skipped (and counted) before the run stops. ``keep_checkpoints``: newest checkpoints kept.
    ``sharding``: ``ddp`` (each process holds the whole model; gradients all-reduced) or ``fsdp`` (parameters,
    gradients and optimizer state sharded over the processes, :mod:`alignkit.fsdp`; ``no`` or ``bf16``
    mixed precision). ``shared_inputs``: evaluate each distinct training input (the ``K`` children of one
    branch point share state, step and conditioning) once, and cut minibatches on whole input groups
    (:mod:`alignkit.update`); the gradient is that of evaluating every transition.
    """

    epochs: int = 100
    prompts_per_epoch: int = 8
    rollout_batch_size: int = 8
    train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    inner_epochs: int = 1
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    sharding: str = "ddp"
    ema: EmaConfig = field(default_factory=EmaConfig)
    checkpoint_every: int = 10
    keep_checkpoints: int = 3
    sample_every: int = 10
    resume: bool = True
    max_nonfinite_steps: int = 3
    overlap_rewards: bool = True  # score finished samples on a worker thread while the rollout goes on
    shared_inputs: bool = True

    def validate(self, path: str, problems: list[str]) -> None:
        for key in ("epochs", "prompts_per_epoch", "rollout_batch_size", "train_batch_size",
                    "gradient_accumulation_steps", "inner_epochs", "checkpoint_every", "keep_checkpoints",
                    "sample_every"):
            if getattr(self, key) < 1:
                problems.append(f"{path}.{key}={getattr(self, key)}: must be >= 1")
        if self.learning_rate <= 0:
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
        if self.max_grad_norm <= 0:
            problems.append(f"{path}.max_grad_norm={self.max_grad_norm}: must be > 0")
        if self.max_nonfinite_steps < 0:
            problems.append(f"{path}.max_nonfinite_steps={self.max_nonfinite_steps}: must be >= 0 (consecutive "
                            "optimizer steps with a NaN / inf loss skipped before the run stops; 0 stops at the first)")
        if self.warmup_steps < 0:
            problems.append(f"{path}.warmup_steps={self.warmup_steps}: must be >= 0 (0 disables warm-up)")
        if self.adam_eps <= 0:
            problems.append(f"{path}.adam_eps={self.adam_eps}: must be > 0 (1e-8 is standard)")
        if self.weight_decay < 0:
            problems.append(f"{path}.weight_decay={self.weight_decay}: must be >= 0")
        self.ema.validate(f"{path}.ema", problems)


@dataclass
class PromptsConfig:
    """Where training and evaluation prompts come from.

    ``source``: ``list`` (inline ``train`` / ``eval`` lists) or ``file`` (``train_file`` / ``eval_file``:
    one prompt per line, or ``.jsonl`` rows with a ``prompt`` key and optional metadata).
    """

    source: str = "list"
    train: list[str] = field(default_factory=list)
    eval: list[str] = field(default_factory=list)
    train_file: str | None = None
    eval_file: str | None = None
    shuffle: bool = True
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalConfig:
    """Held-out evaluation: deterministic (ODE) sampling of the evaluation prompts.

    ``every``: also evaluate every N epochs during training (0: only before and after, when
    ``before_after``). ``rewards``: extra evaluation-only rewards (e.g. a strict variant), scored besides
    the training rewards. ``checkpoint``: weights to evaluate with ``alignkit eval``.
    """

    num_prompts: int = 8
    seeds_per_prompt: int = 1
    batch_size: int = 8
    checkpoint: str | None = None
    seed: int = 1234
    every: int = 0
    before_after: bool = False
    rewards: dict[str, RewardTermConfig] = field(default_factory=dict)

    def validate(self, path: str, problems: list[str]) -> None:
        for key in ("num_prompts", "seeds_per_prompt", "batch_size"):
            if getattr(self, key) < 1:
                problems.append(f"{path}.{key}={getattr(self, key)}: must be >= 1")
        if self.every < 0:
            problems.append(f"{path}.every={self.every}: must be >= 0 (0 disables periodic evaluation)")
        for name, term in self.rewards.items():
            term.validate(f"{path}.rewards.{name}", problems)


@dataclass
class RunConfig:
    """A whole run: the composed recipe."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    reward: dict[str, RewardTermConfig] = field(default_factory=dict)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "outputs/run"
    seed: int = 0
    device: str = "auto"
    recipe: str = ""

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
        if self.prompts.source == "file" and not self.prompts.train_file:
            problems.append("prompts.train_file is required with prompts.source=file")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            problems.append(f"device={self.device!r}: use auto, cpu or cuda[:N]")


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
        return float(value)
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
        cfg.validate(problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
