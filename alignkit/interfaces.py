"""The sampler (backbone adapter) and step-distribution interfaces.

A sampler turns a backbone (a diffusers pipeline, a transformers model) into the few primitives the
rollout engine and the trainer need. It never decides which steps explore: the exploration plan does,
and the engine asks the sampler for a deterministic or a stochastic transition at each step.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from alignkit.config import BackboneConfig
from alignkit.types import Conditioning


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
