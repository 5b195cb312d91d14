"""Small statistics for held-out scores: means with standard errors and t-based 95% intervals, paired differences
clustered by prompt, and interpolation on a curve.

Held-out samples of one prompt (its evaluation seeds) are not independent draws, so every standard error here
treats the *prompt* as the unit: a prompt's samples are averaged first and the spread is taken over prompts.
A paired difference pairs the two sides' samples by ``(prompt id, evaluation seed)`` before that.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Estimate", "by_prompt", "first_crossing", "format_interval", "interpolate", "mean_estimate",
           "paired_difference", "seed_paired_difference", "t975"]

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (a table up to 30, then the
    Cornish-Fisher expansion, within 1e-4); NaN for ``df < 1``."""
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error over ``n`` units (prompts, or seeds of a run group).

    Attributes:
        mean: the mean (NaN when ``n == 0``).
        se: its standard error (NaN when ``n < 2``).
        n: the number of units.
    """

    mean: float
    se: float
    n: int

    @property
    def half_width(self) -> float:
        """Half-width of the t-based 95% interval (NaN when ``n < 2``)."""
        return t975(self.n - 1) * self.se if self.n >= 2 else math.nan

    @property
    def ci95(self) -> tuple[float, float]:
        return self.mean - self.half_width, self.mean + self.half_width

    def excludes_zero(self) -> bool:
        """Whether the 95% interval lies entirely above or below 0 (False when it is undefined)."""
        lo, hi = self.ci95
        return (lo > 0 or hi < 0) and not math.isnan(self.half_width)

    def to_dict(self) -> dict[str, float | int | None]:
        lo, hi = self.ci95
        return {"mean": _finite(self.mean), "se": _finite(self.se), "n": self.n, "ci95": [_finite(lo), _finite(hi)]}


def _finite(v: float) -> float | None:
    """``v`` for JSON: None where it is NaN or infinite."""
    return v if math.isfinite(v) else None


def mean_estimate(values: Sequence[float]) -> Estimate:
    """Mean and standard error (sample std / sqrt(n)) of the finite ``values``."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    mean = sum(xs) / n
    if n < 2:
        return Estimate(mean, math.nan, n)
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return Estimate(mean, math.sqrt(var / n), n)


def by_prompt(values: Mapping[tuple[Hashable, Hashable], float | None]) -> dict[Hashable, float]:
    """``{(prompt id, seed): value}`` -> ``{prompt id: mean over its seeds}``; missing and non-finite values are
    left out (a prompt with none is dropped)."""
    sums: dict[Hashable, list[float]] = {}
    for (prompt, _), v in values.items():
        if v is not None and math.isfinite(v):
            sums.setdefault(prompt, []).append(float(v))
    return {p: sum(vs) / len(vs) for p, vs in sums.items()}


def paired_difference(a: Mapping[tuple[Hashable, Hashable], float | None],
                      b: Mapping[tuple[Hashable, Hashable], float | None]) -> Estimate:
    """Mean of ``b - a`` over the ``(prompt id, seed)`` pairs both score, averaged per prompt; the standard error
    is over prompts (see the module docstring)."""
    diffs = {}
    for key, va in a.items():
        vb = b.get(key)
        if va is None or vb is None or not (math.isfinite(va) and math.isfinite(vb)):
            continue
        diffs[key] = vb - va
    return mean_estimate(list(by_prompt(diffs).values()))


def interpolate(xs: Sequence[float], ys: Sequence[float], at: float) -> float:
    """Linear interpolation of the curve ``(xs, ys)`` (``xs`` increasing) at ``at``; NaN outside its range."""
    points = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if not points or at < points[0][0] or at > points[-1][0]:
        return math.nan
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= at <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return points[-1][1]


def first_crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> float:
    """The smallest x at which the curve ``(xs, ys)`` (``xs`` increasing, linear between points) reaches
    ``target`` (``y >= target``); NaN when it never does inside its range (censored at its last x)."""
    points = [(float(x), float(y)) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]
    if points and points[0][1] >= target:
        return points[0][0]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if y1 >= target:
            return x1 if y1 == y0 else x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return math.nan


def seed_paired_difference(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> Estimate:
    """Mean of ``b - a`` over the keys (seeds) both hold a finite value for, with its standard error over them
    (the t interval of :attr:`Estimate.half_width` is the paired t interval)."""
    return mean_estimate([b[k] - a[k] for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])])


def format_interval(d: Mapping[str, Any] | None, signed: bool = False) -> str:
    """``"mean [lo, hi]"`` of an :meth:`Estimate.to_dict` (3 decimals; ``signed`` shows ``+`` signs, for
    differences); ``"mean (n=...)"`` without an interval; ``"-"`` without a mean."""
    if not d or d.get("mean") is None:
        return "-"
    lo, hi = d["ci95"]
    mean = f"{d['mean']:+.3f}" if signed else f"{d['mean']:.3f}"
    if lo is None:
        return f"{mean} (n={d['n']})"
    return f"{mean} [{lo:+.3f}, {hi:+.3f}]" if signed else f"{mean} [{lo:.3f}, {hi:.3f}]"
