"""ToneEval: a programmatic reward for the tones world, by plain signal processing.

Clips ``[B, C, T]`` in [-1, 1] at ``sample_rate`` Hz (8 kHz for the world) are averaged to mono and read in
three passes (thresholds in :class:`ToneConfig`):

1. **Onsets** (energy envelope). RMS levels of ``window_s`` (10 ms) windows every ``hop_s`` (5 ms)
   (:func:`alignkit.rewards.audio.window_levels`); a window is active when its level is above ``gate_db``
   (-40 dBFS) and within ``relative_gate_db`` (20 dB) of the clip's loudest window. Runs of active windows
   separated by less than ``merge_gap_s`` (30 ms) merge; runs shorter than ``min_event_s`` (40 ms) are dropped.
   Each remaining run is an *event*, from the first active window's centre to the last one's.
2. **Pitch track** of each event: Hann-windowed spectra of ``frame`` (256) samples every ``frame_hop`` (40),
   zero-padded to ``fft_size`` (2048), over the event; each frame's peak frequency (between ``min_hz`` and
   Nyquist, refined by parabolic interpolation of the log power) and its *tonality*: the share of the frame's
   power within ``±(band_hz + band_fraction * f)`` of the peak ``f``. An event is a **tone** when its mean
   tonality is at least ``min_tonality`` (0.5): a sine scores about 0.99, white noise about 0.27, so noise bursts
   are not counted.
3. **Attributes** of each tone: ``pitch`` = the pitch class (:data:`~alignkit.worlds.tones.world.PITCHES`)
   nearest in octaves to the geometric median of its frame frequencies, none when more than half an octave
   from every class; ``shape`` from the least-squares slope of log2-frequency over time times the tone's length
   (its sweep in octaves, 1.0 for a rendered chirp): ``rising`` above ``+sweep_octaves``, ``falling`` below
   ``-sweep_octaves`` (0.5), else ``beep``; ``duration`` = ``short`` when its length is below ``long_s``
   (0.16 s, between the world's longest short tone, 0.11 s, and shortest long one, 0.198 s), else ``long``.

Credits of a clip, each in [0, 1], given ``n`` detected tones for a caption of ``k`` tones:

* ``count``: 1.0 when ``n == k``, else 0.0;
* ``pitch`` / ``shape`` / ``duration``: ``min(k, m) / max(n, k)`` where ``m`` detected tones have the caption's
  value (extra tones and missing ones both cost: three right tones for "a beep" earn 1/3); ``duration`` only when
  the caption states one.

Partial score: the mean credit. Strict score: 1.0 when every credit is 1.0, else 0.0. A faithful render
scores 1.0 on both; silence and white noise score 0.0 (no tone detected).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from alignkit.rewards.audio import check_audio, window_levels
from alignkit.worlds.common import as_spec, score_by_spec, spec_of_sample
from alignkit.worlds.tones.world import CATEGORIES, PITCHES, SAMPLE_RATE, ToneSpec, parse_caption

__all__ = [
    "CREDITS", "DEFAULT_TONE", "MODES", "DetectedTone", "ToneConfig", "ToneEval", "detect_tones", "resolve_spec",
    "summarize", "tone_credits", "toneeval_details",
]

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("partial", "strict")
CREDITS: tuple[str, ...] = ("count", "pitch", "shape", "duration")


@dataclass(frozen=True)
class ToneConfig:
    """Detector thresholds of ToneEval (see the module docstring)."""

    window_s: float = 0.01
    hop_s: float = 0.005
    gate_db: float = -40.0
    relative_gate_db: float = 20.0
    merge_gap_s: float = 0.03
    min_event_s: float = 0.04
    frame: int = 256
    frame_hop: int = 40
    fft_size: int = 2048
    min_hz: float = 100.0
    band_hz: float = 100.0
    band_fraction: float = 0.2
    min_tonality: float = 0.5
    sweep_octaves: float = 0.5
    long_s: float = 0.16

    def __post_init__(self) -> None:
        for name in ("window_s", "hop_s", "relative_gate_db", "min_event_s", "band_hz", "sweep_octaves", "long_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ToneConfig.{name}={getattr(self, name)} must be > 0")
        if not 0 < self.frame <= self.fft_size or self.frame_hop < 1:
            raise ValueError(f"ToneConfig: need 0 < frame={self.frame} <= fft_size={self.fft_size} and "
                             f"frame_hop={self.frame_hop} >= 1")
        if not 0.0 <= self.min_tonality <= 1.0:
            raise ValueError(f"ToneConfig.min_tonality={self.min_tonality} must lie in [0, 1]")


DEFAULT_TONE = ToneConfig()


@dataclass(frozen=True)
class DetectedTone:
    """One tone found in a clip.

    Attributes:
        start, end: first and last active window centres (s).
        frequency: geometric median of the frame peak frequencies (Hz).
        sweep: fitted change of log2-frequency over the tone (octaves; > 0 rising).
        tonality: mean share of frame power near the peak (0-1).
        pitch: nearest pitch class, or None when more than half an octave from every class.
        shape: ``beep``, ``rising`` or ``falling``.
        duration: ``short`` or ``long``.
    """

    start: float
    end: float
    frequency: float
    sweep: float
    tonality: float
    pitch: str | None
    shape: str
    duration: str


def _events(active: np.ndarray, cfg: ToneConfig) -> list[tuple[int, int]]:
    """``(first, last)`` window indices of each event of a boolean activity row ``[N]`` (merged, long enough)."""
    idx = np.flatnonzero(active)
    if not len(idx):
        return []
    runs: list[list[int]] = [[int(idx[0]), int(idx[0])]]
    max_gap = cfg.merge_gap_s / cfg.hop_s
    for i in idx[1:]:
        if i - runs[-1][1] - 1 < max_gap:
            runs[-1][1] = int(i)
        else:
            runs.append([int(i), int(i)])
    return [(a, b) for a, b in runs if (b - a) * cfg.hop_s >= cfg.min_event_s]


def _pitch_class(frequency: float) -> str | None:
    name, centre = min(PITCHES.items(), key=lambda kv: abs(math.log2(frequency / kv[1])))
    return name if abs(math.log2(frequency / centre)) <= 0.5 else None


def _analyse(x: np.ndarray, start: float, end: float, sample_rate: int, cfg: ToneConfig) -> DetectedTone | None:
    """The tone of one event ``x[start * sr : end * sr]`` of a mono clip ``x`` ``[T]``; None when it has no
    spectral frame at all."""
    lo = max(0, round(start * sample_rate) - cfg.frame // 2)
    hi = min(len(x), round(end * sample_rate) + cfg.frame // 2)
    seg = x[lo:hi]
    if len(seg) < cfg.frame:
        return None
    frames = np.lib.stride_tricks.sliding_window_view(seg, cfg.frame)[:: cfg.frame_hop]  # [F, frame]
    power = np.abs(np.fft.rfft(frames * np.hanning(cfg.frame), n=cfg.fft_size)) ** 2  # [F, K]
    freqs = np.fft.rfftfreq(cfg.fft_size, 1.0 / sample_rate)  # [K]
    usable = freqs >= cfg.min_hz
    peak = np.argmax(np.where(usable, power, -1.0), axis=1)  # [F]
    # parabolic interpolation of the log power around the peak bin
    k = np.clip(peak, 1, power.shape[1] - 2)
    rows = np.arange(len(k))
    a, b, c = (np.log(power[rows, j] + 1e-20) for j in (k - 1, k, k + 1))
    denom = a - 2 * b + c
    shift = np.where(np.abs(denom) > 1e-12, 0.5 * (a - c) / np.where(denom == 0, 1, denom), 0.0)
    f = (k + np.clip(shift, -0.5, 0.5)) * sample_rate / cfg.fft_size  # [F] Hz
    f = np.maximum(f, cfg.min_hz)
    half = cfg.band_hz + cfg.band_fraction * f  # [F]
    near = np.abs(freqs[None, :] - f[:, None]) <= half[:, None]  # [F, K]
    total = power.sum(axis=1)  # [F]
    tonality = np.where(total > 0, (power * near).sum(axis=1) / np.maximum(total, 1e-30), 0.0)  # [F]
    logf = np.log2(f)
    frequency = float(2.0 ** np.median(logf))
    length = end - start
    if len(f) >= 2:
        t = (lo + rows * cfg.frame_hop + cfg.frame / 2) / sample_rate  # [F] frame centres (s)
        slope = float(np.polyfit(t, logf, 1)[0])  # octaves per second
    else:
        slope = 0.0
    sweep = slope * length
    shape = "rising" if sweep > cfg.sweep_octaves else "falling" if sweep < -cfg.sweep_octaves else "beep"
    return DetectedTone(start=start, end=end, frequency=frequency, sweep=sweep, tonality=float(tonality.mean()),
                        pitch=_pitch_class(frequency), shape=shape, duration="short" if length < cfg.long_s else "long")


def detect_tones(
    samples: torch.Tensor, sample_rate: int = SAMPLE_RATE, cfg: ToneConfig = DEFAULT_TONE
) -> list[list[DetectedTone]]:
    """The tones of each clip of ``samples`` ``[B, C, T]`` (averaged to mono), in time order.

    Events that are not tonal enough (``cfg.min_tonality``) are left out; a clip with non-finite values has
    no tones.
    """
    waves = check_audio(samples)  # [B, C, T]
    mono = waves.mean(dim=1, keepdim=True)  # [B, 1, T]
    window, hop = max(1, round(cfg.window_s * sample_rate)), max(1, round(cfg.hop_s * sample_rate))
    levels = window_levels(torch.nan_to_num(mono), window, hop).numpy()  # [B, N] dBFS
    out: list[list[DetectedTone]] = []
    for b in range(waves.shape[0]):
        x = mono[b, 0].double().numpy()
        if not np.isfinite(x).all() or levels.shape[1] == 0:
            out.append([])
            continue
        lv = levels[b]
        active = (lv > cfg.gate_db) & (lv > lv.max() - cfg.relative_gate_db)
        centre = (np.arange(len(lv)) * hop + window / 2) / sample_rate  # [N] window centres (s)
        tones = []
        for first, last in _events(active, cfg):
            tone = _analyse(x, float(centre[first]), float(centre[last]), sample_rate, cfg)
            if tone is not None and tone.tonality >= cfg.min_tonality:
                tones.append(tone)
        out.append(tones)
    return out


def tone_credits(tones: Sequence[DetectedTone], spec: ToneSpec) -> dict[str, float]:
    """The credits (:data:`CREDITS`; ``duration`` only when the caption states one) of one clip's tones."""
    n, k = len(tones), spec.count
    denom = max(n, k)
    credits = {
        "count": float(n == k),
        "pitch": min(k, sum(t.pitch == spec.pitch for t in tones)) / denom,
        "shape": min(k, sum(t.shape == spec.shape for t in tones)) / denom,
    }
    if spec.duration is not None:
        credits["duration"] = min(k, sum(t.duration == spec.duration for t in tones)) / denom
    return credits


