"""The tones world: captions of beeps and chirps, and their procedural renders.

A clip is :data:`CLIP_SECONDS` (1 s) of mono audio at :data:`SAMPLE_RATE` (8 kHz), float in [-1, 1]: one to
three tones on silence, all with the caption's pitch, shape and (when given) duration class.

* **pitch** ``low`` / ``mid`` / ``high``: centre frequency 300 / 600 / 1200 Hz (:data:`PITCHES`, an octave
  apart), detuned per tone by up to :data:`DETUNE_SEMITONES` (1 semitone) either way;
* **shape** ``beep`` (steady), ``rising`` or ``falling`` (an exponential chirp over :data:`SWEEP_OCTAVES`,
  one octave, centred on the pitch: a rising high chirp sweeps 849 -> 1697 Hz);
* **duration** ``short`` / ``long``: each tone lasts 0.10 / 0.22 s (:data:`DURATIONS`) times a factor in
  ``DURATION_JITTER`` (0.9-1.1); a caption without a duration word leaves it free (drawn per clip, one class for
  all its tones, and not scored);
* **count** 1-3 tones ("a", "two", "three"), at least :data:`MIN_GAP` (80 ms) of silence apart and
  :data:`MARGIN` (40 ms) from the clip's ends, at random positions.

Each tone has a random starting phase and amplitude in :data:`AMPLITUDE_RANGE`, and 10 ms raised-cosine fades
(:data:`FADE_SECONDS`) at both ends, so that it starts and stops without a click.

Captions: ``"{count} [{duration}] {pitch} {noun}"`` with noun ``beep(s)``, ``rising chirp(s)`` or ``falling
chirp(s)``, e.g. "two high beeps", "a short low rising chirp", "three long mid falling chirps" (81 captions).
Categories: ``beep`` (steady tones, 27 captions) and ``chirp`` (rising or falling, 54).

Held-out captions: the shared rule (:func:`alignkit.worlds.common.split_of`: SHA-256 of the caption 0 mod 5):
10 of the 81 (2 beep, 8 chirp). :func:`prompt_set` draws from one split only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from alignkit.worlds.common import SPLITS, draw_split, split_of

__all__ = [
    "AMPLITUDE_RANGE", "CATEGORIES", "CHANNELS", "CLIP_SECONDS", "COUNT_WORDS", "DURATIONS", "MARGIN", "MIN_GAP",
    "NUM_SAMPLES", "PITCHES", "SAMPLE_RATE", "SHAPES", "SPLITS", "SWEEP_OCTAVES", "VOCAB_WORDS", "WORLD", "Tone",
    "ToneSpec", "all_specs", "layout_tones", "parse_caption", "prompt_set", "render_batch", "render_clip",
    "sample_spec", "split_of", "synthesize",
]

WORLD = "tones"
"""The ``"world"`` value of this world's metadata."""
SAMPLE_RATE = 8000
"""Samples per second of a clip (the tiny Stable Audio 3 pipelines' rate)."""
CLIP_SECONDS = 1.0
NUM_SAMPLES = int(SAMPLE_RATE * CLIP_SECONDS)
CHANNELS = 1
"""Rendered clips are mono ``[1, T]``."""

PITCHES: dict[str, float] = {"low": 300.0, "mid": 600.0, "high": 1200.0}
"""Pitch class -> centre frequency (Hz); an octave apart, so the class boundaries are 424 and 849 Hz."""
SHAPES: tuple[str, ...] = ("beep", "rising", "falling")
DURATIONS: dict[str, float] = {"short": 0.10, "long": 0.22}
"""Duration class -> nominal tone length (s); ``DURATION_JITTER`` scales it per tone."""
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
CATEGORIES: tuple[str, ...] = ("beep", "chirp")
"""``beep``: steady tones; ``chirp``: rising or falling ones."""

SWEEP_OCTAVES = 1.0
"""Octaves a chirp sweeps, centred (geometrically) on its pitch."""
DETUNE_SEMITONES = 1.0
DURATION_JITTER: tuple[float, float] = (0.9, 1.1)
AMPLITUDE_RANGE: tuple[float, float] = (0.35, 0.6)
FADE_SECONDS = 0.01
MIN_GAP = 0.08
"""Minimum silence (s) between two tones."""
MARGIN = 0.04
"""Minimum silence (s) before the first tone and after the last."""

VOCAB_WORDS: tuple[str, ...] = (
    *COUNT_WORDS.values(), *DURATIONS, *PITCHES, "rising", "falling", "beep", "beeps", "chirp", "chirps",
)
"""Every word a caption can contain, in a fixed order."""


def _noun(shape: str, count: int) -> str:
    base = "beep" if shape == "beep" else f"{shape} chirp"
    return base if count == 1 else base + "s"


