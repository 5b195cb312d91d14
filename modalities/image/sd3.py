"""Stable Diffusion 3 / 3.5 adapter over diffusers ``StableDiffusion3Pipeline``."""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import StableDiffusion3Pipeline

from alignkit.modalities.diffusers_common import DiffusersFlowSampler, register_builtin
from alignkit.types import Conditioning


class SD3Sampler(DiffusersFlowSampler):
    """SD3 / SD3.5 text-to-image policy.

    Conditioning (``P`` prompts): ``prompt_embeds`` ``[P, L, D]``, ``pooled`` ``[P, Dp]`` and, with CFG
    (``guidance_scale > 1``), ``negative_prompt_embeds`` / ``negative_pooled`` of the negative prompt.
    The guided velocity is ``v_u + g (v_c - v_u)`` from one batched forward, as in the pipeline; CFG is
    also applied in the training forward so log-probs match the sampling policy.
    """

    pipeline_class: ClassVar[type] = StableDiffusion3Pipeline

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, h, w)`` of one latent."""
        f = self.pipe.vae_scale_factor
        return (self.pipe.transformer.config.in_channels, self.cfg.height // f, self.cfg.width // f)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        pe, npe, pooled, npooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            do_classifier_free_guidance=self.do_cfg,
            negative_prompt=[self.cfg.negative_prompt] * len(prompts) if self.do_cfg else None,
            max_sequence_length=self.cfg.max_sequence_length,
        )
        cond = {"prompt_embeds": pe, "pooled": pooled}
        if self.do_cfg:
            cond.update(negative_prompt_embeds=npe, negative_pooled=npooled)
        return cond

    def velocity(self, state: torch.Tensor, step: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = state.to(self.dtype)
        t = self.model_timestep(step)
        emb, pooled = cond["prompt_embeds"], cond["pooled"]
        if self.do_cfg:
            x = torch.cat([x, x])
            t = torch.cat([t, t])
            emb = torch.cat([cond["negative_prompt_embeds"], emb])
            pooled = torch.cat([cond["negative_pooled"], pooled])
        out = self.transformer(
            hidden_states=x, timestep=t, encoder_hidden_states=emb, pooled_projections=pooled, return_dict=False
        )[0]
        return self.guide(out) if self.do_cfg else out

    def decode(self, state: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae_decode(state)


@register_builtin("tiny-sd3")
def _tiny_sd3() -> StableDiffusion3Pipeline:
    """A tiny random SD3 pipeline (designed for 64 px; the CPU recipes sample 32 px), built offline."""
    from alignkit.modalities.image.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(seed=0)
