"""One media file per sample, named by the caller: the held-out records of a run (``eval/<name>/``).

Images ``[B, 3, H, W]`` in [0, 1] become PNG files, videos ``[B, F, 3, H, W]`` mp4 clips (:func:`alignkit.media.
video.write_mp4`, PyAV), float waveforms ``[B, C, T]`` 16-bit wav files (:func:`alignkit.media.audio.write_wav`).
Text samples (a list of strings) and token ids have no file: the caller keeps them in its rows
(:func:`sample_text`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

__all__ = ["MEDIA_SUFFIXES", "sample_kind", "sample_text", "write_sample_files"]

MEDIA_SUFFIXES: dict[str, str] = {"image": ".png", "video": ".mp4", "audio": ".wav"}
"""File suffix of each sample kind that has a file."""


def sample_kind(samples: Any) -> str:
    """``image``, ``video``, ``audio``, ``text`` (a list of strings) or ``tokens`` (anything else: token ids)."""
    if isinstance(samples, torch.Tensor):
        if samples.dim() == 4 and samples.shape[1] == 3 and samples.is_floating_point():
            return "image"
        if samples.dim() == 5 and samples.shape[2] == 3 and samples.is_floating_point():
            return "video"
        if samples.dim() == 3 and samples.is_floating_point():
            return "audio"
        return "tokens"
    if isinstance(samples, (list, tuple)) and all(isinstance(s, str) for s in samples):
        return "text"
    return "tokens"


def sample_text(samples: Any, i: int) -> str | None:
    """Sample ``i`` as text when it has no media file: the string itself, or its token ids written out."""
    kind = sample_kind(samples)
    if kind == "text":
        return str(samples[i])
    if kind == "tokens":
        row = samples[i]
        return " ".join(str(int(t)) for t in row.flatten().tolist()) if isinstance(row, torch.Tensor) else str(row)
    return None


def write_sample_files(samples: Any, folder: Path, stems: Sequence[str], *, fps: float = 16,
                       sample_rate: int | None = None) -> list[str | None]:
    """Write sample ``i`` to ``folder/<stems[i]><suffix>``; returns each file's name (None where the samples have
    no file: text, token ids).

    Args:
        samples: ``[B, ...]`` decoded samples (see the module docstring) or a list of strings.
        stems: one file name without suffix per sample.
        fps: frames per second of video clips.
        sample_rate: Hz of audio samples (required for waveforms).

    Raises:
        ValueError: ``stems`` does not match the samples, or audio without ``sample_rate``.
    """
    n = len(samples)
    if len(stems) != n:
        raise ValueError(f"{len(stems)} file names for {n} samples")
    kind = sample_kind(samples)
    if kind not in MEDIA_SUFFIXES:
        return [None] * n
    if kind == "audio" and sample_rate is None:
        raise ValueError("waveform samples [B, C, T] need the sampler's sample_rate to be written as wav")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = MEDIA_SUFFIXES[kind]
    names = [f"{stem}{suffix}" for stem in stems]
    x = samples.detach().float().cpu()
    for i, name in enumerate(names):
        path = folder / name
        if kind == "image":
            arr = (x[i].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(path)
        elif kind == "video":
            from alignkit.media.video import write_mp4

            write_mp4(x[i], path, fps)
        else:
            from alignkit.media.audio import write_wav

            write_wav(x[i], path, int(sample_rate))
    return list(names)
