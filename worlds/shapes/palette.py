"""Image tokens of the shapes world: a masked LM whose generated positions are palette colours of a grid.

Each of the ``grid x grid`` generated positions is one cell of the image and takes one of the palette
tokens ``<white> <red> <green> <blue> <yellow>`` (the shapes world's background and colours,
:mod:`alignkit.worlds.shapes.world`); no other token can be revealed there. Decoding maps tokens to RGB and
upsamples each cell to a square of ``backbone.height / grid`` pixels, giving images ``[B, 3, H, W]`` in
[0, 1] that image rewards such as ShapeEval score. The caption is the prompt prefix (word-level tokens),
never masked. Everything else (schedule, reveal rule, log-probs, scales, LoRA, checkpoints) is
:class:`~alignkit.modalities.discrete.mlm.MaskedLMSampler`'s.

Backbone options: ``grid`` (cells per side, default 8; ``G = grid^2``), ``scale``, ``schedule``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch

from alignkit.modalities.discrete.mlm import OPTIONS, MaskedLMSampler
from alignkit.modalities.discrete.tiny import build_tiny_masked_lm, build_word_tokenizer
from alignkit.worlds.common import shipped_folder
from alignkit.worlds.shapes.world import BACKGROUND, PALETTE, VOCAB_WORDS

PALETTE_RGB: dict[str, tuple[int, int, int]] = {"white": BACKGROUND, **PALETTE}
PALETTE_TOKENS: tuple[str, ...] = tuple(f"<{name}>" for name in PALETTE_RGB)
"""The image-token vocabulary, in palette order (index 0 is the background)."""
WEIGHTS_DIR = Path(__file__).parent / "palette_weights"
"""The shipped pretrained palette-token masked LM (``save_pretrained`` layout, safetensors)."""


def cell_images(cells: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """Images ``[B, 3, size, size]`` of cell colours ``[B, grid * grid, 3]`` (row-major), each cell a square of
    ``size / grid`` pixels."""
    b = cells.shape[0]
    factor = size // grid
    square = cells.reshape(b, grid, grid, 3).permute(0, 3, 1, 2)  # [B, 3, g, g]
    return square.repeat_interleave(factor, 2).repeat_interleave(factor, 3).contiguous()


def image_tokens(images: torch.Tensor, grid: int) -> torch.Tensor:
    """Palette indices ``[B, grid * grid]`` (row-major; 0 is the background) of renders ``[B, 3, H, W]`` in [0, 1].

    Every pixel is snapped to its nearest palette colour (L1 distance). A cell is coloured when at least half
    of its pixels are: with the colour most of its pixels have (ties to the earlier palette colour); otherwise
    it is background. ``H`` and ``W`` must be multiples of ``grid``.
    """
    b, _, h, w = images.shape
    if h % grid or w % grid:
        raise ValueError(f"grid={grid}: the image side ({h} x {w}) must be a multiple of the grid")
    palette = torch.tensor(list(PALETTE_RGB.values()), dtype=images.dtype) / 255.0  # [P, 3]
    nearest = (images.permute(0, 2, 3, 1)[..., None, :] - palette).abs().sum(-1).argmin(-1)  # [B, H, W]
    fh, fw = h // grid, w // grid
    cells = nearest.reshape(b, grid, fh, grid, fw).permute(0, 1, 3, 2, 4).reshape(b, grid * grid, fh * fw)
    counts = torch.nn.functional.one_hot(cells, len(palette)).sum(-2)  # [B, G, P]
    coloured = counts[..., 1:]
    colour = coloured.argmax(-1) + 1
    return torch.where(2 * coloured.sum(-1) >= fh * fw, colour, torch.zeros_like(colour))


class MaskedPaletteSampler(MaskedLMSampler):
    """A masked LM generating a ``grid x grid`` palette image after the caption; samples are images."""

    modality: ClassVar[str] = "image"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: Any, **kwargs: Any) -> None:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in PALETTE_TOKENS]
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError(f"backbone.pretrained={cfg.pretrained!r}: the tokenizer lacks the palette tokens "
                             f"{list(PALETTE_TOKENS)}; build it with build_palette_tokenizer (this module)")
        self.palette_ids = ids
        super().__init__(model, tokenizer, cfg, **kwargs)
        self.grid = int(cfg.options.get("grid", 8))
        if cfg.height % self.grid or cfg.width != cfg.height:
            raise ValueError(f"backbone.height={cfg.height}, backbone.width={cfg.width}: use a square image whose side "
                             f"is a multiple of backbone.options.grid={self.grid}")
        rgb = torch.zeros(len(tokenizer), 3)
        for token_id, color in zip(ids, PALETTE_RGB.values()):
            rgb[token_id] = torch.tensor(color, dtype=torch.float32) / 255.0
        self._rgb = rgb  # [V, 3]; non-palette tokens (never revealed) would decode black

    @classmethod
    def options_defaults(cls) -> dict[str, Any]:
        return {**{k: v for k, v in OPTIONS.items() if k != "gen_length"}, "grid": 8}

    @classmethod
    def generated_length(cls, options: dict[str, Any], path: str = "backbone") -> tuple[int | None, list[str]]:
        grid = options["grid"]
        if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
            return None, [f"{path}.options.grid={grid!r}: give the cells per image side, an int >= 1 (e.g. 8)"]
        return grid * grid, []

    def forbidden_ids(self, tokenizer: Any, options: dict[str, Any]) -> list[int]:
        """Every token but the palette tokens."""
        allowed = set(self.palette_ids)
        return [i for i in range(len(tokenizer)) if i not in allowed]

    def decode(self, state: torch.Tensor) -> torch.Tensor:
        """``[B, G]`` tokens to images ``[B, 3, H, W]`` in [0, 1] (each cell a ``H / grid`` px square)."""
        return cell_images(self._rgb[state.cpu()], self.grid, self.cfg.height)


def build_palette_tokenizer() -> Any:
    """Caption words of the shapes world plus the palette tokens, built in-process."""
    return build_word_tokenizer(list(VOCAB_WORDS), PALETTE_TOKENS)


def build_tiny_palette_model(grid: int = 8, *, caption_length: int = 8, seed: int = 0, hidden: int = 32,
                             layers: int = 1) -> tuple[torch.nn.Module, Any]:
    """A tiny random palette-token masked LM and its tokenizer (tests, demos)."""
    tokenizer = build_palette_tokenizer()
    model = build_tiny_masked_lm(tokenizer, hidden=hidden, layers=layers, heads=max(1, hidden // 16),
                                 max_positions=caption_length + grid * grid, seed=seed)
    return model, tokenizer


def shipped_weights() -> Path:
    """The pretrained palette-token masked LM shipped with the package.

    Raises:
        FileNotFoundError: naming the pretraining command when the folder is missing.
    """
    return shipped_folder(WEIGHTS_DIR, "config.json", "shapes-world palette-token masked LM",
                          "python -m alignkit.worlds.shapes.palette_pretrain")
