"""Wan2.1 / Wan2.2 text-to-video adapter over diffusers ``WanPipeline``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from alignkit.config import BackboneConfig, ConfigError
from alignkit.modalities.diffusers_common import (
    DiffusersFlowSampler,
    component_config,
    register_builtin,
)
from alignkit.types import Conditioning

logger = logging.getLogger(__name__)

OPTIONS = ("flow_shift",)
"""Valid ``backbone.options`` keys: ``flow_shift`` overrides the schedule shift of the checkpoint's scheduler."""

# Every released Wan VAE compresses time 4x; Wan2.1 and Wan2.2-A14B compress space 8x and patchify 2x2. These
# are AutoencoderKLWan's config defaults too (scale_factor_temporal / scale_factor_spatial).
_WAN_TEMPORAL, _WAN_SPATIAL, _WAN_PATCH = 4, 8, 2


def compression(pretrained: str) -> tuple[int, int]:
    """``(temporal factor, spatial multiple)`` that ``num_frames - 1`` and height / width must be multiples of.

    Read from the pipeline folder's ``vae/config.json`` (``scale_factor_temporal``, ``scale_factor_spatial``)
    and ``transformer/config.json`` (``patch_size``) when ``pretrained`` is a local folder or a shipped or
    already built ``builtin:`` pipeline; a hub id (not downloaded yet) gets the released Wan values (4, 8 x 2),
    and every pipeline is checked again with its loaded VAE (``WanPipeline.vae_scale_factor_*``).
    """
    vae = component_config(pretrained, "vae")
    transformer = component_config(pretrained, "transformer")
    temporal = vae.get("scale_factor_temporal") or _WAN_TEMPORAL
    spatial = vae.get("scale_factor_spatial") or _WAN_SPATIAL
    patch = transformer.get("patch_size") or (1, _WAN_PATCH, _WAN_PATCH)
    return int(temporal), int(spatial) * max(int(patch[1]), int(patch[2]))


def _shape_problems(cfg: BackboneConfig, path: str, temporal: int, spatial_multiple: int) -> list[str]:
    problems = []
    if cfg.num_frames < 1 or (cfg.num_frames - 1) % temporal:
        k = max(0, (cfg.num_frames - 1) // temporal)
        fixes = sorted({temporal * k + 1, temporal * (k + 1) + 1})
        problems.append(
            f"{path}.num_frames={cfg.num_frames}: Wan's VAE compresses time {temporal}x, so num_frames must be "
            f"{temporal}k+1; use {' or '.join(map(str, fixes))}"
        )
    for key in ("height", "width"):
        value = getattr(cfg, key)
        if value % spatial_multiple:
            near = max(spatial_multiple, round(value / spatial_multiple) * spatial_multiple)
            problems.append(
                f"{path}.{key}={value}: must be a multiple of {spatial_multiple} (VAE downsampling x patch size); "
                f"use e.g. {near}"
            )
    return problems


def flow_euler_scheduler(scheduler: Any, flow_shift: float | None) -> FlowMatchEulerDiscreteScheduler:
    """The flow-matching Euler scheduler equivalent to a Wan checkpoint's ``scheduler``.

    Released Wan checkpoints ship ``UniPCMultistepScheduler`` (or DPM-Solver) with ``use_flow_sigmas`` and a
    ``flow_shift``: a multistep solver over the same flow-matching noise levels. The policy's transitions are
    single Euler / SDE steps, so the sampling schedule comes from ``FlowMatchEulerDiscreteScheduler`` with
    that shift (the schedule Flow-GRPO uses for SD3), and the pipeline's scheduler is replaced by it so that
    ``pipe(...)`` follows the same steps. ``flow_shift`` overrides the checkpoint's shift.

    Raises:
        ValueError: the scheduler is not a flow-matching one.
    """
    cfg = scheduler.config
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        if flow_shift is None or flow_shift == cfg.get("shift"):
            return scheduler
        return FlowMatchEulerDiscreteScheduler.from_config(cfg, shift=flow_shift)
    if not cfg.get("use_flow_sigmas", False) or cfg.get("use_dynamic_shifting", False):
        raise ValueError(
            f"the pipeline's scheduler {type(scheduler).__name__} does not use static flow-matching sigmas "
            "(use_flow_sigmas=true, no dynamic shifting); give a Wan checkpoint with a flow-matching scheduler"
        )
    shift = float(cfg.get("flow_shift", 1.0) if flow_shift is None else flow_shift)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=cfg.get("num_train_timesteps", 1000), shift=shift)


