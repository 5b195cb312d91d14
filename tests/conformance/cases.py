"""The backbones under the sampler contract (``test_contract.py``), one :class:`BackboneCase` each.

**Adding a backbone.** Give it a tiny builder (``modalities/<modality>/tiny.py``) and append one
:class:`BackboneCase` to :data:`CASES`: how to write its tiny pretrained folder, the backbone settings the
contract samples with, its stock loader (a :class:`DiffusersStock` for a diffusers pipeline, or a class with the
same four methods), the settings its ``check_config`` must refuse, and in ``skip`` the contract items that do
not apply with the reason. Every test of ``test_contract.py`` is parametrised over :data:`CASES`, so the new
backbone then runs the whole contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline, QwenImagePipeline, StableAudio3Pipeline, StableDiffusion3Pipeline, WanPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from alignkit.config import BackboneConfig, LoraConfig
from alignkit.interfaces import Sampler
from alignkit.modalities.audio.stable_audio import StableAudio3Sampler
from alignkit.modalities.audio.tiny import TINY_SAMPLE_RATE, build_tiny_stable_audio3_pipeline
from alignkit.modalities.diffusers_common import LORA_WEIGHTS_NAME, absent_components
from alignkit.modalities.discrete.masked import reveal_schedule
from alignkit.modalities.discrete.mlm import MaskedLMSampler
from alignkit.modalities.discrete.tiny import build_char_tokenizer, build_tiny_masked_lm, save_masked_lm
from alignkit.modalities.image.flux import FluxSampler
from alignkit.modalities.image.qwen_image import QwenImageSampler
from alignkit.modalities.image.sd3 import SD3Sampler
from alignkit.modalities.image.tiny import (
    build_tiny_flux_pipeline,
    build_tiny_qwen_image_pipeline,
    build_tiny_sd3_pipeline,
)
from alignkit.modalities.policy import ADAPTER_WEIGHTS_NAME, PEFT_PREFIX
from alignkit.modalities.video.tiny import build_tiny_wan_pipeline
from alignkit.modalities.video.wan import WanSampler

FLOW_STEP_KINDS = ("flow_grpo", "cps", "dance_grpo")


# --- stock loaders: what a user runs without alignkit ---------------------------------------------------------


@dataclass(frozen=True)
class DiffusersStock:
    """A diffusers pipeline used as its users use it.

    Attributes:
        pipeline_class: the pipeline (``from_pretrained`` of the tiny folder).
        call_kwargs: the pipeline's ``__call__`` arguments for a backbone config, besides prompts and latents.
        output: the output field holding the samples (``images``, ``frames``, ``audios``).
        peft_lora: the LoRA export is a peft adapter folder (the pipeline has no diffusers LoRA loader).
    """

    pipeline_class: type
    call_kwargs: Callable[[BackboneConfig], dict[str, Any]]
    output: str
    peft_lora: bool = False

    def load(self, folder: Path) -> Any:
        pipe = self.pipeline_class.from_pretrained(folder, **absent_components(str(folder)))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def sample(self, pipe: Any, prompts: list[str], initial: torch.Tensor, cfg: BackboneConfig
               ) -> tuple[torch.Tensor, Any]:
        """The pipeline's own sampling from initial noise ``initial``: ``(final latents, decoded samples)``, the
        latents as its step-end callback sees them after the last step."""
        seen: dict[str, torch.Tensor] = {}

        def keep(_pipe: Any, _i: int, _t: Any, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            seen.update(tensors)
            return tensors

        out = pipe(prompt=prompts, latents=initial.clone(), num_inference_steps=cfg.num_steps, output_type="pt",
                   callback_on_step_end=keep, callback_on_step_end_tensor_inputs=["latents"], **self.call_kwargs(cfg))
        return seen["latents"], getattr(out, self.output)

    def load_lora(self, pipe: Any, export: Path) -> None:
        """The documented way to load a LoRA export into the stock pipeline."""
        if self.peft_lora:
            from peft import PeftModel

            PeftModel.from_pretrained(pipe.transformer, str(export))  # injects into pipe.transformer in place
        else:
            pipe.load_lora_weights(export)

    def load_full(self, folder: Path, export: Path) -> Any:
        """The stock pipeline with the fully fine-tuned transformer of ``export``."""
        base = self.load(folder)
        transformer = type(base.transformer).from_pretrained(export / "transformer")
        pipe = self.pipeline_class.from_pretrained(folder, transformer=transformer, **absent_components(str(folder)))
        pipe.set_progress_bar_config(disable=True)
        return pipe


@dataclass
class MaskedLMPipe:
    """A transformers masked LM with its tokenizer, as ``from_pretrained`` loads them."""

    model: Any
    tokenizer: Any


@dataclass(frozen=True)
class MaskedLMStock:
    """A transformers masked LM and a plain greedy MaskGIT-style decode written here, independently of the
    sampler: the ``r_i`` most confident masked positions (untempered, special tokens but the end token
    excluded, ties to the lower index) take their argmax tokens, ``reveal_schedule(G, N - 1)`` positions at each of
    the first ``N - 1`` steps (the last step reveals nothing)."""

    def load(self, folder: Path, weights: Path | None = None) -> MaskedLMPipe:
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        model = AutoModelForMaskedLM.from_pretrained(weights or folder).eval()
        return MaskedLMPipe(model, AutoTokenizer.from_pretrained(folder))

    @torch.no_grad()
    def sample(self, pipe: MaskedLMPipe, prompts: list[str], initial: torch.Tensor, cfg: BackboneConfig
               ) -> tuple[torch.Tensor, list[str]]:
        """``(final token ids, texts)`` of the greedy decode from ``initial`` (all masked)."""
        tok = pipe.tokenizer
        g, length = int(cfg.options["gen_length"]), cfg.max_sequence_length
        ids = torch.full((len(prompts), length), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, prompt in enumerate(prompts):
            tokens = tok(prompt)["input_ids"]
            ids[i, length - len(tokens):] = torch.tensor(tokens)
            attention[i, length - len(tokens):] = 1
        state = initial.clone()
        forbidden = [i for i in tok.all_special_ids if i != tok.eos_token_id]
        for count in reveal_schedule(g, cfg.num_steps - 1).tolist():  # the last of the N steps is the identity
            logits = pipe.model(input_ids=torch.cat([ids, state], 1),
                                attention_mask=torch.cat([attention, torch.ones_like(state)], 1)).logits[:, -g:]
            logits = logits.float()
            logits[..., forbidden] = -1e9
            confidence = torch.log_softmax(logits, -1).amax(-1).masked_fill(state != tok.mask_token_id, -torch.inf)
            where = confidence.argsort(dim=1, descending=True, stable=True)[:, :count]
            state.scatter_(1, where, logits.argmax(-1).gather(1, where))
        rows = [row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row for row in state.tolist()]
        return state, [tok.decode(row, skip_special_tokens=True) for row in rows]

    def load_lora(self, pipe: MaskedLMPipe, export: Path) -> None:
        from peft import PeftModel

        PeftModel.from_pretrained(pipe.model, str(export))  # injects into the model in place

    def load_full(self, folder: Path, export: Path) -> MaskedLMPipe:
        return self.load(folder, weights=export / "model")


# --- checkpoints written before the adapter settings were saved with the weights -------------------------------


def strip_lora_metadata(export: Path) -> None:
    """What alignkit wrote for SD3 / FLUX / Wan before: the same file without the ``lora_adapter_metadata``."""
    path = export / LORA_WEIGHTS_NAME
    with safe_open(str(path), framework="pt") as f:
        assert "lora_adapter_metadata" in (f.metadata() or {})
    save_file(load_file(str(path)), str(path))


def old_peft_layout(export: Path) -> None:
    """What alignkit wrote for Stable Audio 3 before: ``pytorch_lora_weights.safetensors`` keyed ``transformer.``
    beside peft's ``adapter_config.json``."""
    new = export / ADAPTER_WEIGHTS_NAME
    state = {"transformer." + k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(new)).items()}
    save_file(state, str(export / LORA_WEIGHTS_NAME))
    new.unlink()


