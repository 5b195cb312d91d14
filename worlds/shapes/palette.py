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

from typing import Any, ClassVar

import torch

from alignkit.modalities.discrete.mlm import OPTIONS, MaskedLMSampler
from alignkit.modalities.discrete.tiny import build_tiny_masked_lm, build_word_tokenizer
from alignkit.worlds.shapes.world import BACKGROUND, PALETTE, VOCAB_WORDS

PALETTE_RGB: dict[str, tuple[int, int, int]] = {"white": BACKGROUND, **PALETTE}
PALETTE_TOKENS: tuple[str, ...] = tuple(f"<{name}>" for name in PALETTE_RGB)
"""The image-token vocabulary, in palette order (index 0 is the background)."""


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
        b = state.shape[0]
        cells = self._rgb[state.cpu()].reshape(b, self.grid, self.grid, 3).permute(0, 3, 1, 2)  # [B, 3, g, g]
        factor = self.cfg.height // self.grid
        return cells.repeat_interleave(factor, 2).repeat_interleave(factor, 3).contiguous()


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
