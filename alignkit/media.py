"""Sample grids captioned with prompt and reward."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

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
    """Write ``images`` ``[B, 3, H, W]`` in [0, 1] as a captioned PNG grid (nearest upscaling to ``cell``)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"save_grid expects [B, 3, H, W] images, got {tuple(images.shape)}")
    n = images.shape[0]
    rows = (n + columns - 1) // columns
    font = ImageFont.load_default()
    line_h = 11
    text_h = caption_lines * line_h + 4
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    wrap = max(8, cell // 6)
    for i in range(n):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_h)
        grid.paste(Image.fromarray(arr[i]).resize((cell, cell), Image.NEAREST), (x, y))
        lines = textwrap.wrap(captions[i] if i < len(captions) else "", wrap)[:caption_lines]
        for j, line in enumerate(lines):
            draw.text((x + 2, y + cell + 2 + j * line_h), line, fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