class WanSampler(DiffusersFlowSampler):
    """Wan text-to-video policy (Wan2.1 T2V 1.3B / 14B, Wan2.2 TI2V-5B used text-to-video).

    The state is the video latent ``[B, C, f, h, w]`` with ``f = (num_frames - 1) / 4 + 1`` latent frames; the
    flow math is elementwise, so it is the image math unchanged. Conditioning (``P`` prompts):
    ``prompt_embeds`` ``[P, L, D]`` (UMT5, zero-padded to ``max_sequence_length``) and, with CFG
    (``guidance_scale > 1``), ``negative_prompt_embeds`` ``[P, L, D]`` of the negative prompt, encoded once
    and reused. The guided velocity ``v_u + g (v_c - v_u)`` comes from one batched forward (the pipeline runs
    two) and CFG is also applied in the training forward. ``decode`` returns frames ``[B, F, 3, H, W]`` in
    [0, 1] (float32).

    Wan2.2 TI2V pipelines (``expand_timesteps``) give every latent token its own timestep; in text-to-video
    they are all equal, so the per-sample timestep used here gives the same velocity. Wan2.2-A14B's
    two-expert pipelines (``transformer_2``) are not supported.
    """

    pipeline_class: ClassVar[type] = WanPipeline
    modality: ClassVar[str] = "video"
    preview_fps: ClassVar[int] = 16
    """Frame rate of the mp4 previews (Wan2.1's output rate)."""

    def __init__(
        self, pipe: Any, cfg: BackboneConfig, *, step_kind: str, noise_level: float, device: torch.device
    ) -> None:
        if getattr(pipe, "transformer_2", None) is not None:
            raise ValueError(
                f"backbone.pretrained={cfg.pretrained!r} is a two-expert Wan2.2 pipeline (transformer_2); "
                "only single-transformer Wan pipelines are supported (Wan2.1 T2V, Wan2.2 TI2V-5B)"
            )
        patch = tuple(pipe.transformer.config.patch_size)
        problems = _shape_problems(cfg, "backbone", pipe.vae_scale_factor_temporal,
                                   pipe.vae_scale_factor_spatial * max(patch[1], patch[2]))
        if problems:
            raise ConfigError(problems)
        flow_shift = cfg.options.get("flow_shift")
        scheduler = flow_euler_scheduler(pipe.scheduler, None if flow_shift is None else float(flow_shift))
        if scheduler is not pipe.scheduler:
            logger.info("Wan schedule: %s replaced by FlowMatchEulerDiscreteScheduler(shift=%s)",
                        type(pipe.scheduler).__name__, scheduler.config.shift)
            pipe.scheduler = scheduler
        self._negative: torch.Tensor | None = None  # [1, L, D] negative prompt embedding, encoded once
        super().__init__(pipe, cfg, step_kind=step_kind, noise_level=noise_level, device=device)

    @classmethod
    def check_config(cls, cfg: BackboneConfig, path: str = "backbone") -> list[str]:
        problems = _shape_problems(cfg, path, *compression(cfg.pretrained))
        unknown = sorted(set(cfg.options) - set(OPTIONS))
        if unknown:
            problems.append(f"{path}.options has unknown keys {unknown} for Wan; valid: {', '.join(OPTIONS)}")
        return problems

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        """``(C, f, h, w)`` of one video latent."""
        pipe = self.pipe
        frames = (self.cfg.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        s = pipe.vae_scale_factor_spatial
        return (pipe.transformer.config.in_channels, frames, self.cfg.height // s, self.cfg.width // s)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        """``[P, L, D]`` UMT5 embeddings of ``prompts``, in the transformer's dtype."""
        emb, _ = self.pipe.encode_prompt(
            prompt=prompts, do_classifier_free_guidance=False, max_sequence_length=self.cfg.max_sequence_length,
            device=self.device,
        )
        return emb.to(self.dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        cond = {"prompt_embeds": self._encode(prompts)}
        if self.do_cfg:
            if self._negative is None:
                self._negative = self._encode([self.cfg.negative_prompt])
            cond["negative_prompt_embeds"] = self._negative.expand(len(prompts), -1, -1)
        return cond

    def velocity(self, state: torch.Tensor, step: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = state.to(self.dtype)
        t = self.model_timestep(step)
        emb = cond["prompt_embeds"]
        if self.do_cfg:
            x = torch.cat([x, x])
            t = torch.cat([t, t])
            emb = torch.cat([cond["negative_prompt_embeds"], emb])
        out = self.transformer(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
        return self.guide(out) if self.do_cfg else out

    def save_samples(self, samples: Any, captions: Sequence[str], path: Path) -> Path | None:
        """Frame strips at ``path`` (PNG) and one mp4 per clip at :attr:`preview_fps` in a folder beside it
        (:func:`alignkit.media.video.save_previews`): the trainer's ``samples/eval_before/000.mp4``, ..."""
        from alignkit.media.video import save_previews

        return save_previews(samples, captions, path, self.preview_fps)

    @torch.no_grad()
    def decode(self, state: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, f, h, w]`` to frames ``[B, F, 3, H, W]`` in [0, 1] (float32), as ``WanPipeline``."""
        return self.vae_decode_normalized(state).permute(0, 2, 1, 3, 4)


@register_builtin("tiny-wan")
def _tiny_wan() -> WanPipeline:
    """A tiny random Wan2.1-style pipeline (UniPC flow scheduler, as released; 32 px, 9 frames), built offline."""
    from alignkit.modalities.video.tiny import build_tiny_wan_pipeline

    return build_tiny_wan_pipeline(seed=0)
