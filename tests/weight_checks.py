"""Checks shared by the backbone training tests: LoRA tensors move, frozen weights do not."""

from __future__ import annotations

import re
from typing import Any

import torch


def plain_lora_name(name: str) -> str:
    """Parameter name without peft's adapter-name segment (``default``, ``default_0``)."""
    return re.sub(r"\.default(_\d+)?\.", ".", name)


def ema_lora_tensors(trainer: Any) -> dict[str, torch.Tensor]:
    """A trainer's EMA weights of its LoRA tensors by plain name (what a checkpoint's ``trainable/`` holds)."""
    assert trainer.ema is not None, "the run trains without EMA"
    named = [n for n, p in trainer.sampler.trainable_module().named_parameters() if p.requires_grad]
    return {plain_lora_name(n): s for n, s in zip(named, trainer.ema.shadow, strict=True) if "lora_" in n}


def lora_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of ``module``'s LoRA tensors by name."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


class WeightWatch:
    """Copies of a pipeline's LoRA weights (in ``pipe.transformer``) and frozen weights (every non-LoRA
    parameter of ``components``), taken before training; :meth:`assert_trained` checks them after it."""

    def __init__(self, pipe: Any, components: tuple[str, ...] = ("transformer", "vae", "text_encoder")) -> None:
        self.pipe, self.components = pipe, components
        self.lora = lora_tensors(pipe.transformer)
        self.frozen = self._frozen()
        assert self.lora and self.frozen

    def _frozen(self) -> dict[str, torch.Tensor]:
        return {f"{c}.{n}": p.detach().clone() for c in self.components
                for n, p in getattr(self.pipe, c).named_parameters() if "lora_" not in n}

    def assert_trained(self) -> dict[str, torch.Tensor]:
        """Every LoRA tensor changed and no frozen weight did; returns the trained LoRA tensors."""
        lora = lora_tensors(self.pipe.transformer)
        assert not [n for n in self.lora if torch.equal(self.lora[n], lora[n])], "some LoRA tensors did not train"
        frozen = self._frozen()
        assert all(torch.equal(self.frozen[n], frozen[n]) for n in self.frozen), "base weights changed"
        return lora
