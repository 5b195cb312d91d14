"""Sample pictures: image grids and video frame strips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from alignkit.media import frame_strips, save_grid, save_samples


def test_frame_strips_pick_evenly_spaced_frames_in_order() -> None:
    videos = torch.arange(10, dtype=torch.float32).view(1, 10, 1, 1, 1).expand(2, 10, 3, 4, 6) / 9  # frame i = i/9
    strips = frame_strips(videos, max_frames=4)  # frames 0, 3, 6, 9
    assert strips.shape == (2, 3, 4, 4 * 6)
    torch.testing.assert_close(strips[0, 0, 0, ::6], torch.tensor([0, 3, 6, 9]) / 9)
    assert frame_strips(videos[:, :3], max_frames=8).shape == (2, 3, 4, 3 * 6)  # fewer frames than the limit
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        frame_strips(videos[:, 0])


def test_save_samples_writes_images_and_videos(tmp_path: Path) -> None:
    images = torch.rand(3, 3, 8, 8)
    assert save_samples(images, ["a", "b", "c"], tmp_path / "img.png", cell=16) == tmp_path / "img.png"
    assert Image.open(tmp_path / "img.png").width == 4 * 16  # 4 columns of square cells
    videos = torch.rand(2, 9, 3, 8, 16)
    save_samples(videos, ["a", "b"], tmp_path / "vid.png", cell=16, max_frames=3)
    with Image.open(tmp_path / "vid.png") as im:
        assert im.width == 3 * 32  # one row per video: 3 frames of aspect 2
    assert save_samples([[1, 2, 3]], ["text"], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        save_grid(torch.rand(2, 1, 8, 8), ["a", "b"], tmp_path / "bad.png")
