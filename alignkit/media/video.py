"""Reading and writing mp4 clips.

Writing (:func:`write_mp4`) uses PyAV with ``libx264`` when FFmpeg has that encoder, else ``mpeg4``; both
encode ``yuv420p``, which needs an even width and height. A clip of odd size is padded by replicating its
last row and/or column (bottom, right), so a ``[F, 3, 33, 17]`` clip reads back as ``[F, 34, 18, 3]``.
The codecs are lossy: expect a mean absolute error of a few uint8 levels, mostly from chroma subsampling.

Reading goes through a :class:`VideoReader` chosen by name: ``"pyav"`` (default) or ``"decord"``
(optional; decord is unmaintained, install it with ``pip install decord`` only if you need it).
Both libraries are imported lazily, so importing this module needs neither.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
"""A file path."""

_QP2LAMBDA = 118  # FFmpeg's FF_QP2LAMBDA: global_quality is a quantiser scale times this


def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:
        raise ImportError(
            "PyAV is needed to read and write mp4 files: pip install av (or pip install 'alignkit[video]')"
        ) from exc
    return av


def frames_to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """Normalise a clip to uint8 ``[F, H, W, 3]``.

    Args:
        frames: float ``[F, 3, H, W]`` in [0, 1] (clamped, rounded to uint8), or uint8 ``[F, H, W, 3]``;
            a torch tensor (any device) or a numpy array.

    Raises:
        ValueError: naming the accepted layouts when the shape or dtype fits neither.
    """
    if isinstance(frames, torch.Tensor):
        t = frames.detach().cpu()
        if t.is_floating_point():
            if t.dim() != 4 or t.shape[1] != 3:
                raise ValueError(f"float frames must be [F, 3, H, W] in [0, 1], got shape {tuple(t.shape)}")
            return (t.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        arr = t.numpy()
    elif isinstance(frames, np.ndarray):
        arr = frames
        if np.issubdtype(arr.dtype, np.floating):
            return frames_to_uint8(torch.from_numpy(np.ascontiguousarray(arr)))
    else:
        raise ValueError(f"frames must be a torch tensor or numpy array, got {type(frames).__name__}")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(
            f"frames of dtype {arr.dtype} and shape {tuple(arr.shape)}: pass float [F, 3, H, W] in [0, 1] "
            "or uint8 [F, H, W, 3]"
        )
    return np.ascontiguousarray(arr)


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad ``[F, H, W, 3]`` to even ``H`` and ``W`` by replicating the last row / column (yuv420p needs it)."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if not (pad_h or pad_w):
        return frames
    return np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def default_codec() -> str:
    """``"libx264"`` when the installed FFmpeg can encode it, else ``"mpeg4"``."""
    av = _import_av()
    try:
        av.codec.Codec("libx264", "w")
    except Exception:  # UnknownCodecError (a ValueError) in PyAV >= 10; be liberal across versions
        return "mpeg4"
    return "libx264"


def write_mp4(
    frames: torch.Tensor | np.ndarray,
    path: PathLike,
    fps: float = 16,
    *,
    codec: str | None = None,
    crf: int = 18,
    qscale: int = 2,
) -> Path:
    """Encode a clip as an mp4 file.

    Args:
        frames: float ``[F, 3, H, W]`` in [0, 1] or uint8 ``[F, H, W, 3]``; an odd ``H`` or ``W`` is padded
            by one replicated row / column (see the module docstring).
        path: output file; parent folders are created.
        fps: frames per second (a float is turned into a fraction, e.g. 29.97 -> 2997/100).
        codec: FFmpeg encoder name; default :func:`default_codec`.
        crf: libx264 constant rate factor (0 lossless luma .. 51; 18 is visually near-lossless).
        qscale: quantiser scale for ``mpeg4`` (1 best .. 31).

    Returns:
        The path written.
    """
    av = _import_av()
    arr = pad_to_even(frames_to_uint8(frames))  # [F, H, W, 3]
    if arr.shape[0] == 0:
        raise ValueError("frames has 0 frames; an mp4 needs at least one")
    if fps <= 0:
        raise ValueError(f"fps={fps}: must be > 0")
    codec = codec or default_codec()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = int(arr.shape[1]), int(arr.shape[2])
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        elif codec == "mpeg4":
            stream.codec_context.qscale = True  # sets AV_CODEC_FLAG_QSCALE: fixed quantiser, not bit rate
            stream.codec_context.global_quality = qscale * _QP2LAMBDA
        for a in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush delayed frames
            container.mux(packet)
    logger.debug("wrote %s: %d frames %dx%d, %s at %s fps", path, arr.shape[0], arr.shape[2], arr.shape[1], codec, rate)
    return path


def save_previews(videos: torch.Tensor, captions: Sequence[str], path: PathLike, fps: float = 16) -> Path:
    """Preview clips: frame strips at ``path`` and one mp4 per clip in a folder beside it.

    ``videos`` ``[B, F, 3, H, W]`` float in [0, 1]; ``captions`` one per clip (shorter lists leave the rest
    blank). The strips go through :func:`alignkit.media.save_samples`; the folder ``path`` without its
    suffix gets ``000.mp4``, ``001.mp4``, ... (:func:`write_mp4` at ``fps``) and ``index.jsonl`` (one
    ``{"file", "caption"}`` row per clip).

    Returns:
        ``path``.

    Raises:
        ValueError: when ``videos`` is not a float ``[B, F, 3, H, W]`` tensor.
    """
    from alignkit.media import save_previews_with_files

    if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[2] != 3 \
            or not videos.is_floating_point():
        got = tuple(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"video previews need float clips [B, F, 3, H, W] in [0, 1], got {got}")
    return save_previews_with_files(videos, captions, Path(path), ".mp4",
                                    lambda clip, file: write_mp4(clip, file, fps))


@runtime_checkable
class VideoReader(Protocol):
    """Reads a whole video file."""

    def read(self, path: PathLike) -> np.ndarray:
        """All frames as uint8 ``[F, H, W, 3]`` RGB."""
        ...


def _check_file(path: PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no video file at {str(p)!r}")
    return p


def _stack(frames: list[np.ndarray], path: Path) -> np.ndarray:
    if not frames:
        raise ValueError(f"{str(path)!r} has no decodable video frames")
    return np.stack(frames)


class PyAVReader:
    """Decodes every frame of the first video stream with PyAV (FFmpeg)."""

    def __init__(self) -> None:
        self._av = _import_av()

    def read(self, path: PathLike) -> np.ndarray:
        p = _check_file(path)
        with self._av.open(str(p)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        return _stack(frames, p)


class DecordReader:
    """Decodes every frame with decord (optional, unmaintained; ``pip install decord``)."""

    def __init__(self) -> None:
        try:
            import decord
        except ImportError as exc:
            raise ImportError(
                "backend='decord' needs decord, which is not installed: pip install decord "
                "(or use the default backend='pyav')"
            ) from exc
        self._decord = decord

    def read(self, path: PathLike) -> np.ndarray:
        p = _check_file(path)
        vr = self._decord.VideoReader(str(p), ctx=self._decord.cpu(0))
        if len(vr) == 0:
            raise ValueError(f"{str(p)!r} has no decodable video frames")
        return np.ascontiguousarray(vr.get_batch(list(range(len(vr)))).asnumpy())


READERS: dict[str, Callable[[], VideoReader]] = {"pyav": PyAVReader, "decord": DecordReader}
"""Reader backends by name."""


def get_reader(backend: str = "pyav") -> VideoReader:
    """The reader for ``backend`` (one of :data:`READERS`)."""
    if backend not in READERS:
        raise ValueError(f"unknown video backend {backend!r}; valid backends: {', '.join(READERS)}")
    return READERS[backend]()


def read_video(path: PathLike, backend: str = "pyav", output: str = "uint8") -> torch.Tensor:
    """Read a whole video file.

    Args:
        path: the file.
        backend: ``"pyav"`` (default) or ``"decord"``.
        output: ``"uint8"`` for uint8 ``[F, H, W, 3]``, or ``"float"`` for float32 ``[F, 3, H, W]`` in
            [0, 1] (the layout of decoded samples and of :func:`write_mp4`'s float input).
    """
    if output not in ("uint8", "float"):
        raise ValueError(f"output={output!r}: use 'uint8' ([F, H, W, 3]) or 'float' ([F, 3, H, W] in [0, 1])")
    frames = torch.from_numpy(get_reader(backend).read(path))  # [F, H, W, 3] uint8
    if output == "uint8":
        return frames
    return frames.permute(0, 3, 1, 2).float().div(255.0).contiguous()  # [F, 3, H, W]
