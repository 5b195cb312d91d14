"""Conversions shared by reward plug-ins: sample tensors to PIL images, uint8 arrays and frame lists."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate ``[B, 3, H, W]`` float images in [0, 1]; returns them detached, float32, on CPU."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"expected images of shape [B, 3, H, W] in [0, 1], got {shape}")
    return images.detach().float().cpu()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` float in [0, 1] to ``[B, H, W, 3]`` uint8 (clamped, rounded)."""
    x = check_images(images)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` float in [0, 1] to PIL RGB images (uint8 rounding)."""
    return [Image.fromarray(a) for a in to_uint8(images)]
