"""Flow-matching step math and the generic flow sampler every flow backbone adapter builds on.

Convention (diffusers ``FlowMatchEulerDiscreteScheduler``): sigma in [0, 1], sigma = 1 is noise,
``x_sigma = (1 - sigma) x0 + sigma * eps``, the model predicts ``v ~ eps - x0``; the schedule runs
``sigma_0 = 1 > ... > sigma_N = 0`` and step ``i`` has ``delta_i = sigma_{i+1} - sigma_i < 0``.

Every step family maps ``(x, v, sigma, sigma_next, noise_level)`` to the Gaussian transition
``N(mean, std^2 I)``; the deterministic ODE step is ``x + delta * v`` for all of them.

Log-probability conventions (``algo.logprob``, :data:`LOGPROB_CONVENTIONS`), both averaged over the non-batch
elements:

* ``exact``: the Gaussian log-density ``-(x' - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)``, what
  Flow-GRPO's and DanceGRPO's released code computes for their SDE steps, and the default for every family.
* ``cps_released``: Flow-GRPO's released CPS code, ``-(x' - mean)^2`` ("remove all constants"), which also
  drops the per-step ``1 / (2 std^2)`` factor. A log-ratio under it is the exact one times ``2 std^2``, a
  different factor at each step: on SD3's 10-step schedule (shift 3, ``a = 0.7``) ``1 / (2 std^2)`` runs from
  0.68 at the first step to about 7,900 at the last trainable one, so under the exact convention the clip
  binds mostly on the late, low-noise steps, and under the released one hardly there.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from alignkit.config import LOGPROB_CONVENTIONS
from alignkit.interfaces import Sampler, StepDistribution
from alignkit.registry import STEP_KINDS
from alignkit.types import Conditioning

StepFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
]
"""``(x [B, ...], v [B, ...], sigma [B], sigma_next [B], noise_level) -> (mean [B, ...], std [B])``."""


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` broadcastable against ``like``."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1)))


def randn(
    shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """``[B, *shape[1:]]`` standard normal noise, row ``b`` drawn from ``generators[b]`` on the CPU.

    Drawing per row on the CPU makes a sample's noise independent of its batch position and of the
    device, which seed groups and exact resume rely on.
    """
    if len(generators) != shape[0]:
        raise ValueError(f"need one generator per batch row: got {len(generators)} for batch {shape[0]}")
    rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in generators]
    return torch.stack(rows).to(device=device, dtype=dtype)


@STEP_KINDS.register("ode")
def ode_step(x, v, sigma, sigma_next, noise_level):
    """Euler ODE step: ``mean = x + delta * v``, ``std = 0`` (deterministic)."""
    delta = _expand(sigma_next - sigma, x)
    return x + delta * v, torch.zeros_like(sigma)


@STEP_KINDS.register("flow_grpo")
def flow_grpo_step(x, v, sigma, sigma_next, noise_level):
    """Flow-GRPO's SDE step (Liu et al. 2025), noise level ``a``.

    ``sigma_t = a * sqrt(sigma / (1 - sigma))`` with the next sigma in the denominator at sigma = 1;
    ``mean = x (1 + sigma_t^2 delta / (2 sigma)) + v (1 + sigma_t^2 (1 - sigma) / (2 sigma)) delta``;
    ``std = sigma_t sqrt(-delta)``.
    """
    denom = 1.0 - torch.where(sigma >= 1.0, sigma_next, sigma)
    sigma_t = noise_level * torch.sqrt(sigma / denom)
    delta = sigma_next - sigma
    s, st, d = _expand(sigma, x), _expand(sigma_t, x), _expand(delta, x)
    mean = x * (1 + st**2 * d / (2 * s)) + v * (1 + st**2 * (1 - s) / (2 * s)) * d
    return mean, sigma_t * torch.sqrt(-delta)


@STEP_KINDS.register("cps")
def cps_step(x, v, sigma, sigma_next, noise_level):
    """Coefficient-preserving sampling: ``std = sigma' sin(a pi / 2)``.

    ``mean = x0_hat (1 - sigma') + x1_hat sqrt(sigma'^2 - std^2)`` with ``x0_hat = x - sigma v`` and
    ``x1_hat = x + (1 - sigma) v``; the total noise coefficient stays ``sigma'``.

    Its log-probability is the exact Gaussian log-density by default; Flow-GRPO's released CPS code uses
    ``-(x' - mean)^2`` instead, without the ``1 / (2 std^2)`` scaling (up to ~7,900x at the last trainable step
    of SD3's schedule): ``algo.logprob=cps_released`` reproduces it (module docstring).
    """
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    s, sn, sd = _expand(sigma, x), _expand(sigma_next, x), _expand(std, x)
    x0_hat = x - s * v
    x1_hat = x + (1 - s) * v
    mean = x0_hat * (1 - sn) + x1_hat * torch.sqrt((sn**2 - sd**2).clamp_min(0.0))
    return mean, std


@STEP_KINDS.register("dance_grpo")
def dance_grpo_step(x, v, sigma, sigma_next, noise_level):
    """DanceGRPO's SDE step: constant ``eta = noise_level``, ``std = eta sqrt(sigma - sigma')``.

    ``mean = x + delta v - (eta^2 / 2) score delta`` with the score estimate
    ``score = -(x - (1 - sigma) x0_hat) / sigma^2`` and ``x0_hat = x - sigma v``.
    """
    delta = sigma_next - sigma
    s, d = _expand(sigma, x), _expand(delta, x)
    x0_hat = x - s * v
    score = -(x - x0_hat * (1 - s)) / s**2
    mean = x + d * v - 0.5 * noise_level**2 * score * d
    return mean, noise_level * torch.sqrt(-delta)


@dataclass
class GaussianStep:
    """``N(mean, std^2 I)`` transition of a batch of flow states.

    Attributes:
        mean: ``[B, ...]`` float32 transition mean.
        std: ``[B]`` float32 transition std (0 for an ODE step).
        ode_mean: ``[B, ...]`` the deterministic (Euler ODE) next state.
        logprob: the log-probability convention, one of :data:`LOGPROB_CONVENTIONS`.
    """

    mean: torch.Tensor
    std: torch.Tensor
    ode_mean: torch.Tensor
    logprob: str = "exact"

    def __post_init__(self) -> None:
        if self.logprob not in LOGPROB_CONVENTIONS:
            raise ValueError(f"algo.logprob={self.logprob!r}: use {' or '.join(LOGPROB_CONVENTIONS)}")

    @property
    def scale(self) -> torch.Tensor:
        return self.std

    def index(self, rows: torch.Tensor) -> GaussianStep:
        return GaussianStep(mean=self.mean[rows], std=self.std[rows], ode_mean=self.ode_mean[rows],
                            logprob=self.logprob)

    def mode(self) -> torch.Tensor:
        return self.ode_mean

    def sample(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        noise = randn(self.mean.shape, generators, self.mean.device, self.mean.dtype)
        return self.mean + _expand(self.std, self.mean) * noise

    def log_prob(self, next_state: torch.Tensor) -> torch.Tensor:
        """``[B]`` log-probability of ``next_state`` ``[B, ...]``, averaged (not summed) over the non-batch
        elements, as the released Flow-GRPO and DanceGRPO code does.

        ``exact``: the Gaussian log-density; ``cps_released``: ``-(x' - mean)^2`` (Flow-GRPO's released CPS
        code, no ``1 / (2 std^2)`` scaling and no constants). Averaging keeps the ratio's scale independent of
        the resolution; ``clip_range`` ~1e-4 assumes it.
        """
        if bool((self.std <= 0).any()):
            raise ValueError("log_prob of a deterministic (std 0) step is undefined; only stochastic steps train")
        x = next_state.to(self.mean.dtype)
        if self.logprob == "cps_released":
            return (-((x - self.mean) ** 2)).flatten(1).mean(dim=1)
        std = _expand(self.std, self.mean)
        lp = -((x - self.mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
        return lp.flatten(1).mean(dim=1)

    def kl(self, reference: StepDistribution) -> torch.Tensor:
        """Exact Gaussian KL for equal stds, averaged over elements: ``mean((mu - mu_ref)^2) / (2 s^2)``."""
        if not isinstance(reference, GaussianStep):
            raise TypeError(f"KL between GaussianStep and {type(reference).__name__} is undefined")
        sq = ((self.mean - reference.mean) ** 2).flatten(1).mean(dim=1)
        return sq / (2 * self.std**2)


class FlowMatchingSampler(Sampler):
    """Shared transition logic of flow-matching backbones (SD3, FLUX, Wan, audio).

    Subclasses provide the schedule (``sigmas`` ``[N + 1]`` and model ``timesteps`` ``[N]``), prompt
    encoding, initial noise, the guided velocity and decoding; this class turns the velocity into the
    ODE or SDE transition of the configured step family.
    """

    def __init__(self, *, step_kind: str = "flow_grpo", noise_level: float = 0.7) -> None:
        self.step_kind = step_kind
        self.step_fn: StepFn = STEP_KINDS.get(step_kind)
        self.noise_level = float(noise_level)
        self.logprob = "exact"

    def use_logprob(self, convention: str) -> None:
        """Compute the stochastic steps' log-probabilities under ``convention`` (``algo.logprob``).

        Raises:
            ValueError: an unknown convention, or ``cps_released`` with another step family than ``cps``.
        """
        if convention not in LOGPROB_CONVENTIONS:
            raise ValueError(f"algo.logprob={convention!r}: use {' or '.join(LOGPROB_CONVENTIONS)}")
        if convention == "cps_released" and self.step_kind != "cps":
            raise ValueError(f"algo.logprob=cps_released with algo.step_kind={self.step_kind!r}: the released "
                             "convention is that of the CPS step; set algo.step_kind=cps or algo.logprob=exact")
        self.logprob = convention

    @property
    @abstractmethod
    def sigmas(self) -> torch.Tensor:
        """``[N + 1]`` float32 sigmas of the sampling schedule, ending at 0."""

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1

    @abstractmethod
    def velocity(self, state: torch.Tensor, step: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``[B, ...]`` guided velocity prediction at schedule indices ``step`` ``[B]``."""

    def transition(
        self, state: torch.Tensor, step: torch.Tensor, cond: Conditioning, *, stochastic: bool
    ) -> GaussianStep:
        v = self.velocity(state, step, cond).float()
        x = state.float()
        sigmas = self.sigmas.to(x.device)
        sigma, sigma_next = sigmas[step], sigmas[step + 1]
        ode_mean, zero = ode_step(x, v, sigma, sigma_next, 0.0)
        if not stochastic:
            return GaussianStep(mean=ode_mean, std=zero, ode_mean=ode_mean)
        mean, std = self.step_fn(x, v, sigma, sigma_next, self.noise_level)
        return GaussianStep(mean=mean, std=std, ode_mean=ode_mean, logprob=self.logprob)

    def transition_std(self) -> torch.Tensor:
        """``[N]`` transition std of each step of the schedule under the configured step family."""
        sig = self.sigmas.float()
        x = torch.zeros(sig.shape[0] - 1, 1)
        _, std = self.step_fn(x, x, sig[:-1], sig[1:], self.noise_level)
        return std