@dataclass(frozen=True)
class ToneSpec:
    """What a caption asks for.

    Attributes:
        count: number of tones, 1-3.
        pitch: one of :data:`PITCHES`.
        shape: one of :data:`SHAPES`.
        duration: one of :data:`DURATIONS`, or None when the caption leaves it free.
    """

    count: int
    pitch: str
    shape: str
    duration: str | None = None

    def __post_init__(self) -> None:
        if self.count not in COUNT_WORDS:
            raise ValueError(f"count={self.count!r} is invalid; use one of {tuple(COUNT_WORDS)}")
        if self.pitch not in PITCHES:
            raise ValueError(f"pitch={self.pitch!r} is unknown; use one of {tuple(PITCHES)}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape={self.shape!r} is unknown; use one of {SHAPES}")
        if self.duration is not None and self.duration not in DURATIONS:
            raise ValueError(f"duration={self.duration!r} is unknown; use one of {tuple(DURATIONS)} or None")

    @property
    def category(self) -> str:
        """``"beep"`` for steady tones, ``"chirp"`` for rising or falling ones."""
        return "beep" if self.shape == "beep" else "chirp"

    def caption(self) -> str:
        """The caption text, e.g. ``"two short high beeps"``."""
        words = [COUNT_WORDS[self.count], *([self.duration] if self.duration else []), self.pitch,
                 _noun(self.shape, self.count)]
        return " ".join(words)

    def to_metadata(self) -> dict[str, Any]:
        """JSON-able metadata (the per-prompt row a reward receives)."""
        return {"world": WORLD, "category": self.category, "count": self.count, "pitch": self.pitch,
                "shape": self.shape, "duration": self.duration}

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> ToneSpec:
        """Inverse of :meth:`to_metadata`.

        Raises:
            ValueError: when ``meta`` is not a valid tones spec (another world's metadata included).
        """
        world = meta.get("world", WORLD)
        if world != WORLD:
            raise ValueError(f"metadata of world {world!r} is not {WORLD!r} metadata: {meta!r}")
        try:
            spec = cls(count=meta["count"], pitch=meta["pitch"], shape=meta["shape"], duration=meta.get("duration"))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"invalid {WORLD} metadata {meta!r}: {type(exc).__name__}: {exc}") from exc
        if "category" in meta and meta["category"] != spec.category:
            raise ValueError(f"invalid {WORLD} metadata {meta!r}: category {meta['category']!r} does not match "
                             f"shape {spec.shape!r} (category {spec.category!r})")
        return spec


_PARSE: dict[str, ToneSpec] = {}


def parse_caption(text: str) -> ToneSpec | None:
    """Parse a caption of the world's grammar back into a spec; None when it does not parse.

    Case, surrounding whitespace and a final period are ignored; ``"an"`` / ``"one"`` read as ``"a"``.
    """
    if not _PARSE:
        _PARSE.update({s.caption(): s for s in all_specs()})
    words = text.strip().lower().rstrip(".").split()
    if words and words[0] in ("an", "one"):
        words[0] = "a"
    return _PARSE.get(" ".join(words))


def all_specs(categories: Sequence[str] | None = None) -> list[ToneSpec]:
    """Every distinct prompt of the world (81 over both categories), in a fixed order."""
    cats = tuple(categories) if categories is not None else CATEGORIES
    unknown = [c for c in cats if c not in CATEGORIES]
    if unknown:
        raise ValueError(f"categories {unknown} are unknown; use some of {CATEGORIES}")
    return [ToneSpec(n, p, s, d) for s in SHAPES for n in COUNT_WORDS for d in (None, *DURATIONS) for p in PITCHES
            if ToneSpec(n, p, s, d).category in cats]


def sample_spec(rng: random.Random, categories: Sequence[str] | None = None) -> ToneSpec:
    """A random prompt: category uniform over ``categories`` (all by default), then uniform attributes."""
    cats = tuple(categories) if categories is not None else CATEGORIES
    category = rng.choice(cats)
    if category not in CATEGORIES:
        raise ValueError(f"category {category!r} is unknown; use one of {CATEGORIES}")
    shape = "beep" if category == "beep" else rng.choice(("rising", "falling"))
    return ToneSpec(count=rng.choice(tuple(COUNT_WORDS)), pitch=rng.choice(tuple(PITCHES)), shape=shape,
                    duration=rng.choice((None, *DURATIONS)))