def toneeval_details(
    samples: torch.Tensor,
    metadata: Sequence[ToneSpec | Mapping[str, Any]],
    sample_rate: int = SAMPLE_RATE,
    cfg: ToneConfig = DEFAULT_TONE,
) -> list[dict[str, Any]]:
    """Per-clip evaluation: category, caption, credits, strict and partial scores, detected tones.

    Args:
        samples: ``[B, C, T]`` in [-1, 1] at ``sample_rate`` Hz.
        metadata: ``B`` specs, as :class:`~alignkit.worlds.tones.world.ToneSpec` or its metadata dicts.

    Raises:
        ValueError: on a length mismatch or a row that is not a valid spec.
    """
    specs = [as_spec(m, i, ToneSpec, "tones") for i, m in enumerate(metadata)]
    detected = detect_tones(samples, sample_rate, cfg)
    if len(detected) != len(specs):
        raise ValueError(f"{len(detected)} clips but {len(specs)} metadata rows; give one per clip")
    out = []
    for spec, tones in zip(specs, detected):
        credits = tone_credits(tones, spec)
        values = list(credits.values())
        out.append({
            "category": spec.category,
            "caption": spec.caption(),
            "credits": credits,
            "strict": float(all(v == 1.0 for v in values)),
            "partial": sum(values) / len(values),
            "tones": [asdict(t) for t in tones],
        })
    return out


