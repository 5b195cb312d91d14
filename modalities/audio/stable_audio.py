"""Stable Audio 3 text-to-audio adapter over diffusers ``StableAudio3Pipeline``.

Why this pipeline: it is the flow-matching text-to-audio pipeline of the installed diffusers (a rectified-flow DiT
predicting ``v = eps - x0`` under ``FlowMatchEulerDiscreteScheduler``), so Flow-GRPO and TempFlow-GRPO apply
unchanged. The older ``StableAudioPipeline`` (Stable Audio Open, Oobleck VAE) samples a v-prediction EDM model with
``EDMDPMSolverMultistepScheduler``, not a flow; ``LongCatAudioDiTPipeline`` is a flow too but inverts the sigma
convention (``invert_sigmas=True``) and has no diffusers LoRA support either.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableAudio3DiTModel, StableAudio3Pipeline
from diffusers.pipelines.stable_audio_3.pipeline_stable_audio_3 import logsnr_sigma_schedule

from alignkit.config import BackboneConfig, ConfigError
from alignkit.modalities.diffusers_common import DiffusersFlowSampler, register_builtin
from alignkit.types import Conditioning

logger = logging.getLogger(__name__)

OPTIONS: dict[str, str] = {
    "duration": "clip length in seconds (default 10.0, the pipeline's)",
    "sample_rate": "the rate (Hz) the recipe expects; checked against the checkpoint's VAE when it loads",
    "logsnr_min": "log-SNR at the noisy end of the sigma schedule (default -6.2, the pipeline's)",
    "logsnr_max": "log-SNR at the clean end of the sigma schedule (default 2.0, the pipeline's)",
}
"""Valid ``backbone.options`` keys for Stable Audio 3."""

DEFAULT_DURATION, DEFAULT_LOGSNR_MIN, DEFAULT_LOGSNR_MAX = 10.0, -6.2, 2.0
TEXT_TOKENS = 256
"""``StableAudio3Pipeline.encode_prompt`` pads / truncates prompts to ``min(tokenizer.model_max_length, 256)``."""


@functools.lru_cache(maxsize=1)
def dit_linear_names() -> tuple[str, ...]:
    """Qualified names of every ``Linear`` layer of a (1-block) ``StableAudio3DiTModel``, built on the meta device.

    Layer names do not depend on the model's sizes, so these are the names LoRA can target in any checkpoint.
    """
    with torch.device("meta"):
        model = StableAudio3DiTModel(io_channels=4, embed_dim=8, depth=1, num_heads=1, cond_token_dim=4,
                                     global_cond_dim=4, local_add_cond_dim=3, timestep_features_dim=4,
                                     num_memory_tokens=1)
    return tuple(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _option_problems(options: dict[str, Any], path: str) -> list[str]:
    problems = []
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        problems.append(f"{path}.options has unknown keys {unknown} for Stable Audio 3; valid: "
                        + "; ".join(f"{k} ({v})" for k, v in OPTIONS.items()))
    duration = options.get("duration", DEFAULT_DURATION)
    if not _number(duration) or duration <= 0:
        problems.append(f"{path}.options.duration={duration!r}: give the clip length in seconds, > 0 (e.g. 10.0)")
    rate = options.get("sample_rate")
    if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool) or rate < 1):
        problems.append(f"{path}.options.sample_rate={rate!r}: give the VAE's rate in Hz as an integer "
                        "(44100 for Stable Audio 3)")
    lo, hi = options.get("logsnr_min", DEFAULT_LOGSNR_MIN), options.get("logsnr_max", DEFAULT_LOGSNR_MAX)
    if not (_number(lo) and _number(hi)) or lo >= hi:
        problems.append(f"{path}.options.logsnr_min={lo!r}, logsnr_max={hi!r}: need numbers with logsnr_min < "
                        f"logsnr_max (the pipeline's {DEFAULT_LOGSNR_MIN} and {DEFAULT_LOGSNR_MAX})")
    return problems


def _lora_problems(targets: Sequence[str], path: str) -> list[str]:
    names = dit_linear_names()
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if not missing:
        return []
    return [f"{path}.target_modules={list(targets)}: {missing} match no Linear layer of StableAudio3DiTModel; its "
            "attention projections are self_attn.to_qkv, self_attn.to_out, cross_attn.to_q, cross_attn.to_kv, "
            "cross_attn.to_out (use e.g. [to_qkv, to_q, to_kv, to_out])"]


class StableAudio3Sampler(DiffusersFlowSampler):
    """Stable Audio 3 text-to-audio policy (``stable-audio-3-medium-base``, the distilled ``stable-audio-3-medium``).

    The state is the audio latent ``[B, D, L]`` (``D = vae.config.latent_dim``, ``L = ceil(duration * sr / r)``
    with ``r = vae.downsampling_ratio``); the flow math is elementwise, so it is the image math unchanged. The
    schedule is the pipeline's: ``logsnr_sigma_schedule(num_steps, logsnr_min, logsnr_max)`` through the
    checkpoint's ``FlowMatchEulerDiscreteScheduler``.

    Conditioning (``P`` prompts), encoded once per rollout exactly as the pipeline does: ``prompt_embeds``
    ``[P, S + 1, E]`` (T5Gemma tokens padded to ``S = min(tokenizer.model_max_length, 256)``, then the duration
    token), ``attention_mask`` ``[P, S + 1]`` and ``global_embeds`` ``[P, G]`` (the duration embedding, computed
    once per sampler); with CFG (``guidance_scale > 1``) also ``negative_prompt_embeds`` / ``negative_attention_mask``
    of the negative prompt, encoded once per sampler. The guided velocity ``v_u + g (v_c - v_u)`` comes from one
    batched forward, as in the pipeline, and CFG also applies in the training forward.

    ``decode`` returns waveforms ``[B, C, T]`` float32 in [-1, 1] with ``T = int(duration * sample_rate)``
    (the pipeline's trim of the VAE output); :attr:`sample_rate` is the VAE's rate.

    The distilled checkpoint ships ``stochastic_sampling=True`` (ping-pong: ``x' = (1 - s') x0_hat + s' eps``). Its
    scheduler is replaced by the same scheduler with ``stochastic_sampling=False`` so that ``pipe(...)`` and the
    ODE follow the deterministic Euler steps; note that ping-pong *is* the CPS step family at noise level 1
    (``algo.step_kind=cps algo.noise_level=1.0``), so the distilled sampler's own exploration is available.
    Not supported: ``silence_padding_duration`` (always 0) and the audio-to-audio / inpainting pipelines.
    LoRA goes through peft directly (the SA3 DiT has no diffusers adapter mixin); checkpoints are peft adapter folders
    (``adapter_config.json`` + ``adapter_model.safetensors``): ``PeftModel.from_pretrained(pipe.transformer, folder)``
    adds the trained adapter to a stock pipeline's transformer.
    """

    pipeline_class: ClassVar[type] = StableAudio3Pipeline
    modality: ClassVar[str] = "audio"

    def __init__(
        self, pipe: Any, cfg: BackboneConfig, *, step_kind: str, noise_level: float, device: torch.device
    ) -> None:
        options = cfg.options
        self.duration = float(options.get("duration", DEFAULT_DURATION))
        self.logsnr = (float(options.get("logsnr_min", DEFAULT_LOGSNR_MIN)),
                       float(options.get("logsnr_max", DEFAULT_LOGSNR_MAX)))
        self.sample_rate = int(pipe.vae.config.sampling_rate)
        """Samples per second of the decoded waveforms (the VAE's ``sampling_rate``)."""
        problems = []
        expected = options.get("sample_rate")
        if expected is not None and int(expected) != self.sample_rate:
            problems.append(f"backbone.options.sample_rate={expected}: {cfg.pretrained!r} decodes at "
                            f"{self.sample_rate} Hz; set backbone.options.sample_rate={self.sample_rate}")
        max_duration = float(pipe.duration_embedder.config.max_val)
        if self.duration > max_duration:
            problems.append(f"backbone.options.duration={self.duration}: the checkpoint's duration embedder clamps "
                            f"durations above {max_duration} s; use at most {max_duration}")
        if int(self.duration * self.sample_rate) < 1:
            problems.append(f"backbone.options.duration={self.duration}: shorter than one sample at "
                            f"{self.sample_rate} Hz; use a longer duration")
        if problems:
            raise ConfigError(problems)
        if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            raise ValueError(f"backbone.pretrained={cfg.pretrained!r} ships {type(pipe.scheduler).__name__}; the "
                             "adapter needs Stable Audio 3's FlowMatchEulerDiscreteScheduler")
        if pipe.scheduler.config.get("stochastic_sampling", False):
            logger.info("Stable Audio 3: the checkpoint samples with ping-pong re-noising (a distilled model); the "
                        "policy uses the deterministic Euler schedule (ping-pong = step_kind cps at noise_level 1)")
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                                         stochastic_sampling=False)
        self._global: torch.Tensor | None = None  # [1, G] duration embedding, computed once
        self._negative: tuple[torch.Tensor, torch.Tensor] | None = None  # ([1, S + 1, E], [1, S + 1])
        super().__init__(pipe, cfg, step_kind=step_kind, noise_level=noise_level, device=device)
        pipe.duration_embedder.requires_grad_(False).eval()  # frozen, like the text encoder and the VAE

    @classmethod
    def check_config(cls, cfg: BackboneConfig, path: str = "backbone") -> list[str]:
        problems = _option_problems(cfg.options, path)
        if cfg.max_sequence_length != TEXT_TOKENS:
            problems.append(f"{path}.max_sequence_length={cfg.max_sequence_length}: Stable Audio 3 always encodes "
                            f"min(tokenizer.model_max_length, {TEXT_TOKENS}) tokens, as its pipeline; "
                            f"leave it at {TEXT_TOKENS}")
        for key in ("vae_tiling", "vae_slicing"):
            if getattr(cfg, key):
                problems.append(f"{path}.{key}=true: Stable Audio 3's SAME autoencoder has no {key.split('_')[1]}; "
                                f"set {path}.{key}=false")
        if cfg.lora.enabled:
            problems += _lora_problems(cfg.lora.target_modules, f"{path}.lora")
        return problems

    def _schedule_kwargs(self) -> dict[str, Any]:
        return {"sigmas": logsnr_sigma_schedule(self.cfg.num_steps, *self.logsnr)}

    @property
    def num_audio_samples(self) -> int:
        """``T``: audio samples per channel of a decoded clip (``int(duration * sample_rate)``, as the pipeline)."""
        return int(self.duration * self.sample_rate)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """``(D, L)`` of one audio latent."""
        vae = self.pipe.vae
        return (vae.config.latent_dim, math.ceil(self.duration * self.sample_rate / vae.downsampling_ratio))

    def _text(self, prompts: list[str], global_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``([P, S + 1, E], [P, S + 1])``: T5Gemma embeddings with the duration token appended, and their mask."""
        emb, mask = self.pipe.encode_prompt(prompts, self.device, 1)
        return self.pipe.prepare_cross_attention(emb, mask, global_embeds)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        if self._global is None:
            self._global = self.pipe.encode_duration(self.duration, self.device, 1, 1)
        g = self._global.expand(len(prompts), -1)
        emb, mask = self._text(prompts, g)
        cond = {"prompt_embeds": emb, "attention_mask": mask, "global_embeds": g}
        if self.do_cfg:
            if self._negative is None:
                self._negative = self._text([self.cfg.negative_prompt], self._global)
            nemb, nmask = self._negative
            cond["negative_prompt_embeds"] = nemb.expand(len(prompts), -1, -1)
            cond["negative_attention_mask"] = nmask.expand(len(prompts), -1)
        return cond

    def velocity(self, state: torch.Tensor, step: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x = state.to(self.dtype)
        t = self.model_timestep(step)
        emb, mask, g = cond["prompt_embeds"], cond["attention_mask"], cond["global_embeds"]
        if self.do_cfg:
            x, t, g = torch.cat([x, x]), torch.cat([t, t]), torch.cat([g, g])
            emb = torch.cat([cond["negative_prompt_embeds"], emb])
            mask = torch.cat([cond["negative_attention_mask"], mask])
        out = self.transformer(x, t, encoder_hidden_states=emb, global_hidden_states=g, encoder_attention_mask=mask,
                               return_dict=False)[0]
        return self.guide(out) if self.do_cfg else out

    @torch.no_grad()
    def decode(self, state: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, D, L]`` to waveforms ``[B, C, T]`` float32 in [-1, 1], as ``StableAudio3Pipeline``."""
        vae = self.pipe.vae
        audio = vae.decode(state.to(vae.dtype)).sample[:, :, : self.num_audio_samples]
        return audio.float().clamp(-1.0, 1.0)

    def save_samples(self, samples: Any, captions: Sequence[str], path: Path) -> Path | None:
        """Amplitude plots at ``path`` (PNG) and one wav per sample at :attr:`sample_rate` beside it."""
        from alignkit.media.audio import save_previews

        return save_previews(samples, captions, path, self.sample_rate)


@register_builtin("tiny-stable-audio-3")
def _tiny_stable_audio_3() -> StableAudio3Pipeline:
    """A tiny random Stable Audio 3 pipeline (8 kHz stereo, Euler scheduler as the base checkpoint), built offline."""
    from alignkit.modalities.audio.tiny import build_tiny_stable_audio3_pipeline

    return build_tiny_stable_audio3_pipeline(seed=0)