def prompt_set(
    n: int, seed: int, split: str = "train", categories: Sequence[str] | None = None,
    exclude: Collection[str] = frozenset(),
) -> list[ToneSpec]:
    """``n`` prompts drawn with :func:`sample_spec` from ``random.Random(seed)``, keeping one split.

    Args:
        n: number of prompts (repeats allowed).
        seed: seed of the draw; the same arguments give the same list.
        split: ``"train"`` or ``"heldout"`` (see :func:`split_of`), or ``"all"``.
        categories: categories to draw from (all by default).
        exclude: captions never drawn (:func:`~alignkit.worlds.common.draw_split`).
    """
    return draw_split(n, seed, split, lambda rng: sample_spec(rng, categories), exclude)


@dataclass(frozen=True)
class Tone:
    """One rendered tone.

    Attributes:
        start: onset (s from the clip's start).
        length: length (s).
        frequency: centre frequency (Hz; the geometric middle of a chirp's sweep).
        shape: one of :data:`SHAPES`.
        amplitude: peak amplitude.
        phase: starting phase (radians).
    """

    start: float
    length: float
    frequency: float
    shape: str
    amplitude: float
    phase: float


def layout_tones(spec: ToneSpec, rng: random.Random) -> list[Tone]:
    """The tones of one faithful clip of ``spec``, in time order, deterministic given the state of ``rng``.

    The lengths are drawn first (one duration class for the whole clip: the caption's, or a random one when it
    has none); the silence left after the margins and the minimum gaps is then split at random (uniform
    spacings) before, between and after the tones.
    """
    duration = spec.duration or rng.choice(tuple(DURATIONS))
    lengths = [DURATIONS[duration] * rng.uniform(*DURATION_JITTER) for _ in range(spec.count)]
    slack = CLIP_SECONDS - 2 * MARGIN - sum(lengths) - (spec.count - 1) * MIN_GAP
    if slack < 0:
        raise ValueError(f"{spec.caption()!r} does not fit in {CLIP_SECONDS} s")
    cuts = sorted(rng.uniform(0.0, slack) for _ in range(spec.count))
    tones, t, prev = [], MARGIN, 0.0
    for length, cut in zip(lengths, cuts):
        t += cut - prev
        prev = cut
        detune = 2.0 ** (rng.uniform(-DETUNE_SEMITONES, DETUNE_SEMITONES) / 12)
        tones.append(Tone(start=t, length=length, frequency=PITCHES[spec.pitch] * detune, shape=spec.shape,
                          amplitude=rng.uniform(*AMPLITUDE_RANGE), phase=rng.uniform(0.0, 2 * math.pi)))
        t += length + MIN_GAP
    return tones


def synthesize(tones: Sequence[Tone], num_samples: int = NUM_SAMPLES, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``[num_samples]`` float32 mono waveform of ``tones`` on silence.

    A steady tone is a sine at its frequency; a chirp's instantaneous frequency moves exponentially over
    :data:`SWEEP_OCTAVES` octaves centred on it, up (``rising``) or down (``falling``). Every tone is shaped by
    raised-cosine fades of :data:`FADE_SECONDS`.
    """
    out = np.zeros(num_samples, dtype=np.float64)
    for tone in tones:
        first = round(tone.start * sample_rate)
        n = min(round(tone.length * sample_rate), num_samples - first)
        if n <= 0:
            continue
        u = (np.arange(n) + 0.5) / n  # [n] position within the tone, 0-1
        sign = {"beep": 0.0, "rising": 1.0, "falling": -1.0}[tone.shape]
        freq = tone.frequency * 2.0 ** (sign * SWEEP_OCTAVES * (u - 0.5))  # [n] Hz
        phase = tone.phase + 2 * math.pi * np.cumsum(freq) / sample_rate  # [n]
        fade = min(round(FADE_SECONDS * sample_rate), n // 2)
        env = np.ones(n)
        if fade:
            ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(fade) + 0.5) / fade)
            env[:fade], env[n - fade :] = ramp, ramp[::-1]
        out[first : first + n] += tone.amplitude * env * np.sin(phase)
    return out.astype(np.float32)


def render_clip(spec: ToneSpec, rng: random.Random) -> np.ndarray:
    """A faithful clip of ``spec``: ``[NUM_SAMPLES]`` float32, deterministic given the state of ``rng``."""
    return synthesize(layout_tones(spec, rng))


def render_batch(specs: Sequence[ToneSpec], seed: int, channels: int = CHANNELS) -> torch.Tensor:
    """``[B, channels, NUM_SAMPLES]`` float clips in [-1, 1] of ``specs``, deterministic from ``seed``
    (a mono render copied to every channel)."""
    if channels < 1:
        raise ValueError(f"channels={channels}: need at least 1")
    rng = random.Random(seed)
    arr = np.stack([render_clip(s, rng) for s in specs]) if specs else np.zeros((0, NUM_SAMPLES), np.float32)
    return torch.from_numpy(arr)[:, None].expand(-1, channels, -1).contiguous()