def summarize(details: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per-category summary of :func:`toneeval_details` rows.

    Keys: ``{category}/strict``, ``{category}/partial``, ``{category}/n`` and ``{category}/{credit}`` (mean
    credit over the rows that have it) for each category present, and ``strict`` / ``partial``: the unweighted
    mean over those categories, ``n``: the number of rows.
    """
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for d in details:
        groups[d["category"]].append(d)
    out: dict[str, float] = {}
    cats = [c for c in CATEGORIES if c in groups]
    for cat in cats:
        rows = groups[cat]
        out[f"{cat}/strict"] = float(np.mean([r["strict"] for r in rows]))
        out[f"{cat}/partial"] = float(np.mean([r["partial"] for r in rows]))
        out[f"{cat}/n"] = float(len(rows))
        for name in CREDITS:
            values = [r["credits"][name] for r in rows if name in r["credits"]]
            if values:
                out[f"{cat}/{name}"] = float(np.mean(values))
    if cats:
        out["strict"] = float(np.mean([out[f"{c}/strict"] for c in cats]))
        out["partial"] = float(np.mean([out[f"{c}/partial"] for c in cats]))
    out["n"] = float(len(details))
    return out


def resolve_spec(prompt: str, metadata: Mapping[str, Any] | None) -> ToneSpec | None:
    """The tones spec of one sample: from its metadata, else its caption; None for a caption of no tones world.

    Raises:
        ValueError: when the metadata carries a malformed spec (or one of another world).
    """
    return spec_of_sample(prompt, metadata, ToneSpec, parse_caption)


class ToneEval:
    """ToneEval reward: the strict or partial score of each clip (see the module docstring).

    A sample gets None (masked, not trained on) when neither its metadata nor its prompt gives a tones spec, or
    when its clip has a non-finite value.

    Args:
        mode: ``"partial"`` (mean credit, in [0, 1]) or ``"strict"`` (1.0 when every credit is 1.0).
        sample_rate: rate of the clips (Hz); recipes pass ``${backbone.options.sample_rate}``.
        detector: detector thresholds (a :class:`ToneConfig` or a dict of its fields).
    """

    def __init__(
        self, mode: str = "partial", sample_rate: int = SAMPLE_RATE,
        detector: ToneConfig | Mapping[str, Any] | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not a ToneEval mode; use one of {MODES}")
        if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate < 1:
            raise ValueError(f"sample_rate={sample_rate!r}: give the clips' rate in Hz as a positive integer "
                             "(in recipes: sample_rate: ${backbone.options.sample_rate})")
        if detector is not None and not isinstance(detector, (ToneConfig, Mapping)):
            raise ValueError(f"detector={detector!r}: give a ToneConfig or a dict of its fields")
        self.mode = mode
        self.sample_rate = sample_rate
        try:
            self.detector = detector if isinstance(detector, ToneConfig) else ToneConfig(**(detector or {}))
        except TypeError as exc:
            fields = ", ".join(ToneConfig.__dataclass_fields__)
            raise ValueError(f"detector={dict(detector or {})!r}: {exc}; valid fields: {fields}") from exc

    def __call__(
        self, samples: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[float | None]:
        waves = check_audio(samples)  # [B, C, T]
        scores = score_by_spec(waves, prompts, metadata or [], resolve_spec,
                               lambda x, specs: toneeval_details(x, specs, self.sample_rate, self.detector),
                               self.mode, "tones")
        finite = torch.isfinite(waves).flatten(1).all(dim=1).tolist()  # [B]
        return [s if ok else None for s, ok in zip(scores, finite)]
