"""Qwen-Image adapter over diffusers ``QwenImagePipeline`` (Qwen2.5-VL text encoder, true CFG, packed latents)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from diffusers import QwenImagePipeline

from alignkit.config import BackboneConfig, ConfigError
from alignkit.flow import randn
from alignkit.modalities.diffusers_common import (
    DiffusersFlowSampler,
    component_config,
    looks_like_hub_id,
    register_builtin,
    resolution_shift_kwargs,
)
from alignkit.types import Conditioning

logger = logging.getLogger(__name__)

#: Released Qwen-Image VAE: three spatial downsamplings (``2 ** len(temperal_downsample)`` = 8).
_QWEN_VAE_SCALE = 8
#: Latents are packed in 2 x 2 patches (``QwenImagePipeline._pack_latents``).
_PACK = 2
#: ``QwenImagePipeline`` refuses longer prompts (``check_inputs``).
MAX_SEQUENCE_LENGTH = 1024


def pixel_multiple(pretrained: str) -> int | None:
    """What height and width must be multiples of: the VAE's spatial factor x the 2 x 2 latent packing.

    The VAE factor is ``2 ** len(temperal_downsample)`` (as ``QwenImagePipeline`` computes it) from
    ``vae/config.json`` when ``pretrained`` is readable without loading; a hub id (not downloaded yet) gets the
    released VAE's 8, so 16 px. None (not known before loading) for a ``builtin:`` pipeline not built yet or a
    missing folder; every pipeline is checked again once loaded, with its own ``vae_scale_factor``.
    """
    downsample = component_config(pretrained, "vae").get("temperal_downsample")
    if downsample is not None:
        return 2 ** len(downsample) * _PACK
    return _QWEN_VAE_SCALE * _PACK if looks_like_hub_id(pretrained) else None


def _shape_problems(cfg: BackboneConfig, path: str, multiple: int | None) -> list[str]:
    problems: list[str] = []
    if multiple is None:
        return problems
    for key in ("height", "width"):
        value = getattr(cfg, key)
        if value % multiple:
            near = max(multiple, round(value / multiple) * multiple)
            problems.append(f"{path}.{key}={value}: Qwen-Image needs a multiple of {multiple} (VAE downsampling "
                            f"{multiple // _PACK} x 2x2 latent packing); use e.g. {near}")
    return problems


def _text_inputs(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(embeds [B, L', D], mask [B, L'] bool or None)`` for the transformer: the columns past the batch's
    longest prompt dropped, and no mask when every token is valid (as ``encode_prompt`` returns it).

    Text RoPE positions count from the first token, so dropping trailing padding changes no valid token's
    position: a row's velocity does not depend on which other prompts share its batch.
    """
    valid = mask.bool()
    active = valid.any(dim=0).nonzero()
    length = int(active.max()) + 1 if active.numel() else valid.shape[1]
    embeds, valid = embeds[:, :length], valid[:, :length]
    return embeds, None if bool(valid.all()) else valid


