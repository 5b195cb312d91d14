"""mp4 writing and reading: lossy round trips with exact frame counts and sizes, odd sizes, backends."""

from __future__ import annotations

import sys
import types
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("av")

from alignkit.media.video import (
    PyAVReader,
    VideoReader,
    default_codec,
    frames_to_uint8,
    get_reader,
    read_video,
    write_mp4,
)

# lossy codecs: mean absolute error in uint8 levels on smooth content (measured about 2-3)
MAX_MAE = 6.0


def smooth_clip(f: int = 6, h: int = 32, w: int = 48) -> torch.Tensor:
    """A moving colour gradient ``[F, 3, H, W]`` in [0, 1] (codec friendly, every frame different)."""
    t = torch.arange(f, dtype=torch.float32).view(f, 1, 1)
    y = torch.linspace(0, 1, h).view(1, h, 1)
    x = torch.linspace(0, 1, w).view(1, 1, w)
    r = (0.5 + 0.4 * torch.sin(6.0 * x + 0.5 * t)).expand(f, h, w)
    g = (0.2 + 0.6 * y).expand(f, h, w)
    b = (0.3 + 0.05 * t + 0.2 * x * y).expand(f, h, w)
    return torch.stack([r, g, b], dim=1).clamp(0, 1)


def mae(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def _codecs() -> list[str]:
    import av

    out = []
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
        except Exception:
            continue
        out.append(name)
    return out


@pytest.mark.parametrize("codec", _codecs())
def test_round_trip_float_frames(tmp_path: Path, codec: str):
    clip = smooth_clip()  # [6, 3, 32, 48]
    path = write_mp4(clip, tmp_path / "a" / "clip.mp4", fps=8, codec=codec)
    assert path.is_file()
    u8 = read_video(path)
    assert u8.dtype == torch.uint8 and tuple(u8.shape) == (6, 32, 48, 3)
    assert mae(u8, frames_to_uint8(clip)) < MAX_MAE
    fl = read_video(path, output="float")
    assert fl.dtype == torch.float32 and tuple(fl.shape) == (6, 3, 32, 48)
    assert mae(fl * 255, clip * 255) < MAX_MAE
    assert torch.equal(fl, u8.permute(0, 3, 1, 2).float() / 255)


def test_uint8_input_and_fps(tmp_path: Path):
    import av

    arr = frames_to_uint8(smooth_clip(f=5))  # [5, 32, 48, 3]
    assert arr.dtype == np.uint8 and arr.shape == (5, 32, 48, 3)
    path = write_mp4(arr, tmp_path / "u8.mp4", fps=12)
    assert mae(read_video(path), arr) < MAX_MAE
    with av.open(str(path)) as c:
        assert c.streams.video[0].average_rate == Fraction(12)
        assert c.streams.video[0].codec_context.name in ("h264", "mpeg4")
    assert default_codec() in ("libx264", "mpeg4")


def test_odd_size_is_padded_by_edge_replication(tmp_path: Path):
    clip = smooth_clip(f=4, h=33, w=17)
    out = read_video(write_mp4(clip, tmp_path / "odd.mp4"))
    assert tuple(out.shape) == (4, 34, 18, 3)
    ref = frames_to_uint8(clip)  # [4, 33, 17, 3]
    assert mae(out[:, :33, :17], ref) < MAX_MAE
    # the padding repeats the last row / column
    assert mae(out[:, 33, :17], ref[:, 32]) < 2 * MAX_MAE
    assert mae(out[:, :33, 17], ref[:, :, 16]) < 2 * MAX_MAE


def test_reader_protocol_and_errors(tmp_path: Path):
    assert isinstance(get_reader("pyav"), VideoReader)
    assert isinstance(PyAVReader(), VideoReader)
    with pytest.raises(ValueError, match="valid backends: pyav, decord"):
        get_reader("opencv")
    with pytest.raises(FileNotFoundError, match=r"missing\.mp4"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="output='tensor'"):
        read_video(tmp_path / "missing.mp4", output="tensor")
    with pytest.raises(ValueError, match=r"\[F, 3, H, W\]"):
        write_mp4(torch.rand(4, 32, 32, 3), tmp_path / "x.mp4")  # float frames must be channels-first
    with pytest.raises(ValueError, match=r"uint8 \[F, H, W, 3\]"):
        write_mp4(np.zeros((4, 3, 32, 32), dtype=np.uint8), tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="fps=0"):
        write_mp4(smooth_clip(), tmp_path / "x.mp4", fps=0)


def test_decord_missing_names_the_install_command(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord now raises ImportError
    with pytest.raises(ImportError, match="pip install decord"):
        get_reader("decord")


class _FakeDecord(types.ModuleType):
    """A stand-in for decord's API (VideoReader, cpu, get_batch().asnumpy()) decoding with PyAV."""

    def __init__(self) -> None:
        super().__init__("decord")

    @staticmethod
    def cpu(index: int) -> str:
        return f"cpu({index})"

    class VideoReader:
        def __init__(self, path: str, ctx: str) -> None:
            self.frames = PyAVReader().read(path)

        def __len__(self) -> int:
            return len(self.frames)

        def get_batch(self, indices: list[int]) -> types.SimpleNamespace:
            return types.SimpleNamespace(asnumpy=lambda: self.frames[indices])


def test_decord_adapter_with_stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The adapter code runs everywhere; the real library is tested below where it is installed."""
    monkeypatch.setitem(sys.modules, "decord", _FakeDecord())
    path = write_mp4(smooth_clip(), tmp_path / "clip.mp4", fps=8)
    assert torch.equal(read_video(path, backend="decord"), read_video(path))


def test_decord_reader_matches_pyav(tmp_path: Path):
    pytest.importorskip("decord")
    path = write_mp4(smooth_clip(), tmp_path / "clip.mp4", fps=8)
    by_decord = read_video(path, backend="decord")
    by_pyav = read_video(path, backend="pyav")
    assert by_decord.shape == by_pyav.shape
    assert mae(by_decord, by_pyav) < 2.0  # same stream; colour conversion may differ by rounding
