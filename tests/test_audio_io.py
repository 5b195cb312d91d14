"""wav writing and reading (exact integer PCM, hand-checked bytes), resampling, amplitude plots and audio previews."""

from __future__ import annotations

import ast
import json
import math
import struct
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from alignkit.media import save_samples, waveform_images
from alignkit.media.audio import read_wav, resample, save_previews, write_wav


def _sine(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(round(rate * seconds), dtype=torch.float64) / rate
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()


@pytest.mark.parametrize("width", [1, 2, 3, 4])
def test_round_trip_is_exact_to_one_quantisation_step(tmp_path: Path, width: int) -> None:
    g = torch.Generator().manual_seed(0)
    clip = torch.rand(2, 257, generator=g) * 2 - 1  # [C, T] in [-1, 1)
    path = write_wav(clip, tmp_path / "sub" / "a.wav", 22050, sample_width=width)
    back, rate = read_wav(path)
    assert rate == 22050 and back.shape == (2, 257) and back.dtype == torch.float32
    step = 1 / 2 ** (8 * width - 1)
    assert float((back - clip).abs().max()) <= max(step, 1e-7)
    with wave.open(str(path)) as f:
        assert (f.getnchannels(), f.getsampwidth(), f.getnframes()) == (2, width, 257)


def test_pcm_values_are_the_hand_computed_integers(tmp_path: Path) -> None:
    """16-bit: x -> round(32768 x) clamped to [-32768, 32767], channels interleaved; read back as n / 32768."""
    clip = torch.tensor([[0.5, -1.0, 1.0, 0.25], [-0.5, 0.0, 2.0, float("nan")]])
    path = write_wav(clip, tmp_path / "x.wav", 8000)
    with wave.open(str(path)) as f:
        ints = struct.unpack("<8h", f.readframes(4))
    assert ints == (16384, -16384, -32768, 0, 32767, 32767, 8192, 0)  # +1.0 and 2.0 clip, NaN -> 0
    back, _ = read_wav(path)
    torch.testing.assert_close(back, torch.tensor([[0.5, -1.0, 32767 / 32768, 0.25], [-0.5, 0.0, 32767 / 32768, 0.0]]))
    # 24-bit: -1 / 2^23 is 0xFFFFFF, little-endian, sign-extended on reading
    path24 = write_wav(torch.tensor([-(2.0**-23), 0.75]), tmp_path / "y.wav", 8000, sample_width=3)
    with wave.open(str(path24)) as f:
        assert f.readframes(2) == bytes([0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x60])
    back24, _ = read_wav(path24)
    torch.testing.assert_close(back24, torch.tensor([[-(2.0**-23), 0.75]]))


def test_mono_and_numpy_inputs(tmp_path: Path) -> None:
    mono = np.linspace(-0.5, 0.5, 11, dtype=np.float32)  # [T]
    back, rate = read_wav(write_wav(mono, tmp_path / "m.wav", 16000))
    assert rate == 16000 and back.shape == (1, 11)
    torch.testing.assert_close(back[0], torch.from_numpy(mono), rtol=0, atol=1 / 32768)


def test_bad_inputs_and_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"float \[C, T\]"):
        write_wav(torch.zeros(1, 2, 3), tmp_path / "x.wav", 8000)
    with pytest.raises(ValueError, match="float"):
        write_wav(torch.zeros(2, 8, dtype=torch.int16), tmp_path / "x.wav", 8000)
    with pytest.raises(ValueError, match="empty"):
        write_wav(torch.zeros(2, 0), tmp_path / "x.wav", 8000)
    with pytest.raises(ValueError, match="sample_width=5"):
        write_wav(torch.zeros(1, 8), tmp_path / "x.wav", 8000, sample_width=5)
    with pytest.raises(ValueError, match="sample_rate=0"):
        write_wav(torch.zeros(1, 8), tmp_path / "x.wav", 0)
    with pytest.raises(FileNotFoundError, match="no wav file"):
        read_wav(tmp_path / "absent.wav")
    (tmp_path / "text.wav").write_text("not audio")
    with pytest.raises(ValueError, match="not an integer-PCM wav"):
        read_wav(tmp_path / "text.wav")
    # an IEEE-float wav (format 3): RIFF header, fmt chunk, one float32 sample
    fmt = struct.pack("<HHIIHH", 3, 1, 8000, 32000, 4, 32)
    data = struct.pack("<f", 0.5)
    riff = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    (tmp_path / "float.wav").write_bytes(b"RIFF" + struct.pack("<I", len(riff)) + riff)
    with pytest.raises(ValueError, match="convert it to 16-bit PCM"):
        read_wav(tmp_path / "float.wav")