# --- the cases ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackboneCase:
    """One backbone under the contract.

    Attributes:
        name: its sampler registry name.
        sampler: the adapter class.
        build: writes the tiny pretrained folder (``save_pretrained``) into the given path.
        backbone: ``BackboneConfig`` fields the contract samples with (4 steps; ``pretrained`` is added).
        prompts: two prompts its tokenizer knows.
        stock: its stock loader (:class:`DiffusersStock`, :class:`MaskedLMStock`).
        guidance: backbone overrides for the ODE-equals-stock check (CFG on and off where it has CFG).
        step_kinds: the ``algo.step_kind`` values the linear stochastic rollout is checked with; the first is the
            default of the other checks. The flow step families share one implementation
            (:class:`alignkit.flow.FlowMatchingSampler`): one flow case runs them all.
        noise_level: ``algo.noise_level`` (the flows' SDE level, the masked models' temperature).
        bad: ``(overrides, fragments)``: settings ``check_config`` must refuse before loading, and one text
            fragment per problem it must report, in order.
        bad_lora_targets: LoRA targets matching no layer of the tiny model.
        encoder_rows: rows each text encoder sees per ``encode_prompts`` of the 2 prompts once the sampler
            has encoded its negative prompt.
        legacy: turns an export into the layout alignkit wrote before (None: the layout did not change).
        skip: contract items that do not apply, with the reason (``encoder``: prompts encoded once per rollout).
    """

    name: str
    sampler: type[Sampler]
    build: Callable[[Path], Any]
    backbone: dict[str, Any]
    prompts: tuple[str, str]
    stock: Any
    bad: tuple[dict[str, Any], tuple[str, ...]]
    bad_lora_targets: list[str]
    guidance: tuple[dict[str, Any], ...] = ({},)
    step_kinds: tuple[str, ...] = ("flow_grpo",)
    noise_level: float = 0.7
    encoder_rows: int = 2
    legacy: Callable[[Path], None] | None = strip_lora_metadata
    skip: dict[str, str] = field(default_factory=dict)

    def config(self, folder: Path | str, **overrides: Any) -> BackboneConfig:
        fields = {**self.backbone, **overrides}
        if "options" in overrides:
            fields["options"] = {**self.backbone.get("options", {}), **overrides["options"]}
        return BackboneConfig(name=self.name, pretrained=str(folder), **fields)

    def make(self, folder: Path | str, step_kind: str | None = None, **overrides: Any) -> Any:
        return self.sampler.from_config(self.config(folder, **overrides), step_kind=step_kind or self.step_kinds[0],
                                        noise_level=self.noise_level, device="cpu")


