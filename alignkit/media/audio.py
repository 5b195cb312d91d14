"""Reading and writing wav files, resampling, and audio sample previews.

Wav files are integer PCM, written and read with the standard library's ``wave`` module: torchaudio 2.9+ routes
``torchaudio.save`` / ``torchaudio.load`` through TorchCodec (FFmpeg), which alignkit does not depend on, and PCM
wav needs neither. Floats map to integers as ``round(x * 2^(b-1))`` clamped to the integer range (``b`` bits;
8-bit wav is unsigned with offset 128) and back as ``n / 2^(b-1)``, so a round trip is exact to within
``1 / 2^(b-1)`` (``3.1e-5`` at 16 bits) and +1.0 reads back as ``1 - 2^(1-b)``. IEEE-float wav files (format 3)
are not readable by ``wave``: convert them to PCM first.

:func:`resample` uses ``torchaudio.functional.resample`` (pure torch, no backend needed); torchaudio is imported
inside the function, so importing this module does not need it (``pip install 'alignkit[audio]'``).
"""

from __future__ import annotations

import logging
import os
import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
"""A file path."""

SAMPLE_WIDTHS = (1, 2, 3, 4)
"""Bytes per sample :func:`write_wav` writes and :func:`read_wav` reads (8-, 16-, 24- and 32-bit PCM)."""


def check_waveform(wave_: torch.Tensor | np.ndarray) -> torch.Tensor:
    """One clip as float32 ``[C, T]`` on the CPU; a 1-D ``[T]`` array is one channel.

    Raises:
        ValueError: for other shapes, non-float values, zero channels or zero samples.
    """
    t = torch.as_tensor(wave_).detach().cpu()
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"a waveform must be float [C, T] (or [T]) in [-1, 1], got shape {tuple(t.shape)} {t.dtype}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"waveform of shape {tuple(t.shape)} is empty: need >= 1 channel and >= 1 sample")
    return t.float()


def write_wav(
    waveform: torch.Tensor | np.ndarray, path: PathLike, sample_rate: int, *, sample_width: int = 2
) -> Path:
    """Write a clip as an integer-PCM wav file.

    Args:
        waveform: float ``[C, T]`` (or ``[T]``) in [-1, 1]; values outside are clipped, NaN is written as 0.
        path: output file; parent folders are created.
        sample_rate: samples per second (Hz), >= 1.
        sample_width: bytes per sample, one of :data:`SAMPLE_WIDTHS` (2: 16-bit, the CD format).

    Returns:
        The path written.
    """
    if sample_width not in SAMPLE_WIDTHS:
        raise ValueError(f"sample_width={sample_width}: use one of {SAMPLE_WIDTHS} bytes (2 = 16-bit PCM)")
    if not isinstance(sample_rate, int) or sample_rate < 1:
        raise ValueError(f"sample_rate={sample_rate!r}: give the rate in Hz as a positive integer")
    x = torch.nan_to_num(check_waveform(waveform), nan=0.0).double()  # [C, T]
    scale = 2 ** (8 * sample_width - 1)
    ints = (x * scale).round().clamp(-scale, scale - 1).to(torch.int64).T.contiguous().numpy()  # [T, C] interleaved
    if sample_width == 1:
        data = (ints + 128).astype(np.uint8).tobytes()
    elif sample_width == 3:
        data = ints.astype("<i4").view(np.uint8).reshape(-1, 4)[:, :3].tobytes()  # low 3 bytes, little-endian
    else:
        data = ints.astype(f"<i{sample_width}").tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as f:
        f.setnchannels(int(x.shape[0]))
        f.setsampwidth(sample_width)
        f.setframerate(sample_rate)
        f.writeframes(data)
    logger.debug("wrote %s: %d channels x %d samples at %d Hz, %d-bit", path, x.shape[0], x.shape[1], sample_rate,
                 8 * sample_width)
    return path


def read_wav(path: PathLike) -> tuple[torch.Tensor, int]:
    """Read an integer-PCM wav file.

    Returns:
        ``(waveform, sample_rate)``: float32 ``[C, T]`` in [-1, 1) and the rate in Hz.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a PCM wav file (e.g. IEEE float or compressed), naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no wav file at {str(p)!r}")
    try:
        with wave.open(str(p), "rb") as f:
            channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
            data = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{str(p)!r} is not an integer-PCM wav file ({exc}); convert it to 16-bit PCM wav") from exc
    if width == 1:
        ints = np.frombuffer(data, dtype=np.uint8).astype(np.int64) - 128
    elif width == 3:
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3).astype(np.int64)
        ints = raw[:, 0] | (raw[:, 1] << 8) | (raw[:, 2] << 16)
        ints = np.where(ints >= 2**23, ints - 2**24, ints)  # sign-extend 24-bit
    else:
        ints = np.frombuffer(data, dtype=f"<i{width}").astype(np.int64)
    frames = ints.reshape(-1, channels).T  # [C, T]
    return torch.from_numpy(frames / 2 ** (8 * width - 1)).float(), rate


def resample(waveform: torch.Tensor, orig_rate: int, new_rate: int) -> torch.Tensor:
    """``[..., T]`` float waveforms from ``orig_rate`` to ``new_rate`` Hz (``torchaudio.functional.resample``:
    windowed-sinc band-limited interpolation, ``ceil(T * new / orig)`` samples out); unchanged when the rates match.
    """
    if orig_rate == new_rate:
        return waveform
    try:
        import torchaudio.functional as taf
    except ImportError as exc:
        raise ImportError(
            f"resampling {orig_rate} Hz -> {new_rate} Hz needs torchaudio: pip install 'alignkit[audio]'"
        ) from exc
    return taf.resample(waveform, int(orig_rate), int(new_rate))


def save_previews(samples: Any, captions: Sequence[str], path: PathLike, sample_rate: int) -> Path:
    """Preview audio samples: amplitude plots at ``path`` and one 16-bit wav per sample in a folder beside it.

    ``samples`` ``[B, C, T]`` float in [-1, 1]; ``captions`` one per sample (shorter lists leave the rest blank).
    The plots go through :func:`alignkit.media.save_samples`; the folder ``path`` without its suffix gets
    ``000.wav``, ``001.wav``, ... and ``index.jsonl`` (one ``{"file", "caption"}`` row per wav).

    Returns:
        ``path``.
    """
    from alignkit.media import save_previews_with_files

    if not isinstance(samples, torch.Tensor) or samples.dim() != 3 or not samples.is_floating_point():
        got = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        raise ValueError(f"audio previews need float waveforms [B, C, T], got {got}")
    return save_previews_with_files(samples, captions, Path(path), ".wav",
                                    lambda clip, file: write_wav(clip, file, sample_rate))
