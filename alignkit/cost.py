"""Cost accounting: model FLOPs by phase and the counts that make runs comparable at equal compute.

Model FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions
and attention; elementwise work is not counted) on the first call of each distinct input shape of each phase,
cached, and added for every later call of that shape, so counting costs one instrumented call per shape.
A call's FLOPs depend on its shapes only (no data-dependent compute in the adapters), so the cached count is
exact for every call. Training FLOPs include the policy forward, the reference forward and the backward.

The trainer writes the ``cost/*`` metrics of :data:`COST_METRICS` every epoch (``metrics.jsonl``), summed over
processes, and their running totals (``cost/<name>_total``, kept across resume).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

logger = logging.getLogger(__name__)

T = TypeVar("T")

PHASES = ("rollout", "decode", "train")
"""``rollout``: the denoiser's transitions while sampling (trunks, children, ODE completion; text encoding,
once per prompt, is not counted); ``decode``: final states to samples (the VAE decoder); ``train``: the update."""

COUNTS = ("train_inputs", "decodes", "reward_calls", "optimizer_steps")

_EPOCH_COSTS: dict[str, str] = {
    "cost/rollout_flops": "Model FLOPs of the epoch's rollout (the denoiser's transitions; text encoding not counted), "
        "all processes.",
    "cost/decode_flops": "Model FLOPs of decoding the epoch's samples, all processes.",
    "cost/train_flops": "Model FLOPs of the epoch's update (policy forward with grad, reference forward when beta > 0, "
        "backward), all processes.",
    "cost/flops": "Rollout + decode + update model FLOPs of the epoch.",
    "cost/train_inputs": "Inputs the epoch's update evaluated (distinct inputs with train.shared_inputs, else "
        "transitions; inner epochs summed).",
    "cost/decodes": "Samples decoded in the epoch.",
    "cost/reward_calls": "Reward evaluations of the epoch: samples scored x training rewards.",
    "cost/optimizer_steps": "Optimizer steps taken in the epoch.",
}
COST_METRICS: dict[str, str] = {
    **_EPOCH_COSTS,
    **{f"{k}_total": f"Sum of {k} over the run's epochs so far (kept across resume)." for k in _EPOCH_COSTS},
}
"""The ``cost/*`` keys of ``metrics.jsonl`` and their meaning, in the form of :data:`alignkit.metrics.METRICS`
(rollout NFE is ``rollout/nfe``)."""


def count_flops(fn: Callable[[], T]) -> tuple[T, int]:
    """``(fn(), model FLOPs fn ran)`` counted by :class:`~torch.utils.flop_counter.FlopCounterMode` (this thread
    only; a backward run inside ``fn`` counts too)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return out, int(counter.get_total_flops())


def shape_key(*objs: Any) -> tuple[Any, ...]:
    """A hashable description of the shapes (and dtypes) of tensors in ``objs`` (nested dicts, lists and tuples
    walked; other values kept as they are)."""

    def walk(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            return ("T", tuple(o.shape), str(o.dtype))
        if isinstance(o, dict):
            return ("D", tuple((k, walk(v)) for k, v in sorted(o.items())))
        if isinstance(o, (list, tuple)):
            return ("L", tuple(walk(v) for v in o))
        return o

    return tuple(walk(o) for o in objs)


class FlopMeter:
    """Model FLOPs by phase, each distinct call shape measured once and cached (see the module docstring).

    Use :meth:`call` around each model call; :meth:`take` returns and clears the FLOPs counted since the last
    take (one epoch), :meth:`take_seconds` the wall seconds spent inside the calls. The cache lives as long as the
    meter.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, tuple[Any, ...]], int] = {}
        self._flops: dict[str, int] = dict.fromkeys(PHASES, 0)
        self._seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def call(self, phase: str, key: tuple[Any, ...], fn: Callable[[], T]) -> T:
        """``fn()``, adding its FLOPs to ``phase``: measured when ``key`` (its input shapes, see :func:`shape_key`)
        is new to this phase, else taken from the cache."""
        if phase not in self._flops:
            raise ValueError(f"unknown cost phase {phase!r}; use one of {', '.join(PHASES)}")
        cached = self._cache.get((phase, key))
        t0 = time.perf_counter()
        if cached is None:
            out, cached = count_flops(fn)
            self._cache[(phase, key)] = cached
            logger.debug("%s: %d model FLOPs per call of shape %s", phase, cached, key)
        else:
            out = fn()
        self._seconds[phase] += time.perf_counter() - t0
        self._flops[phase] += cached
        return out

    def take(self) -> dict[str, int]:
        """FLOPs per phase since the last call, and reset them."""
        out, self._flops = self._flops, dict.fromkeys(PHASES, 0)
        return out

    def take_seconds(self) -> dict[str, float]:
        """Wall seconds spent inside :meth:`call` per phase since the last call, and reset them. On CUDA a call
        returns once its kernels are queued, so this undercounts unless the call synchronises."""
        out, self._seconds = self._seconds, dict.fromkeys(PHASES, 0.0)
        return out

    @property
    def measured_shapes(self) -> int:
        """Distinct (phase, shape) calls measured so far."""
        return len(self._cache)


def maybe_meter(meter: FlopMeter | None, phase: str, key: tuple[Any, ...], fn: Callable[[], T]) -> T:
    """``meter.call(phase, key, fn)``, or ``fn()`` when there is no meter."""
    if meter is None:
        return fn()
    return meter.call(phase, key, fn)