def _image(size: int = 32) -> dict[str, Any]:
    return dict(height=size, width=size, num_steps=4, max_sequence_length=16, lora=LoraConfig(rank=4, alpha=8))


def _build_masked_lm(folder: Path) -> None:
    tok = build_char_tokenizer()
    model = build_tiny_masked_lm(tok, hidden=32, layers=1, heads=2, seed=3)
    with torch.no_grad():  # sharper than the random init: uneven distributions, confident argmaxes
        model.cls.predictions.decoder.weight.mul_(8.0)
    save_masked_lm(model, tok, folder)


SA3_TARGETS = ["to_qkv", "to_q", "to_kv", "to_out"]

CASES: tuple[BackboneCase, ...] = (
    BackboneCase(
        name="sd3", sampler=SD3Sampler,
        build=lambda f: build_tiny_sd3_pipeline(seed=0).save_pretrained(f, safe_serialization=True),
        backbone=_image(), prompts=("a red circle", "two blue squares"),
        stock=DiffusersStock(StableDiffusion3Pipeline, lambda c: dict(
            guidance_scale=c.guidance_scale, negative_prompt=c.negative_prompt, height=c.height, width=c.width,
            max_sequence_length=c.max_sequence_length), "images"),
        guidance=({"guidance_scale": 4.5}, {"guidance_scale": 1.0}), step_kinds=FLOW_STEP_KINDS,
        bad=({"options": {"shift": 3.0}}, ("backbone.options has unknown keys ['shift']",)),
        bad_lora_targets=["no_such_layer"], encoder_rows=4,  # the prompts and the negative prompt, each call
    ),
    BackboneCase(
        name="flux", sampler=FluxSampler,
        build=lambda f: build_tiny_flux_pipeline(seed=0).save_pretrained(f, safe_serialization=True),
        backbone={**_image(), "guidance_scale": 3.5}, prompts=("a red circle", "two blue squares"),
        stock=DiffusersStock(FluxPipeline, lambda c: dict(
            guidance_scale=c.guidance_scale, height=c.height, width=c.width,
            max_sequence_length=c.max_sequence_length), "images"),
        bad=({"options": {"flow_shift": 3.0}}, ("backbone.options has unknown keys ['flow_shift']",)),
        bad_lora_targets=["no_such_layer"],
    ),
    BackboneCase(
        name="qwen_image", sampler=QwenImageSampler,
        build=lambda f: build_tiny_qwen_image_pipeline(seed=0).save_pretrained(f, safe_serialization=True),
        backbone={**_image(), "max_sequence_length": 32, "guidance_scale": 4.0, "negative_prompt": " ",
                  # not attn.add_q_proj: the last block discards its text stream, so that adapter gets no gradient
                  "lora": LoraConfig(rank=4, alpha=8, target_modules=[
                      "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_v_proj"])},
        prompts=("a red circle", "two blue squares"),
        stock=DiffusersStock(QwenImagePipeline, lambda c: dict(
            true_cfg_scale=c.guidance_scale, negative_prompt=c.negative_prompt if c.guidance_scale > 1 else None,
            height=c.height, width=c.width, max_sequence_length=c.max_sequence_length), "images"),
        guidance=({"guidance_scale": 4.0}, {"guidance_scale": 1.0}),
        bad=({"options": {"shift": 3.0}}, ("backbone.options has unknown keys ['shift']",)),
        bad_lora_targets=["no_such_layer"],
    ),
    BackboneCase(
        name="wan", sampler=WanSampler,
        build=lambda f: build_tiny_wan_pipeline(seed=0, scheduler="euler").save_pretrained(f, safe_serialization=True),
        backbone={**_image(), "num_frames": 9, "guidance_scale": 5.0}, prompts=("a red circle", "two blue squares"),
        stock=DiffusersStock(WanPipeline, lambda c: dict(
            guidance_scale=c.guidance_scale, negative_prompt=c.negative_prompt or None, height=c.height,
            width=c.width, num_frames=c.num_frames, max_sequence_length=c.max_sequence_length), "frames"),
        guidance=({"guidance_scale": 5.0, "negative_prompt": "blurry, low quality"},
                  {"guidance_scale": 1.0, "negative_prompt": ""}),
        bad=({"num_frames": 10, "height": 40, "options": {"shift": 3}},
             ("backbone.num_frames=10: Wan's VAE compresses time 4x, so num_frames must be 4k+1; use 9 or 13",
              "backbone.height=40: must be a multiple of 16", "backbone.options has unknown keys ['shift']")),
        bad_lora_targets=["no_such_layer"],
    ),
    BackboneCase(
        name="stable_audio_3", sampler=StableAudio3Sampler,
        build=lambda f: build_tiny_stable_audio3_pipeline(seed=0).save_pretrained(f, safe_serialization=True),
        backbone=dict(num_steps=4, guidance_scale=3.0, options={"duration": 0.5, "sample_rate": TINY_SAMPLE_RATE},
                      lora=LoraConfig(rank=4, alpha=8, target_modules=SA3_TARGETS)),
        prompts=("a dog barking", "rain on a tin roof"),
        stock=DiffusersStock(StableAudio3Pipeline, lambda c: dict(
            guidance_scale=c.guidance_scale, negative_prompt=c.negative_prompt or None,
            duration=c.options["duration"]), "audios", peft_lora=True),
        guidance=({"guidance_scale": 3.0, "negative_prompt": "static noise"}, {"guidance_scale": 1.0}),
        bad=({"max_sequence_length": 512, "vae_tiling": True,
              "lora": LoraConfig(rank=4, alpha=8, target_modules=["to_qkv", "to_k", "to_out.0"]),
              "options": {"duration": -1.0, "sample_rate": 44.1, "logsnr_min": 3.0, "shift": 2}},
             ("backbone.options has unknown keys ['shift']", "backbone.options.duration=-1.0",
              "backbone.options.sample_rate=44.1: give the VAE's rate in Hz as an integer (44100",
              "logsnr_min=3.0, logsnr_max=2.0", "backbone.max_sequence_length=512",
              "backbone.vae_tiling=true: Stable Audio 3's SAME autoencoder has no tiling; "
              "set backbone.vae_tiling=false",
              "backbone.lora.target_modules=['to_qkv', 'to_k', 'to_out.0']: ['to_k', 'to_out.0'] match no Linear")),
        bad_lora_targets=["no_such_layer"], legacy=old_peft_layout,
    ),
    BackboneCase(
        name="masked_lm", sampler=MaskedLMSampler, build=_build_masked_lm,
        backbone=dict(num_steps=4, max_sequence_length=6, options={"gen_length": 4},
                      lora=LoraConfig(rank=4, alpha=8, target_modules=["query", "value", "dense"])),
        prompts=("12+34=", "9-3="), stock=MaskedLMStock(), step_kinds=("masked_confidence",), noise_level=0.8,
        bad=({"num_steps": 6, "options": {"scale": "std", "foo": 1}},
             ("backbone.options has unknown keys ['foo']",
              "backbone.num_steps=6: each step but the final identity step reveals at least one of the 4",
              "backbone.options.scale='std'")),
        bad_lora_targets=["no_such_layer"], legacy=None,
        skip={"encoder": "the prompt is a token prefix: there is no text encoder to run once"},
    ),
)
