"""JPEG (in)compressibility rewards, as in DDPO (Black et al. 2023).

Preprocessing: images ``[B, 3, H, W]`` in [0, 1] are quantised to uint8 and JPEG-encoded with PIL at
``quality`` (95 by default). Output scale: the encoded size in kilobytes, negated for compressibility
(higher is smaller), positive for incompressibility. A 32 px image scores about -1 to -3.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch

from alignkit.rewards.common import to_pil


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> list[float]:
    """JPEG size of each image in kB."""
    sizes = []
    for img in to_pil(images):
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return sizes


class JpegCompressibility:
    """Reward = -(JPEG size in kB): favours images that compress well."""

    def __init__(self, quality: int = 95) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"quality={quality}: JPEG quality must be in 1..100")
        self.quality = quality

    def __call__(
        self, samples: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[float]:
        return [-s for s in jpeg_kilobytes(samples, self.quality)]


class JpegIncompressibility(JpegCompressibility):
    """Reward = JPEG size in kB: favours detailed, hard-to-compress images."""

    def __call__(
        self, samples: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[float]:
        return jpeg_kilobytes(samples, self.quality)
