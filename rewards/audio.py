"""Audio rewards: CLAP text-audio similarity and simple signal rewards (loudness range, silence ratio).

Samples are waveforms ``[B, C, T]`` float in [-1, 1] (what audio samplers decode to) at ``sample_rate`` Hz, a
constructor argument of every reward here (recipes set it from ``backbone.options.sample_rate``, which the
sampler checks against its VAE). Every reward follows :mod:`alignkit.reward_set`: one float per clip, ``None`` when
the clip cannot be scored (masked and counted by the reward set): a clip with a non-finite value, or one too
short for the reward's analysis window.

Levels are unweighted RMS levels in dBFS, ``10 log10(mean(x^2))`` over all channels of a window: 0 dB is a
full-scale square wave, a full-scale sine is -3.01 dB, digital silence is -inf. They are not LUFS (no K-weighting).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from alignkit.media.audio import resample
from alignkit.rewards.preference import pooled, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)


def check_audio(samples: Any) -> torch.Tensor:
    """Validate audio samples ``[B, C, T]`` (float in [-1, 1]); returns them detached, float32, on the CPU."""
    if not isinstance(samples, torch.Tensor) or samples.dim() != 3 or not samples.is_floating_point():
        got = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        hint = ""
        if isinstance(samples, torch.Tensor) and samples.dim() == 2:
            hint = " (a batch of mono clips [B, T]? add a channel axis: samples[:, None])"
        raise ValueError(f"expected float audio samples of shape [B, C, T] in [-1, 1], got {got}{hint}")
    if samples.shape[1] == 0:
        raise ValueError(f"audio samples {tuple(samples.shape)} have C=0 channels")
    return samples.detach().float().cpu()


def _check_batch(n: int, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None) -> None:
    if len(prompts) != n or (metadata is not None and len(metadata) != n):
        got = len(metadata) if metadata is not None else "no"
        raise ValueError(f"{n} clips but {len(prompts)} prompts and {got} metadata entries; pass one of each per clip")


def _check_rate(sample_rate: Any) -> int:
    if not isinstance(sample_rate, int) or isinstance(sample_rate, bool) or sample_rate < 1:
        raise ValueError(f"sample_rate={sample_rate!r}: give the samples' rate in Hz as a positive integer "
                         "(in recipes: sample_rate: ${backbone.options.sample_rate})")
    return sample_rate


def _window(seconds: float, sample_rate: int, name: str) -> int:
    n = round(seconds * sample_rate)
    if n < 1:
        raise ValueError(f"{name}={seconds}: shorter than one sample at {sample_rate} Hz; use a longer window")
    return n


def window_levels(waves: torch.Tensor, window: int, hop: int) -> torch.Tensor:
    """RMS level in dBFS of every complete window: ``[B, C, T] -> [B, N]``, ``N = 1 + (T - window) // hop``.

    The level of a window is ``10 log10(mean(x^2))`` over its ``C x window`` values (-inf for silence); a tail
    shorter than a window is left out. ``N = 0`` when ``T < window``.
    """
    b, _, t = waves.shape
    if t < window:
        return waves.new_zeros(b, 0)
    frames = waves.unfold(2, window, hop)  # [B, C, N, window]
    power = frames.pow(2).mean(dim=(1, 3))  # [B, N]
    return 10 * torch.log10(power)


def _finite(waves: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(waves).flatten(1).all(dim=1)  # [B]


class LoudnessRange:
    """Loudness range: the spread, in dB, of a clip's window levels (EBU R 128 LRA's statistic, unweighted).

    Preprocessing: levels of ``window_s``-second windows every ``hop_s`` seconds (:func:`window_levels`); windows
    at or below ``gate_db`` (absolute gate) are dropped, then, with ``relative_gate_db``, those at or below the
    power-mean level of the rest plus ``relative_gate_db``. The score is the ``high`` minus the ``low``
    percentile of the remaining levels (linear interpolation, as ``torch.quantile``). Scale: dB, >= 0; 0 for a
    steady level, e.g. 20 for a clip whose half is 20 dB quieter than the other half; EBU's defaults are 3 s windows
    every 1 s and percentiles 10 / 95. ``None`` when fewer than 2 windows pass the gates (too short or silent).

    Args:
        sample_rate: rate of the samples (Hz).
        window_s, hop_s: analysis window and hop (seconds).
        low, high: percentiles (0-100, ``low < high``).
        gate_db: absolute gate (dBFS).
        relative_gate_db: relative gate (dB below the gated power mean), or None for none.
    """

    def __init__(
        self, sample_rate: int, window_s: float = 3.0, hop_s: float = 1.0, low: float = 10.0, high: float = 95.0,
        gate_db: float = -70.0, relative_gate_db: float | None = -20.0,
    ) -> None:
        self.sample_rate = _check_rate(sample_rate)
        self.window = _window(window_s, self.sample_rate, "window_s")
        self.hop = _window(hop_s, self.sample_rate, "hop_s")
        if not 0 <= low < high <= 100:
            raise ValueError(f"low={low}, high={high}: need 0 <= low < high <= 100 (EBU: 10 and 95)")
        if relative_gate_db is not None and relative_gate_db >= 0:
            raise ValueError(f"relative_gate_db={relative_gate_db}: must be < 0 (EBU: -20), or None to disable it")
        self.low, self.high = low / 100, high / 100
        self.gate_db, self.relative_gate_db = float(gate_db), relative_gate_db

    def __call__(
        self, samples: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
    ) -> list[float | None]:
        waves = check_audio(samples)
        _check_batch(waves.shape[0], prompts, metadata)
        levels = window_levels(waves, self.window, self.hop)  # [B, N]
        finite = _finite(waves)
        scores: list[float | None] = []
        for b in range(waves.shape[0]):
            lv = levels[b][levels[b] > self.gate_db]  # [n]
            if self.relative_gate_db is not None and lv.numel():
                mean_db = 10 * torch.log10((10 ** (lv / 10)).mean())
                lv = lv[lv > mean_db + self.relative_gate_db]
            if not finite[b] or lv.numel() < 2:
                scores.append(None)
                continue
            q = torch.quantile(lv.double(), torch.tensor([self.low, self.high], dtype=torch.float64))
            scores.append(float(q[1] - q[0]))
        return scores


class SilenceRatio:
    """Fraction of a clip that is silent: of its non-overlapping ``window_s``-second windows, the share whose RMS
    level (:func:`window_levels`) is below ``threshold_db`` dBFS (a tail shorter than a window is left out).

    Scale: [0, 1], 1 for digital silence, 0 when no window is quieter than the threshold; give it a negative
    weight to penalise silence. ``None`` for a clip shorter than one window.

    Args:
        sample_rate: rate of the samples (Hz).
        window_s: window length (seconds).
        threshold_db: level below which a window counts as silent (dBFS).
    """

    def __init__(self, sample_rate: int, window_s: float = 0.05, threshold_db: float = -60.0) -> None:
        self.sample_rate = _check_rate(sample_rate)
        self.window = _window(window_s, self.sample_rate, "window_s")
        self.threshold_db = float(threshold_db)

    def __call__(
        self, samples: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
    ) -> list[float | None]:
        waves = check_audio(samples)
        _check_batch(waves.shape[0], prompts, metadata)
        levels = window_levels(waves, self.window, self.window)  # [B, N]
        if levels.shape[1] == 0:
            return [None] * waves.shape[0]
        ratio = (levels < self.threshold_db).float().mean(dim=1)  # [B]
        return [float(r) if ok else None for r, ok in zip(ratio.tolist(), _finite(waves).tolist())]


class CLAPScore:
    """CLAP text-audio similarity: ``cos(audio embedding, text embedding)`` of a transformers ``ClapModel``.

    ``model`` is a hub id or a local folder holding a ``ClapModel`` and (unless ``processor`` names another
    source) its ``ClapProcessor``; nothing runs remote code. Preprocessing: the clip is averaged to mono,
    cut to its first ``max_length_s`` seconds (10 s for LAION; the extractor itself would crop longer clips at
    random, making scores non-deterministic), resampled from ``sample_rate`` to the feature extractor's rate
    (``torchaudio.functional.resample``, 48 kHz for the LAION checkpoints) and turned into log-mel features by the
    processor (shorter clips are padded as its ``padding`` setting says, ``repeatpad`` for LAION). The prompt,
    after ``prefix``, is tokenised with padding and truncated to the text model's positions. Both embeddings are
    the projected ``get_audio_features`` / ``get_text_features`` outputs, L2-normalised.

    Scale: a cosine in [-1, 1]; matching text-audio pairs typically score about 0.2-0.6 with the LAION models,
    unrelated ones near 0.

    Args:
        sample_rate: rate of the samples (Hz).
        model: CLAP checkpoint (hub id or folder).
        processor: processor source if not ``model``.
        prefix: text put before every prompt (e.g. ``"The sound of "``).
        device: default CUDA when available, else CPU.
        dtype: the model's dtype (features are computed in float32, then cast).
        batch_size: clips (and prompts) per forward.
    """

    def __init__(
        self,
        sample_rate: int,
        model: str = "laion/clap-htsat-unfused",
        processor: str | None = None,
        prefix: str = "",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
    ) -> None:
        from transformers import ClapModel, ClapProcessor

        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.sample_rate = _check_rate(sample_rate)
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.batch_size, self.prefix = batch_size, prefix
        self.model = ClapModel.from_pretrained(model).to(self.device, self.dtype).eval().requires_grad_(False)
        self.processor = ClapProcessor.from_pretrained(processor or model)
        extractor = self.processor.feature_extractor
        self.model_rate = int(extractor.sampling_rate)
        self.max_samples = int(extractor.nb_max_samples)
        text = self.model.config.text_config
        # RoBERTa positions start after the padding index: pad_token_id + 1 of them are never used by tokens
        self.max_length = text.max_position_embeddings - (text.pad_token_id or 0) - 1

    def preprocess(self, waves: torch.Tensor) -> list[torch.Tensor]:
        """``[b, C, T]`` at :attr:`sample_rate` -> ``b`` mono float32 clips ``[T']`` at the model's rate, cut to
        its ``max_length_s`` (the input is cut first, so long clips are not resampled whole)."""
        keep = math.ceil(self.max_samples * self.sample_rate / self.model_rate)
        mono = resample(waves[..., :keep].mean(dim=1), self.sample_rate, self.model_rate)  # [b, T']
        return list(mono[:, : self.max_samples].float())

    def audio_embeds(self, waves: torch.Tensor) -> torch.Tensor:
        """``[b, D]`` L2-normalised audio embeddings of ``[b, C, T]`` clips."""
        clips = [c.numpy() for c in self.preprocess(waves)]
        feats = self.processor(audio=clips, sampling_rate=self.model_rate, return_tensors="pt")
        out = self.model.get_audio_features(input_features=feats["input_features"].to(self.device, self.dtype),
                                            is_longer=feats["is_longer"].to(self.device))
        return F.normalize(pooled(out).float(), dim=-1)

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """``[b, D]`` L2-normalised text embeddings."""
        tokens = self.processor(text=[self.prefix + p for p in prompts], padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device))
        return F.normalize(pooled(out).float(), dim=-1)

    def __call__(
        self, samples: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
    ) -> list[float | None]:
        waves = check_audio(samples)
        _check_batch(waves.shape[0], prompts, metadata)
        keep = _finite(waves).nonzero().flatten().tolist()
        if len(keep) < len(prompts):
            logger.warning("CLAPScore: %d of %d clips have non-finite values; they score None",
                           len(prompts) - len(keep), len(prompts))
        scores: list[float | None] = [None] * len(prompts)
        with torch.no_grad():
            for start in range(0, len(keep), self.batch_size):
                index = keep[start : start + self.batch_size]
                cos = (self.audio_embeds(waves[index]) * self.text_embeds([prompts[i] for i in index])).sum(-1)
                for i, v in zip(index, cos.cpu().tolist(), strict=True):
                    scores[i] = v if math.isfinite(v) else None
        return scores
