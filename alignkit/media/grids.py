"""Sample grids captioned with prompt and reward: images as a grid, videos as one frame strip per sample,
waveforms (audio) as one amplitude plot per sample."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont


def save_grid(
    images: torch.Tensor,
    captions: Sequence[str],
    path: Path,
    *,
    columns: int = 4,
    cell: int = 128,
    caption_lines: int = 3,
) -> Path:
    """Write ``images`` ``[B, 3, H, W]`` in [0, 1] as a captioned PNG grid.

    Each image is scaled (nearest) to ``cell`` pixels high, keeping its aspect ratio.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"save_grid expects [B, 3, H, W] images, got {tuple(images.shape)}")
    n, _, h, w = images.shape
    cell_w = max(1, round(cell * w / h))
    rows = (n + columns - 1) // columns
    font = ImageFont.load_default()
    line_h = 11
    text_h = caption_lines * line_h + 4
    grid = Image.new("RGB", (columns * cell_w, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    wrap = max(8, cell_w // 6)
    for i in range(n):
        x, y = (i % columns) * cell_w, (i // columns) * (cell + text_h)
        grid.paste(Image.fromarray(arr[i]).resize((cell_w, cell), Image.NEAREST), (x, y))
        lines = textwrap.wrap(captions[i] if i < len(captions) else "", wrap)[:caption_lines]
        for j, line in enumerate(lines):
            draw.text((x + 2, y + cell + 2 + j * line_h), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def frame_strips(videos: torch.Tensor, max_frames: int = 8) -> torch.Tensor:
    """Videos ``[B, F, 3, H, W]`` to strips ``[B, 3, H, k W]`` of ``k = min(F, max_frames)`` evenly spaced
    frames (first and last included), side by side in time order."""
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"frame_strips expects [B, F, 3, H, W] videos, got {tuple(videos.shape)}")
    if max_frames < 1:
        raise ValueError(f"max_frames={max_frames}: must be >= 1")
    f = videos.shape[1]
    index = torch.linspace(0, f - 1, min(f, max_frames)).round().long()  # [k]
    picked = videos[:, index]  # [B, k, 3, H, W]
    return torch.cat(picked.unbind(1), dim=-1)  # [B, 3, H, k W]


def waveform_images(waves: torch.Tensor, *, height: int = 64, width: int = 256) -> torch.Tensor:
    """Waveforms ``[B, C, T]`` (float, in [-1, 1]) to amplitude plots ``[B, 3, C h, width]`` in [0, 1].

    Each channel gets a lane of ``h = max(2, height // C)`` rows, stacked top to bottom; column ``j`` covers
    samples ``[j T / width, (j + 1) T / width)`` and is drawn (dark blue on white) from their minimum to
    their maximum, +1 at the top of the lane; a grey line marks 0. Values are clamped to [-1, 1] and
    non-finite values drawn as 0.
    """
    if waves.dim() != 3 or not waves.is_floating_point():
        raise ValueError(f"waveform_images expects float waveforms [B, C, T], got {tuple(waves.shape)} {waves.dtype}")
    if height < 2 or width < 1:
        raise ValueError(f"height={height}, width={width}: need height >= 2 and width >= 1")
    x = torch.nan_to_num(waves.detach().float().cpu(), nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)
    b, c, t = x.shape
    if t == 0:
        raise ValueError(f"waveforms {tuple(waves.shape)} have no samples")
    column = torch.arange(t) * width // t  # [T] column of every sample
    index = column.expand(b, c, t)
    lo = torch.full((b, c, width), math.inf).scatter_reduce(2, index, x, "amin")  # [B, C, W]
    hi = torch.full((b, c, width), -math.inf).scatter_reduce(2, index, x, "amax")
    nearest = x[:, :, torch.arange(width) * t // width]  # [B, C, W] columns no sample falls in (T < W)
    lo, hi = torch.where(torch.isinf(lo), nearest, lo), torch.where(torch.isinf(hi), nearest, hi)
    h = max(2, height // c)
    level = 1 - 2 * (torch.arange(h).float() + 0.5) / h  # [h] amplitude at each row's centre
    half = 1.0 / h  # half a row: a flat stretch still covers one row
    on = (lo[:, :, None, :] <= level[:, None] + half) & (hi[:, :, None, :] >= level[:, None] - half)  # [B, C, h, W]
    zero = ((level - half < 0) & (level + half >= 0))[:, None].expand(h, width)  # [h, W]: the row holding 0
    colour = torch.tensor([0.1, 0.3, 0.7])[:, None, None, None]
    img = torch.ones(b, 3, c, h, width)
    img = torch.where(zero, torch.tensor(0.8), img)
    img = torch.where(on[:, None], colour, img)  # [B, 3, C, h, W]
    return img.reshape(b, 3, c * h, width)


def save_samples(
    samples: Any, captions: Sequence[str], path: Path, *, cell: int = 128, max_frames: int = 8
) -> Path | None:
    """Write image samples ``[B, 3, H, W]`` as a grid, video samples ``[B, F, 3, H, W]`` as a column of
    frame strips (one row per video) or float waveforms ``[B, C, T]`` as amplitude plots
    (:func:`waveform_images`, two per row); other samples (token ids, text) have no picture: returns None."""
    if not isinstance(samples, torch.Tensor):
        return None
    if samples.dim() == 4:
        return save_grid(samples, captions, path, cell=cell)
    if samples.dim() == 5:
        return save_grid(frame_strips(samples, max_frames), captions, path, columns=1, cell=cell)
    if samples.dim() == 3 and samples.is_floating_point():
        return save_grid(waveform_images(samples), captions, path, columns=2, cell=cell)
    return None


def save_previews_with_files(
    samples: torch.Tensor, captions: Sequence[str], path: Path, suffix: str,
    write_one: Callable[[torch.Tensor, Path], Any],
) -> Path:
    """A picture of ``samples`` at ``path`` (:func:`save_samples`) plus one media file per sample beside it.

    The folder ``path`` without its suffix gets ``000<suffix>``, ``001<suffix>``, ... written by
    ``write_one(sample, file)`` and ``index.jsonl`` (one ``{"file", "caption"}`` row per sample; shorter
    caption lists leave the rest blank). Used by adapters whose samples are more than a picture (mp4, wav).

    Returns:
        ``path``.
    """
    import json

    path = Path(path)
    save_samples(samples, captions, path)
    folder = path.with_suffix("")
    rows = []
    for i, sample in enumerate(samples):
        name = f"{i:03d}{suffix}"
        write_one(sample, folder / name)
        rows.append({"file": name, "caption": captions[i] if i < len(captions) else ""})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
