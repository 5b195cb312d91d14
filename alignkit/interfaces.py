"""The sampler (backbone adapter) and step-distribution interfaces.

A sampler turns a backbone (a diffusers pipeline, a transformers model) into the few primitives the
rollout engine and the trainer need. It never decides which steps explore: the exploration plan does,
and the engine asks the sampler for a deterministic or a stochastic transition at each step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

from alignkit.config import BackboneConfig, ConfigError, EvalConfig
from alignkit.types import Conditioning


@dataclass(frozen=True)
class EvalSettings:
    """Sampling settings of held-out evaluation that differ from training; None keeps the training value.

    Attributes:
        num_steps: denoising steps (``eval.num_steps``; training: ``backbone.num_steps``).
        guidance: guidance scale (``eval.guidance``; training: ``backbone.guidance_scale``).
        height / width: sample size in pixels (``eval.resolution``; training: ``backbone.height`` / ``width``).
    """

    num_steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None

    SETTINGS: ClassVar[dict[str, str]] = {"num_steps": "eval.num_steps", "guidance": "eval.guidance",
                                          "height": "eval.resolution", "width": "eval.resolution"}
    """Each field's setting in the run configuration."""
    BACKBONE: ClassVar[dict[str, str]] = {"num_steps": "num_steps", "guidance": "guidance_scale",
                                          "height": "height", "width": "width"}
    """Each field's training counterpart in :class:`alignkit.config.BackboneConfig`."""

    @classmethod
    def from_config(cls, e: EvalConfig) -> EvalSettings:
        """The settings of ``eval``: ``resolution`` ``[h, w]`` (or ``[s]``, a square) splits into height and width."""
        height = width = None
        if e.resolution:
            height, width = (e.resolution[0], e.resolution[-1])
        return cls(num_steps=e.num_steps, guidance=e.guidance, height=height, width=width)

    def given(self) -> dict[str, int | float]:
        """The settings that are set (not None), by field name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    def applied_to(self, cfg: BackboneConfig) -> BackboneConfig:
        """A copy of ``cfg`` with these settings in place of the training ones."""
        return dataclasses.replace(cfg, **{self.BACKBONE[k]: v for k, v in self.given().items()})

    def describe(self, cfg: BackboneConfig | None = None) -> dict[str, int | float | None]:
        """``{num_steps, guidance, height, width}`` evaluation samples with (the training value where unset, when
        ``cfg`` is given)."""
        return {f.name: getattr(self, f.name) if getattr(self, f.name) is not None or cfg is None
                else getattr(cfg, self.BACKBONE[f.name]) for f in dataclasses.fields(self)}


@runtime_checkable
class StepDistribution(Protocol):
    """The distribution of one denoising transition for a batch ``[B, ...]`` of states."""

    @property
    def scale(self) -> torch.Tensor:
        """``[B]`` exploration scale (the transition std for flows), 0 for a deterministic step."""
        ...

    def mode(self) -> torch.Tensor:
        """The deterministic transition (ODE step, argmax), ``[B, ...]``."""
        ...

    def sample(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """A stochastic transition ``[B, ...]`` drawn with one generator per batch row."""
        ...

    def log_prob(self, next_state: torch.Tensor) -> torch.Tensor:
        """``[B]`` log-probability of ``next_state`` (convention documented by each implementation)."""
        ...

    def kl(self, reference: StepDistribution) -> torch.Tensor:
        """``[B]`` KL(self || reference) for the same states, the regulariser of the objective."""
        ...

    def index(self, rows: torch.Tensor) -> StepDistribution:
        """The distribution of rows ``rows`` (``[R]`` long) only."""
        ...


class Sampler(ABC):
    """A backbone adapter: the primitives of iterative denoising for one model family.

    States are batch-first tensors; conditioning is a dict of batch-first tensors (see
    :data:`alignkit.types.Conditioning`) so the engine can index and concatenate both without knowing
    the modality.
    """

    modality: str = "unknown"
    preview_fps: float = 16
    """Frames per second of video samples written as mp4 (previews, held-out records)."""
    sample_rate: int | None = None
    """Hz of audio samples (audio adapters set it; None for other modalities)."""

    @classmethod
    def check_config(cls, cfg: BackboneConfig, path: str = "backbone") -> list[str]:
        """Problems with backbone settings this adapter cannot sample, found before any model loads.

        Each problem names the field, the bad value and the fix (e.g. Wan: ``num_frames`` must be ``4k + 1``).
        """
        return []

    @property
    @abstractmethod
    def num_steps(self) -> int:
        """Length of the sampling schedule."""

    eval_setting_names: ClassVar[frozenset[str]] = frozenset()
    """The :class:`EvalSettings` fields :meth:`eval_settings` can change for this backbone (none by default)."""

    @classmethod
    def supported_eval_settings(cls) -> frozenset[str]:
        """The :class:`EvalSettings` fields this adapter class can change: :attr:`eval_setting_names`."""
        return cls.eval_setting_names

    @staticmethod
    def changed_backbone_problems(check: Callable[[BackboneConfig, str], list[str]], settings: EvalSettings,
                                  cfg: BackboneConfig) -> list[str]:
        """The problems ``check(backbone_config, path)`` finds with ``settings`` in place of the training values that
        it does not find in ``cfg`` itself (those are reported under ``backbone``), naming the evaluation setting
        (``backbone.height=40`` becomes ``eval.resolution (height)=40``)."""
        before = set(check(cfg, "backbone"))
        names = {f"backbone.{EvalSettings.BACKBONE[k]}=": EvalSettings.SETTINGS[k] + (
            "" if EvalSettings.SETTINGS[k].endswith(k) else f" ({k})") + "=" for k in settings.given()}
        problems = []
        for problem in check(settings.applied_to(cfg), "backbone"):
            if problem in before:
                continue
            for old, new in names.items():
                problem = problem.replace(old, new)
            problems.append(f"evaluation sampling: {problem}")
        return problems

    @classmethod
    def check_eval_settings(cls, settings: EvalSettings, cfg: BackboneConfig | None = None) -> list[str]:
        """Problems with evaluation settings this adapter cannot sample with, found before any model loads.

        Default: every setting outside :attr:`eval_setting_names` is refused, naming the setting and the fix.
        Adapters that support a setting also check its value (e.g. through :meth:`check_config` on the backbone
        settings with the evaluation values in place).
        """
        problems = []
        given = settings.given()
        supported = cls.supported_eval_settings()
        for setting in dict.fromkeys(EvalSettings.SETTINGS[k] for k in given if k not in supported):
            keys = [k for k, s in EvalSettings.SETTINGS.items() if s == setting and k in given]
            value = [given[k] for k in keys] if len(keys) > 1 else given[keys[0]]
            train = ", ".join(f"backbone.{EvalSettings.BACKBONE[k]}" for k in keys)
            can = ", ".join(sorted({EvalSettings.SETTINGS[k] for k in supported})) or "none"
            problems.append(f"{setting}={value}: the {cls.__name__} backbone cannot sample with another "
                            f"{setting.removeprefix('eval.').replace('_', ' ')} than training's ({train}); remove "
                            f"{setting} (evaluation then uses the training value). It supports: {can}")
        return problems

    @contextlib.contextmanager
    def eval_settings(self, *, num_steps: int | None = None, guidance: float | None = None,
                      height: int | None = None, width: int | None = None) -> Iterator[None]:
        """Context in which sampling uses evaluation settings instead of the training ones (None: unchanged).

        Everything the engine asks the sampler inside it (:attr:`num_steps`, the schedule, prompt encoding with or
        without CFG, initial states, decoding) follows the given settings; leaving it restores the training ones.

        Raises:
            ConfigError: a setting this backbone cannot change or a value it cannot sample
                (:meth:`check_eval_settings`).
        """
        settings = EvalSettings(num_steps=num_steps, guidance=guidance, height=height, width=width)
        if not settings.given():
            yield
            return
        problems = self.check_eval_settings(settings, getattr(self, "cfg", None))
        if problems:
            raise ConfigError(problems)
        with self._evaluation_overrides(settings):
            yield

    def _evaluation_overrides(self, settings: EvalSettings) -> contextlib.AbstractContextManager[None]:
        """Apply ``settings`` (already checked) for the duration of the returned context; adapters that list
        :attr:`eval_setting_names` implement it."""
        raise NotImplementedError(f"{type(self).__name__} lists eval_setting_names but does not apply them")

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @abstractmethod
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Encode ``P`` prompts once per rollout (with the negative prompt when CFG is on)."""

    @abstractmethod
    def initial_state(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """``[B, ...]`` initial states, row ``b`` drawn from ``generators[b]`` only."""

    @abstractmethod
    def transition(
        self, state: torch.Tensor, step: torch.Tensor, cond: Conditioning, *, stochastic: bool
    ) -> StepDistribution:
        """One model evaluation: the distribution of the next state.

        Args:
            state: ``[B, ...]`` current states.
            step: ``[B]`` long, schedule index of each row (rows may be at different steps).
            cond: conditioning rows aligned with ``state`` (``[B, ...]``).
            stochastic: whether the step explores (SDE / sampling) or is deterministic (ODE / argmax).
        """

    @abstractmethod
    def decode(self, state: torch.Tensor) -> Any:
        """Final states to samples (images ``[B, 3, H, W]`` in [0, 1], videos, token ids)."""

    def save_samples(self, samples: Any, captions: Sequence[str], path: Path) -> Path | None:
        """Write a preview of decoded ``samples`` captioned with ``captions`` at ``path`` (a ``.png``).

        Default: :func:`alignkit.media.save_samples` (image grid, frame strips, waveform plots; None when the
        samples have no picture). Adapters whose samples need more than a picture extend it (audio: wav files
        at the sampler's sample rate).
        """
        from alignkit.media import save_samples

        return save_samples(samples, captions, path)

    @abstractmethod
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the optimiser updates (LoRA weights by default)."""

    @abstractmethod
    def trainable_module(self) -> torch.nn.Module:
        """The module holding the trainable parameters (wrapped by accelerate for DDP)."""

    @abstractmethod
    def set_trainable_module(self, module: torch.nn.Module) -> None:
        """Use ``module`` (e.g. accelerate's wrapper of :meth:`trainable_module`) for forwards."""

    def fsdp_units(self) -> list[torch.nn.Module]:
        """Submodules of :meth:`trainable_module` sharded one by one under ``train.sharding=fsdp`` (each is
        gathered only for its own forward and backward). Default: the blocks of its top-level
        ``ModuleList`` s (:func:`alignkit.fsdp.default_units`). The sampler must reach these modules only
        through the trainable module's ``forward``.
        """
        from alignkit.fsdp import default_units

        return default_units(self.trainable_module())

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Context in which :meth:`transition` uses the frozen reference model (adapter disabled)."""
        raise NotImplementedError(f"{type(self).__name__} has no reference model; set algo.objective.beta=0")
        yield  # pragma: no cover

    def train(self, mode: bool = True) -> None:
        """Switch dropout / checkpointing between training and rollout."""
        self.trainable_module().train(mode)

    @abstractmethod
    def save_trainable(self, directory: Path, params: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trainable weights as safetensors in the backbone's native loadable format.

        Args:
            params: full values of the trainable parameters by their names in :meth:`trainable_module`
                (gathered from all processes under ``train.sharding=fsdp``); None: the module's own tensors.
        """

    @abstractmethod
    def load_trainable(self, directory: Path) -> None:
        """Load weights written by :meth:`save_trainable`."""