def test_resample_keeps_the_tone_and_the_duration() -> None:
    tone = _sine(440.0, 8000, 0.25)[None]  # [1, 2000]
    up = resample(tone, 8000, 22050)
    assert up.shape == (1, math.ceil(2000 * 22050 / 8000))
    t = torch.arange(up.shape[1], dtype=torch.float64) / 22050
    expected = (0.5 * torch.sin(2 * math.pi * 440.0 * t)).float()
    interior = slice(200, -200)  # away from the windowed-sinc filter's edges
    assert float((up[0, interior] - expected[interior]).abs().max()) < 5e-3
    assert resample(tone, 8000, 8000) is tone


def _torchaudio_imports(path: Path) -> tuple[list[int], list[int]]:
    """Line numbers of ``torchaudio`` imports at module level and inside functions."""
    tree = ast.parse(path.read_text())
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}
    top, inner = [], []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(n.split(".")[0] == "torchaudio" for n in names):
            (inner if id(node) in nested else top).append(node.lineno)
    return top, inner


def test_torchaudio_is_imported_lazily_and_only_by_the_audio_media_module() -> None:
    root = Path(__file__).resolve().parents[1]
    users = {}
    for package in ("alignkit", "modalities", "rewards", "worlds"):
        for path in sorted((root / package).rglob("*.py")):
            top, inner = _torchaudio_imports(path)
            assert not top, f"{path.relative_to(root)} imports torchaudio at module level (lines {top})"
            if inner:
                users[path.relative_to(root).as_posix()] = inner
    assert list(users) == ["alignkit/media/audio.py"], users


def test_waveform_images_draw_each_channel_in_its_lane() -> None:
    """Channel 0 at +1 lights the top row of its lane, channel 1 at -1 the bottom row of its lane; 0 draws grey."""
    waves = torch.stack([torch.ones(100), -torch.ones(100)])[None]  # [1, 2, 100]
    img = waveform_images(waves, height=8, width=10)
    assert img.shape == (1, 3, 8, 10) and img.min() >= 0 and img.max() <= 1
    dark = img[0, 0] < 0.5  # [8, 10]: drawn pixels are dark blue (red 0.1)
    assert dark[0].all() and not dark[1:4].any()  # lane 0 (rows 0-3): only its top row
    assert dark[7].all() and not dark[4:7].any()  # lane 1 (rows 4-7): only its bottom row
    grey = ((img[0] - 0.8).abs() < 1e-6).all(dim=0)  # [8, 10]
    assert grey[2].all() and grey[6].all() and grey.sum() == 20  # the 0 row of each lane (levels +-0.25 around it)
    silence = waveform_images(torch.zeros(1, 1, 50), height=4, width=5)  # row levels 0.75, 0.25, -0.25, -0.75
    assert torch.equal((silence[0, 0] < 0.5).any(dim=1), torch.tensor([False, True, True, False]))
    # fewer samples than columns: every column shows its nearest sample
    short = waveform_images(torch.tensor([[[1.0, -1.0]]]), height=4, width=6)
    assert (short[0, 0, 0, :3] < 0.5).all() and (short[0, 0, 3, 3:] < 0.5).all()
    with pytest.raises(ValueError, match=r"\[B, C, T\]"):
        waveform_images(torch.zeros(2, 100))


def test_save_samples_plots_waveforms_and_previews_write_wavs(tmp_path: Path) -> None:
    waves = torch.stack([torch.stack([_sine(300.0, 8000, 0.1), _sine(500.0, 8000, 0.1)]) for _ in range(3)])
    assert save_samples(waves, ["a", "b", "c"], tmp_path / "plot.png", cell=16) == tmp_path / "plot.png"
    assert save_samples(torch.zeros(2, 3, 4, dtype=torch.long), ["x"], tmp_path / "ids.png") is None  # not audio

    path = save_previews(waves, ["a | r=1", "b"], tmp_path / "samples" / "epoch_00003.png", 8000)
    assert path.is_file()
    folder = tmp_path / "samples" / "epoch_00003"
    assert sorted(p.name for p in folder.iterdir()) == ["000.wav", "001.wav", "002.wav", "index.jsonl"]
    rows = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
    assert rows == [{"file": "000.wav", "caption": "a | r=1"}, {"file": "001.wav", "caption": "b"},
                    {"file": "002.wav", "caption": ""}]
    back, rate = read_wav(folder / "002.wav")
    assert rate == 8000
    torch.testing.assert_close(back, waves[2], rtol=0, atol=1 / 32768)
    with pytest.raises(ValueError, match=r"\[B, C, T\]"):
        save_previews(torch.zeros(2, 100), ["a"], tmp_path / "x.png", 8000)
