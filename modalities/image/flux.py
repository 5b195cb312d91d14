"""FLUX.1 adapter over diffusers ``FluxPipeline`` (guidance-distilled: embedded guidance, no CFG)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from diffusers import FluxPipeline

from alignkit.flow import randn
from alignkit.modalities.diffusers_common import DiffusersFlowSampler, register_builtin, resolution_shift_kwargs
from alignkit.types import Conditioning


class FluxSampler(DiffusersFlowSampler):
    """FLUX.1 text-to-image policy.

    The state is FLUX's packed latent ``[B, (h/2)(w/2), 4C]``; the flow math is elementwise so packing
    changes nothing. Guidance is the transformer's guidance embedding (``guidance_scale``, 3.5 for
    FLUX.1-dev) when ``guidance_embeds`` is set; FLUX.1-schnell has none. Conditioning: ``prompt_embeds``
    ``[P, L, D]`` (T5) and ``pooled`` ``[P, Dp]`` (CLIP).
    """

    pipeline_class: ClassVar[type] = FluxPipeline

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Unpacked latent ``(h, w)``, each even."""
        f = self.pipe.vae_scale_factor
        return 2 * (self.cfg.height // (f * 2)), 2 * (self.cfg.width // (f * 2))

    @property
    def latent_channels(self) -> int:
        return self.pipe.transformer.config.in_channels // 4

    def _schedule_kwargs(self) -> dict[str, Any]:
        h, w = self.latent_hw
        return resolution_shift_kwargs(self.pipe.scheduler.config, self.cfg.num_steps, (h // 2) * (w // 2))

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        pe, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.cfg.max_sequence_length
        )
        return {"prompt_embeds": pe, "pooled": pooled}

    def initial_state(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        h, w = self.latent_hw
        c = self.latent_channels
        noise = randn((len(generators), c, h, w), generators, self.device, torch.float32)
        return self.pipe._pack_latents(noise, len(generators), c, h, w)

    def velocity(self, state: torch.Tensor, step: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        h, w = self.latent_hw
        b = state.shape[0]
        img_ids = self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.dtype)
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = None
        if self.pipe.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.cfg.guidance_scale, device=self.device, dtype=torch.float32)
        t = self.model_timestep(step).to(self.dtype)
        return self.transformer(
            hidden_states=state.to(self.dtype), timestep=t / 1000, guidance=guidance,
            pooled_projections=cond["pooled"], encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=txt_ids, img_ids=img_ids, return_dict=False,
        )[0]

    def decode(self, state: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latents = self.pipe._unpack_latents(state, self.cfg.height, self.cfg.width, self.pipe.vae_scale_factor)
            return self.vae_decode(latents)


@register_builtin("tiny-flux")
def _tiny_flux() -> FluxPipeline:
    """A tiny random FLUX pipeline (designed for 64 px; the CPU recipes sample 32 px), built offline."""
    from alignkit.modalities.image.tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(seed=0)