class QwenImageSampler(DiffusersFlowSampler):
    """Qwen-Image text-to-image policy (``Qwen/Qwen-Image`` and fine-tunes with the same pipeline).

    The state is the packed latent ``[B, (h/2)(w/2), 4C]`` (``h = H / vae_scale_factor``); the flow math is
    elementwise, so packing changes nothing. Conditioning (``P`` prompts), from the pipeline's own
    ``encode_prompt`` (its chat template, the template prefix dropped): ``prompt_embeds`` ``[P, L, D]`` (the
    Qwen2.5-VL text encoder's last hidden states, zero-padded to the longest prompt) and ``prompt_embeds_mask``
    ``[P, L]`` long (1 = token); with CFG (``guidance_scale > 1``) also ``negative_prompt_embeds`` ``[P, Ln, D]``
    and ``negative_prompt_embeds_mask`` ``[P, Ln]`` of ``negative_prompt``, encoded once and reused.

    Guidance is the pipeline's true CFG (``guidance_scale`` plays ``true_cfg_scale``): two forwards, conditional
    and unconditional with their own text lengths and masks, combined as ``v_u + g (v_c - v_u)`` and rescaled per
    latent token to the conditional prediction's norm. It is applied in the training forward too, so log-probs
    match the sampling policy. ``decode`` returns images ``[B, 3, H, W]`` in [0, 1] (float32) through the
    5-D causal VAE (one latent frame). Guidance-distilled transformers (``guidance_embeds``) are refused.
    """

    pipeline_class: ClassVar[type] = QwenImagePipeline

    def __init__(
        self, pipe: Any, cfg: BackboneConfig, *, step_kind: str, noise_level: float, device: torch.device
    ) -> None:
        problems = _shape_problems(cfg, "backbone", pipe.vae_scale_factor * _PACK)
        if problems:
            raise ConfigError(problems)
        if pipe.transformer.config.get("guidance_embeds", False):
            raise ValueError(
                f"backbone.pretrained={cfg.pretrained!r}: its transformer is guidance-distilled (guidance_embeds="
                "true), which QwenImagePipeline does not sample; give a Qwen-Image checkpoint without it"
            )
        self._negative: tuple[torch.Tensor, torch.Tensor] | None = None  # ([1, Ln, D], [1, Ln]) encoded once
        super().__init__(pipe, cfg, step_kind=step_kind, noise_level=noise_level, device=device)

    @classmethod
    def check_config(cls, cfg: BackboneConfig, path: str = "backbone") -> list[str]:
        problems = _shape_problems(cfg, path, pixel_multiple(cfg.pretrained))
        if cfg.max_sequence_length > MAX_SEQUENCE_LENGTH:
            problems.append(f"{path}.max_sequence_length={cfg.max_sequence_length}: QwenImagePipeline encodes at "
                            f"most {MAX_SEQUENCE_LENGTH} prompt tokens; use at most {MAX_SEQUENCE_LENGTH} (e.g. 512)")
        if cfg.options:
            problems.append(f"{path}.options has unknown keys {sorted(cfg.options)} for Qwen-Image, which takes no "
                            "options; remove them")
        return problems

    # --- shapes and schedule --------------------------------------------------------------------------

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Unpacked latent ``(h, w)``, each even (as ``QwenImagePipeline.prepare_latents``)."""
        f = self.pipe.vae_scale_factor
        return _PACK * (self.cfg.height // (f * _PACK)), _PACK * (self.cfg.width // (f * _PACK))

    @property
    def latent_channels(self) -> int:
        return self.pipe.transformer.config.in_channels // (_PACK * _PACK)

    def _schedule_kwargs(self) -> dict[str, Any]:
        h, w = self.latent_hw
        return resolution_shift_kwargs(self.pipe.scheduler.config, self.cfg.num_steps, (h // 2) * (w // 2))

    # --- Sampler interface ----------------------------------------------------------------------------

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``([P, L, D] embeddings in the transformer's dtype, [P, L] long mask)`` from ``encode_prompt``."""
        emb, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.cfg.max_sequence_length
        )
        if mask is None:  # encode_prompt drops an all-ones mask
            mask = torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)
        return emb.to(self.dtype), mask

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        emb, mask = self._encode(prompts)
        cond = {"prompt_embeds": emb, "prompt_embeds_mask": mask}
        if self.do_cfg:
            if self._negative is None:
                self._negative = self._encode([self.cfg.negative_prompt])
            nemb, nmask = self._negative
            cond["negative_prompt_embeds"] = nemb.expand(len(prompts), -1, -1)
            cond["negative_prompt_embeds_mask"] = nmask.expand(len(prompts), -1)
        return cond

    def initial_state(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """``[B, (h/2)(w/2), 4C]`` packed float32 noise: the ``[1, C, h, w]`` draw of ``prepare_latents`` per row."""
        h, w = self.latent_hw
        c, b = self.latent_channels, len(generators)
        noise = randn((b, 1, c, h, w), generators, self.device, torch.float32)
        return self.pipe._pack_latents(noise, b, c, h, w)

    def _forward(self, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, w = self.latent_hw
        emb, valid = _text_inputs(embeds, mask)
        return self.transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=emb, encoder_hidden_states_mask=valid,
            img_shapes=[[(1, h // 2, w // 2)]] * x.shape[0], return_dict=False,
        )[0]

    def velocity(self, state: torch.Tensor, step: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = state.to(self.dtype)
        t = self.model_timestep(step).to(self.dtype) / 1000
        v = self._forward(x, t, cond["prompt_embeds"], cond["prompt_embeds_mask"])
        if not self.do_cfg:
            return v
        v_neg = self._forward(x, t, cond["negative_prompt_embeds"], cond["negative_prompt_embeds_mask"])
        guided = v_neg + self.cfg.guidance_scale * (v - v_neg)  # [B, L, 4C]
        return guided * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))

    @torch.no_grad()
    def decode(self, state: torch.Tensor) -> torch.Tensor:
        """Packed latents to images ``[B, 3, H, W]`` in [0, 1] (float32), as ``QwenImagePipeline``."""
        latents = self.pipe._unpack_latents(state, self.cfg.height, self.cfg.width, self.pipe.vae_scale_factor)
        return self.vae_decode_normalized(latents)[:, :, 0]  # [B, C, 1, h, w] -> [B, 3, 1, H, W] -> one frame


@register_builtin("tiny-qwen-image")
def _tiny_qwen_image() -> QwenImagePipeline:
    """A tiny random Qwen-Image pipeline (32 px by default; any multiple of 8 px), built offline."""
    from alignkit.modalities.image.tiny import build_tiny_qwen_image_pipeline

    return build_tiny_qwen_image_pipeline(seed=0)
