"""Rollout and training throughput of Flow-GRPO and TempFlow-GRPO on an SD3.5-Medium-shaped model, one GPU.

The pipeline has SD3.5 Medium's transformer (``SD3Transformer2DModel``: 24 MMDiT-X layers, 24 heads of 64, dual
attention in layers 0-12, RMS QK-norm, patch 2), SD3's VAE shape and real-size text encoders (CLIP-L, CLIP-G and
the T5-XXL encoder), all with random weights: every module is constructed on the meta device and materialised
once, directly on the GPU, in bf16; both algorithms share that one build. 512 px, 10 steps, CFG 4.5, LoRA r=32 on
the attention projections, gradient checkpointing (the ``sd35_medium_*`` recipes), equal rollout and training
batches for both methods. Everything runs through :class:`alignkit.trainer.Trainer` (the real rollout engine,
rewards, credit and update code).

What it reports, per method (median and range over ``--epochs`` timed epochs after one warm-up epoch):

* time per stage (rollout, scoring, training) and per phase, from CUDA events (``time.perf_counter`` on CPU):
  text encoders, transformer (rollout; policy and reference forwards in training), VAE decode, reward,
  backward, optimizer step, and the rest of each stage (step math, bookkeeping, host gaps);
* FLOPs counted per op with ``torch.utils.flop_counter.FlopCounterMode`` on one row of each kind of work
  (model evaluation, decode, prompt encoding, training forward + backward with and without gradient
  checkpointing, reference forward), checked against a closed-form count of the transformer (matmuls and
  attention separately, so uncounted attention kernels show);
* model FLOPs utilisation (MFU: no recomputation) and hardware FLOPs utilisation (HFU: with the checkpointed
  forwards recomputed), against the data-sheet peak and against an 8192^3 bf16 matmul measured in the same run;
  useful training FLOPs count each distinct training input once (TempFlow-GRPO's children of one branch
  point share theirs);
* device memory allocated and reserved per phase, with the component sizes (text encoders included);
* a short ``torch.profiler`` capture (top ops by device time);
* provenance: commit, package versions, threads, load average.

    python bench/gpu_throughput.py           # GPU, SD3.5-Medium shape: bench/results/gpu_throughput_<gpu>.json
    python bench/gpu_throughput.py --tiny            # CPU: tiny SD3, every code path that needs no CUDA

``bench/device_check.sh`` runs it on a lent GPU machine; ``bench/gpu_preflight.py`` runs the same script here.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("bench.gpu_throughput")

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

# --- model shapes --------------------------------------------------------------------------------------------

SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm",
}
"""``stabilityai/stable-diffusion-3.5-medium`` ``transformer/config.json`` (diffusers ``SD3Transformer2DModel``)."""

SD3_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 1.5305,
    "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False,
}
"""The SD3 / SD3.5 ``vae/config.json`` shape."""

CLIP_L: dict[str, Any] = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu",
                          "vocab_size": 49408, "max_position_embeddings": 77}
"""SD3's ``text_encoder`` (CLIP ViT-L/14 text tower with projection)."""

CLIP_G: dict[str, Any] = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                          "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu",
                          "vocab_size": 49408, "max_position_embeddings": 77}
"""SD3's ``text_encoder_2`` (OpenCLIP ViT-bigG/14 text tower with projection)."""

T5_XXL: dict[str, Any] = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
                          "num_heads": 64, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                          "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0, "is_encoder_decoder": False,
                          "use_cache": False}
"""SD3's ``text_encoder_3`` (the T5 v1.1 XXL encoder)."""


@dataclass(frozen=True)
class PipelineSpec:
    """Shapes of every module of the benchmarked ``StableDiffusion3Pipeline`` (tokenizers are built in-process).

    Attributes:
        transformer: ``SD3Transformer2DModel`` kwargs.
        vae: ``AutoencoderKL`` kwargs.
        clip_l / clip_g: ``CLIPTextConfig`` fields of the two CLIP text encoders (with projection).
        t5: ``T5Config`` fields of the T5 encoder.
    """

    transformer: dict[str, Any]
    vae: dict[str, Any]
    clip_l: dict[str, Any]
    clip_g: dict[str, Any]
    t5: dict[str, Any]


SD35_MEDIUM = PipelineSpec(SD35_MEDIUM_TRANSFORMER, SD3_VAE, CLIP_L, CLIP_G, T5_XXL)

TINY = PipelineSpec(
    transformer={"sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
                 "attention_head_dim": 8, "num_attention_heads": 4, "joint_attention_dim": 32,
                 "caption_projection_dim": 32, "pooled_projection_dim": 24, "pos_embed_max_size": 16,
                 "dual_attention_layers": (0,), "qk_norm": "rms_norm"},
    vae={"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (8, 16),
         "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
         "layers_per_block": 1, "norm_num_groups": 4, "sample_size": 32, "scaling_factor": 1.5305,
         "shift_factor": 0.0609, "use_quant_conv": False, "use_post_quant_conv": False},
    clip_l={"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
            "projection_dim": 8, "hidden_act": "quick_gelu", "max_position_embeddings": 77},
    clip_g={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "projection_dim": 16, "hidden_act": "gelu", "max_position_embeddings": 77},
    t5={"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0,
        "is_encoder_decoder": False, "use_cache": False},
)
"""The same module classes and code paths (dual attention, QK-norm, T5) at toy size, for ``--tiny`` on CPU."""

PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0), ("L4", 121.0),
)
"""Dense bf16 tensor-core peaks from NVIDIA data sheets, first matching substring of the device name wins."""

LEGEND = {
    "seconds": "per stage (rollout, score, train) and phase <stage>/<phase>; <stage>/other is the rest of the stage "
               "(SDE step math, noise, bookkeeping, credit, host gaps); CUDA events on GPU, perf_counter on CPU",
    "rollout/transformer": "model evaluations of the rollout (CFG: two rows per sample)",
    "train/transformer_policy": "training forwards with grad; train/transformer_reference: the KL reference forwards",
    "train/backward": "accelerator.backward, checkpointed forwards recomputed inside it",
    "figures": "per timed epoch, then median / min / max; *_utilisation against the data-sheet peak, "
               "*_of_matmul_ceiling against the measured matmul",
    "model FLOPs": "counted FLOPs without recomputation (MFU); hardware FLOPs add the recomputed forwards (HFU); "
                   "useful FLOPs count each distinct training input (state, step, prompt) once",
}
"""What the names in a results file mean (written into it)."""

ALGOS = ("flow_grpo", "tempflow_grpo")
RECIPES = {"flow_grpo": "sd35_medium_flow_grpo", "tempflow_grpo": "sd35_medium_tempflow_grpo"}


@dataclass(frozen=True)
class Workload:
    """One epoch's work for each method, the same batches for both.

    Attributes:
        prompts: prompts per epoch.
        flow_seeds: Flow-GRPO samples per prompt.
        tempflow_seeds / tempflow_children: TempFlow-GRPO initial noises per prompt and children per branch step
            (every step but the last is a branch step).
        rollout_batch_size / train_batch_size / grad_accum: the trainer's batches (equal for both methods).
        overrides: further recipe overrides (the tiny backbone's size and dtype).
    """

    prompts: int
    flow_seeds: int
    tempflow_seeds: int
    tempflow_children: int
    rollout_batch_size: int
    train_batch_size: int
    grad_accum: int
    overrides: tuple[str, ...] = ()

    def recipe_overrides(self, algo: str, out: Path, epochs: int) -> list[str]:
        common = [f"output_dir={out / algo}", "train.resume=false", "train.overlap_rewards=false",
                  f"train.epochs={epochs}", f"train.prompts_per_epoch={self.prompts}",
                  f"train.rollout_batch_size={self.rollout_batch_size}",
                  f"train.train_batch_size={self.train_batch_size}",
                  f"train.gradient_accumulation_steps={self.grad_accum}", "train.inner_epochs=1",
                  "eval.before_after=false", "eval.every=0", *self.overrides]
        if algo == "flow_grpo":
            return [*common, f"algo.num_seeds={self.flow_seeds}"]
        return [*common, f"algo.num_seeds={self.tempflow_seeds}",
                f"algo.plan.options.children={self.tempflow_children}", "algo.plan.options.select=all"]


GPU_WORKLOAD = Workload(prompts=1, flow_seeds=24, tempflow_seeds=4, tempflow_children=6, rollout_batch_size=24,
                        train_batch_size=8, grad_accum=4,
                        overrides=("backbone.num_steps=10", "backbone.dtype=bfloat16", "train.mixed_precision=bf16"))
"""Reference sizes: 24 Flow-GRPO samples per prompt; TempFlow-GRPO N=4 noises x K=6 children at 9 branch steps."""

TINY_WORKLOAD = Workload(prompts=1, flow_seeds=4, tempflow_seeds=2, tempflow_children=2, rollout_batch_size=8,
                         train_batch_size=4, grad_accum=2,
                         overrides=("device=cpu", "backbone.dtype=float32", "train.mixed_precision=no",
                                    "backbone.height=32", "backbone.width=32", "backbone.num_steps=4",
                                    "backbone.max_sequence_length=16", "backbone.lora.rank=4",
                                    "backbone.lora.alpha=8"))


# --- building the model once, from the meta device -------------------------------------------------------------


def _on_meta(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``make()`` with parameters on the meta device (no memory, no initialisation); buffers stay real (CPU)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return make()


def materialize(module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                generator: torch.Generator) -> torch.nn.Module:
    """Allocate a meta-constructed ``module`` directly on ``device`` in ``dtype`` and fill it with random weights.

    Weights of two or more dimensions are drawn from N(0, 1/fan_in) (``fan_in`` = elements of one output row),
    biases are zero and other vectors (norm scales) one; buffers computed at construction (position tables,
    position ids) are kept, moved to ``device``; tied weights (T5's input embeddings) are tied again, since
    construction on the meta device does not tie them.
    """
    torch.nn.Module.to(module, dtype=dtype)  # meta parameters change dtype for free; CPU float buffers are cast
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    module.to_empty(device=device)
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(owner), leaf, value.to(device))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=generator)
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
    if callable(getattr(module, "tie_weights", None)):  # transformers models
        module.tie_weights()
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"{type(module).__name__}: tensors still on the meta device after materialising: {left[:5]}")
    return module.eval()


def build_pipeline(spec: PipelineSpec, device: torch.device, dtype: torch.dtype, *, t5_max_length: int,
                   seed: int = 0) -> Any:
    """A ``StableDiffusion3Pipeline`` of ``spec``'s shapes with random weights, built once on ``device``.

    Every module is constructed on the meta device and materialised on ``device`` (:func:`materialize`), so
    nothing of model size is ever allocated on the host. Tokenizers are word-level ones built in-process (ids
    below every encoder's vocabulary size).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from alignkit.modalities.image.tiny import build_tiny_tokenizer

    tok_l, tok_g = build_tiny_tokenizer(), build_tiny_tokenizer()
    tok_t5 = build_tiny_tokenizer(model_max_length=t5_max_length)

    def clip(tok: Any, fields: dict[str, Any]) -> torch.nn.Module:
        fields = {"vocab_size": len(tok), **fields}
        config = CLIPTextConfig(**fields, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                eos_token_id=tok.eos_token_id)
        return CLIPTextModelWithProjection(config)

    def t5() -> torch.nn.Module:
        fields = {"vocab_size": len(tok_t5), **spec.t5}
        return T5EncoderModel(T5Config(**fields, pad_token_id=tok_t5.pad_token_id, eos_token_id=tok_t5.eos_token_id,
                                       decoder_start_token_id=tok_t5.pad_token_id))

    makers: dict[str, Callable[[], torch.nn.Module]] = {
        "transformer": lambda: SD3Transformer2DModel(**spec.transformer),
        "vae": lambda: AutoencoderKL(**spec.vae),
        "text_encoder": lambda: clip(tok_l, spec.clip_l),
        "text_encoder_2": lambda: clip(tok_g, spec.clip_g),
        "text_encoder_3": t5,
    }
    generator = torch.Generator(device=device).manual_seed(seed)
    modules = {name: materialize(_on_meta(make), device, dtype, generator) for name, make in makers.items()}
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        tokenizer=tok_l, tokenizer_2=tok_g, tokenizer_3=tok_t5, **modules,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def component_sizes(pipe: Any) -> dict[str, dict[str, float]]:
    """Parameters and resident bytes (parameters + buffers) of each module of ``pipe``."""
    out = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            tensors = [*module.parameters(), *module.buffers()]
            out[name] = {"params": sum(p.numel() for p in module.parameters()),
                         "gib": sum(t.numel() * t.element_size() for t in tensors) / GIB}
    return out


# --- FLOPs -------------------------------------------------------------------------------------------------------


def _cpu_attention_mapping() -> dict[Any, Callable[..., int]]:
    """FLOP formulas for the CPU flash-attention kernels, which ``FlopCounterMode`` leaves uncounted (the CUDA
    flash, memory-efficient and cuDNN kernels have formulas in torch)."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping: dict[Any, Callable[..., int]] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query, key, value)

        def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out, query, key, value)

        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return mapping


@dataclass
class FlopCount:
    """FLOPs of one call, by aten op (``FlopCounterMode``'s global table)."""

    by_op: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    @property
    def attention(self) -> int:
        return sum(v for k, v in self.by_op.items() if "attention" in k)


def count_flops(fn: Callable[[], Any]) -> FlopCount:
    """FLOPs of ``fn()`` counted per op by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and
    attention kernels; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    mode = FlopCounterMode(display=False, custom_mapping=_cpu_attention_mapping())
    with mode:
        fn()
    table = mode.get_flop_counts().get("Global", {})
    return FlopCount({str(op): int(n) for op, n in table.items() if n})


_TEXT_SIDE = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def analytic_sd3_flops(transformer: torch.nn.Module, image_tokens: int, text_tokens: int,
                       lora: bool = True) -> dict[str, int]:
    """Closed-form forward FLOPs of one row through an ``SD3Transformer2DModel``: ``{"matmul", "attention"}``.

    Matmuls (2 x in x out per token and linear layer): patch embedding, timestep and pooled-text embeddings, the
    caption projection, per block the adaLN modulations, Q/K/V/output projections of both streams (the last block
    has no text output projection or text MLP), the image-only second attention of dual-attention blocks, the
    4x MLPs, the output norm and projection; LoRA adapters on the attention projections when ``lora``.
    Attention: 4 x Lq x Lk x width per attention call (joint: image + text tokens; dual: image tokens only).
    """
    c = transformer.config
    d = c.num_attention_heads * c.attention_head_dim
    ni, nt, dual = image_tokens, text_tokens, set(c.dual_attention_layers or ())
    p2 = c.patch_size**2
    mm = 2 * ni * c.in_channels * p2 * d  # patch embedding
    mm += 2 * (256 * d + d * d + c.pooled_projection_dim * d + d * d)  # timestep + pooled text embeddings
    mm += 2 * nt * c.joint_attention_dim * c.caption_projection_dim  # context embedder
    attention = 0
    for i in range(c.num_layers):
        last = i == c.num_layers - 1
        mm += 2 * d * (9 * d if i in dual else 6 * d)  # image adaLN
        mm += 2 * d * (2 * d if last else 6 * d)  # text adaLN (continuous in the last block)
        mm += 2 * (4 * ni + (3 if last else 4) * nt) * d * d  # Q/K/V/out, both streams
        attention += 4 * (ni + nt) ** 2 * d
        if i in dual:
            mm += 2 * 4 * ni * d * d
            attention += 4 * ni**2 * d
        mm += 16 * (ni + (0 if last else nt)) * d * d  # MLPs
    mm += 2 * d * 2 * d + 2 * ni * d * p2 * c.out_channels  # output norm and projection
    if lora:
        from peft.tuners.lora import LoraLayer

        for name, module in transformer.named_modules():
            if not isinstance(module, LoraLayer) or not module.lora_A:
                continue
            leaf = name.rsplit(".", 2)
            tokens = nt if any(part in _TEXT_SIDE for part in leaf) else ni
            if ".attn" not in f".{name}":
                raise ValueError(f"analytic count covers LoRA on attention projections only, not {name}")
            for adapter in module.active_adapters:
                r = module.r[adapter]
                mm += 2 * tokens * r * (module.in_features + module.out_features)
    return {"matmul": mm, "attention": attention}


def agreement(counted: int, analytic: int) -> dict[str, Any]:
    """Counted vs closed-form FLOPs; ``ok`` within 0.1%."""
    ratio = counted / analytic if analytic else math.nan
    return {"counted": counted, "analytic": analytic, "ratio": ratio, "ok": abs(ratio - 1) < 1e-3}


# --- timing ------------------------------------------------------------------------------------------------------


class PhaseClock:
    """Time and device memory of named phases inside the stages of an epoch.

    On CUDA each interval is a pair of CUDA events on the current stream, read after one synchronisation at the
    end of the epoch (timing adds no host syncs); on CPU it is ``time.perf_counter``. Phases never overlap
    (starting one inside another is an error); a stage (rollout, score, train) contains phases, and the part of
    a stage outside its phases is reported as ``<stage>/other`` (step math, bookkeeping, host gaps).
    Memory (CUDA only): per phase the peak allocated during it and the allocated / reserved after it.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.active = False
        self._stage: str | None = None
        self._open: tuple[str, Any] | None = None
        self._intervals: list[tuple[str, Any, Any]] = []
        self._stages: list[tuple[str, Any, Any]] = []
        self._memory: dict[str, dict[str, float]] = {}
        self._peak_outside = 0

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def begin_epoch(self) -> None:
        self.active, self._intervals, self._stages, self._memory = True, [], [], {}
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._peak_outside = 0
        self._epoch_start = self._now()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._stage, start = name, self._now()
        try:
            yield
        finally:
            self._stages.append((name, start, self._now()))
            self._stage = None

    def start(self, phase: str) -> None:
        if not self.active:
            return
        if self._open is not None:
            raise RuntimeError(f"phase {phase!r} started inside phase {self._open[0]!r}")
        name = f"{self._stage or 'outside'}/{phase}"
        if self.cuda:
            self._peak_outside = max(self._peak_outside, torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        self._open = (name, self._now())

    def stop(self) -> None:
        if not self.active or self._open is None:
            return
        name, start = self._open
        self._open = None
        self._intervals.append((name, start, self._now()))
        if self.cuda:
            mem = self._memory.setdefault(name, {"peak_allocated_gib": 0.0, "allocated_after_gib": 0.0,
                                                 "reserved_after_gib": 0.0})
            for key, value in (("peak_allocated_gib", torch.cuda.max_memory_allocated()),
                               ("allocated_after_gib", torch.cuda.memory_allocated()),
                               ("reserved_after_gib", torch.cuda.memory_reserved())):
                mem[key] = max(mem[key], value / GIB)
            torch.cuda.reset_peak_memory_stats()

    def wrap(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        """``fn`` timed as ``phase``."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.start(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stop()

        return timed

    def hook(self, module: torch.nn.Module, phase: Callable[[], str]) -> list[Any]:
        """Time every forward of ``module`` as ``phase()`` (evaluated when the forward starts)."""
        pre = module.register_forward_pre_hook(lambda *_: self.start(phase()))
        post = module.register_forward_hook(lambda *_: self.stop())
        return [pre, post]

    def end_epoch(self) -> dict[str, Any]:
        """Seconds per stage and phase (``<stage>/other`` the rest of each stage), and memory, of this epoch."""
        end = self._now()
        if self.cuda:
            torch.cuda.synchronize()
        self.active = False
        seconds: dict[str, float] = {"epoch": self._seconds(self._epoch_start, end)}
        for name, a, b in self._stages:
            seconds[name] = seconds.get(name, 0.0) + self._seconds(a, b)
        for name, a, b in self._intervals:
            seconds[name] = seconds.get(name, 0.0) + self._seconds(a, b)
        for stage, _, _ in self._stages:
            inside = sum(v for k, v in seconds.items() if k.startswith(stage + "/") and not k.endswith("/other"))
            seconds[f"{stage}/other"] = seconds[stage] - inside
        seconds["outside_stages"] = seconds["epoch"] - sum(seconds[s] for s in {s for s, _, _ in self._stages})
        out: dict[str, Any] = {"seconds": seconds}
        if self.cuda:
            peak = max([self._peak_outside, torch.cuda.max_memory_allocated(),
                        *(m["peak_allocated_gib"] * GIB for m in self._memory.values())])
            out["memory"] = {"phases": self._memory, "epoch_peak_allocated_gib": peak / GIB,
                             "epoch_peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
        return out


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def matmul_ceiling(device: torch.device, n: int, dtype: torch.dtype, iters: int = 10) -> dict[str, Any]:
    """TFLOP/s of an ``n``^3 matmul (3 warm-ups, median of ``iters``), the ceiling MFU is also reported against."""
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "median_s": t, "tflops": 2 * n**3 / t / 1e12,
            "timer": "cuda events" if device.type == "cuda" else "perf_counter"}


# --- provenance ----------------------------------------------------------------------------------------------------


def provenance() -> dict[str, Any]:
    """Commit, versions, threads and load, for every results file: :func:`alignkit.provenance.environment` (the
    commit is ``git rev-parse HEAD`` of alignkit's checkout, or ``$ALIGNKIT_COMMIT`` where the tree is a plain copy
    without ``.git``: the device machine, ``bench/device_check.sh`` passes it on) plus cuDNN, the interop threads,
    the load average and the alignkit folder this ran."""
    import alignkit
    from alignkit.provenance import environment

    out = environment()
    out["versions"]["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out.update({"alignkit_path": str(Path(alignkit.__file__).parent),
                "torch_interop_threads": torch.get_num_interop_threads(), "load_average_start": list(os.getloadavg())})
    return out


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def results_name(device: torch.device, tiny: bool) -> str:
    """``gpu_throughput_<device>[_tiny].json``, the device name in lower case, runs of other characters as ``_``."""
    slug = re.sub(r"[^a-z0-9]+", "_", device_name(device).lower()).strip("_")
    return f"gpu_throughput_{slug}{'_tiny' if tiny else ''}.json"


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


# --- one method ------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Settings shared by both methods."""

    tiny: bool
    device: torch.device
    workload: Workload
    epochs: int
    out: Path
    deadline: float | None
    peak: float | None
    ceiling_tflops: float
    profile: bool
    out_path: Path
    results: dict[str, Any] = field(default_factory=dict)

    def time_left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()


def measure_flops(trainer: Any, sampler: Any, rollout: Any) -> dict[str, Any]:
    """FLOPs per row of each kind of work, counted on the first transition of ``rollout``; closed-form checks."""
    from alignkit.types import index_batch

    device = sampler.device
    tr = rollout.transitions.select(torch.tensor([0]))
    cond = index_batch(rollout.cond, rollout.keys.prompt_index[tr.sample_index])
    step = tr.step.to(device)
    transformer = sampler.pipe.transformer
    checkpointing = bool(sampler.cfg.gradient_checkpointing)

    def evaluate() -> None:
        with torch.no_grad():
            sampler.transition(tr.state, step, cond, stochastic=True)

    def reference() -> None:
        with torch.no_grad(), sampler.reference():
            sampler.transition(tr.state, step, cond, stochastic=True)

    def policy_step() -> None:
        dist = sampler.transition(tr.state, step, cond, stochastic=True)
        dist.log_prob(tr.next_state).sum().backward()

    counts = {"model_eval": count_flops(evaluate), "reference_forward": count_flops(reference),
              "decode": count_flops(lambda: sampler.decode(rollout.final_state[:1])),
              "encode_prompt": count_flops(lambda: sampler.encode_prompts(rollout.prompts[:1]))}
    sampler.train(True)
    try:
        transformer.disable_gradient_checkpointing()
        counts["policy_forward_backward"] = count_flops(policy_step)
        if checkpointing:
            transformer.enable_gradient_checkpointing()
            counts["policy_forward_backward_recomputed"] = count_flops(policy_step)
        else:
            counts["policy_forward_backward_recomputed"] = counts["policy_forward_backward"]
    finally:
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        sampler.train(False)
        trainer.optimizer.zero_grad(set_to_none=True)

    rows = 2 if sampler.do_cfg else 1
    p = transformer.config.patch_size
    image_tokens = (tr.state.shape[-2] // p) * (tr.state.shape[-1] // p)
    text_tokens = int(cond["prompt_embeds"].shape[1])
    policy = analytic_sd3_flops(transformer, image_tokens, text_tokens, lora=True)
    base = analytic_sd3_flops(transformer, image_tokens, text_tokens, lora=False)
    checks = {
        "model_eval_total": agreement(counts["model_eval"].total, rows * (policy["matmul"] + policy["attention"])),
        "model_eval_attention": agreement(counts["model_eval"].attention, rows * policy["attention"]),
        "reference_forward_total": agreement(counts["reference_forward"].total,
                                             rows * (base["matmul"] + base["attention"])),
    }
    bad = [k for k, v in checks.items() if not v["ok"]]
    if bad:
        logger.warning("FLOP counter disagrees with the closed form for %s: %s", bad, {k: checks[k] for k in bad})
    train_model = counts["policy_forward_backward"].total + counts["reference_forward"].total
    train_hardware = counts["policy_forward_backward_recomputed"].total + counts["reference_forward"].total
    return {
        "per_row": {k: v.total for k, v in counts.items()},
        "by_op": {k: v.by_op for k, v in counts.items()},
        "per_trained_transition_model": train_model,
        "per_trained_transition_hardware": train_hardware,
        "recompute_per_trained_transition": train_hardware - train_model,
        "cfg_rows_per_eval": rows, "image_tokens": image_tokens, "text_tokens": text_tokens,
        "analytic_per_transformer_row": {"with_lora": policy, "without_lora": base},
        "checks": checks, "attention_counted": checks["model_eval_attention"]["ok"],
    }


def profile_top_ops(trainer: Any, sampler: Any, rollout: Any, workload: Workload, top: int = 12) -> dict[str, Any]:
    """A ``torch.profiler`` capture of one rollout batch evaluation and one training minibatch (policy forward and
    backward, reference forward); the top ops by self device time (self CPU time on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    from alignkit.types import index_batch

    device = sampler.device
    n = len(rollout.transitions)

    def rows(b: int) -> Any:
        return rollout.transitions.select(torch.arange(b) % n)

    def cond_of(tr: Any) -> Any:
        return index_batch(rollout.cond, rollout.keys.prompt_index[tr.sample_index])

    ev, mb = rows(workload.rollout_batch_size), rows(workload.train_batch_size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        with torch.no_grad():
            sampler.transition(ev.state, ev.step.to(device), cond_of(ev), stochastic=True)
        sampler.train(True)
        dist = sampler.transition(mb.state, mb.step.to(device), cond_of(mb), stochastic=True)
        dist.log_prob(mb.next_state).mean().backward()
        with torch.no_grad(), sampler.reference():
            sampler.transition(mb.state, mb.step.to(device), cond_of(mb), stochastic=True)
        sampler.train(False)
        if device.type == "cuda":
            torch.cuda.synchronize()
    trainer.optimizer.zero_grad(set_to_none=True)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return {"captured": f"one rollout batch ({workload.rollout_batch_size} rows) + one training minibatch "
                        f"({workload.train_batch_size} rows)", "sorted_by": key, "wall_s": time.perf_counter() - t0,
            "top_ops": [{"op": e.key, "calls": e.count, "self_ms": getattr(e, key) / 1e3,
                         "cpu_total_ms": e.cpu_time_total / 1e3,
                         **({"device_total_ms": e.device_time_total / 1e3} if device.type == "cuda" else {})}
                        for e in events]}


def measure(algo: str, pipe: Any, run: Run) -> dict[str, Any]:
    """One warm-up epoch and ``run.epochs`` timed epochs of ``algo`` (rollout, reward, credit, update) on ``pipe``."""
    from alignkit.compose import load_run_config
    from alignkit.modalities.image.sd3 import SD3Sampler
    from alignkit.reward_set import RewardSet, RewardTerm
    from alignkit.rewards.compression import JpegCompressibility
    from alignkit.trainer import Trainer

    overrides = run.workload.recipe_overrides(algo, run.out, run.epochs + 1)
    cfg = load_run_config(RECIPES[algo], overrides)
    clock = PhaseClock(run.device)
    sampler = SD3Sampler(pipe, cfg.backbone, step_kind=cfg.algo.step_kind, noise_level=cfg.algo.noise_level,
                         device=run.device)
    reward = RewardSet([RewardTerm("jpeg", clock.wrap(JpegCompressibility(), "reward"), 1.0)])
    trainer = Trainer(cfg, sampler=sampler, reward_set=reward, tensorboard=False)
    hooks = clock.hook(pipe.transformer, lambda: "transformer" if clock._stage == "rollout" else
                       ("transformer_policy" if torch.is_grad_enabled() else "transformer_reference"))
    sampler.decode = clock.wrap(sampler.decode, "vae_decode")
    sampler.encode_prompts = clock.wrap(sampler.encode_prompts, "text_encoders")
    trainer.accelerator.backward = clock.wrap(trainer.accelerator.backward, "backward")
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper holds torch's
    hooks += [optimizer.register_step_pre_hook(lambda *_: clock.start("optimizer_step")),
              optimizer.register_step_post_hook(lambda *_: clock.stop())]
    result: dict[str, Any] = {"recipe": RECIPES[algo], "overrides": overrides, "epochs": []}
    run.results["algos"][algo] = result
    last = None
    try:
        for e in range(run.epochs + 1):
            if e > 0 and last is not None and run.time_left() < last["seconds"]["epoch"] * 1.2:
                result["stopped_early"] = (f"deadline: {run.time_left():.0f} s left, an epoch takes "
                                           f"{last['seconds']['epoch']:.0f} s")
                logger.warning("%s: %s; %d timed epochs", algo, result["stopped_early"], e - 1)
                break
            clock.begin_epoch()
            with clock.stage("rollout"):
                rolled = trainer.rollout(e)
                rollout = rolled.rollout
            with clock.stage("score"):
                gathered = trainer.score(rolled)
                credit = trainer.assign_credit(gathered).credit
            with clock.stage("train"):
                stats = trainer.optimize(rollout, gathered, credit, e)
            last = clock.end_epoch()
            trained = torch.nonzero(credit.mask).flatten()
            last.update({
                "warmup": e == 0, "samples": len(rollout.keys), "nfe": rollout.nfe, "prompts": len(rollout.prompts),
                "trained_transitions": len(trained) * cfg.train.inner_epochs,
                "distinct_train_inputs": stats["train/distinct_inputs"],  # the update's own count (inner epochs summed)
                "train_stats": {k.removeprefix("train/"): v for k, v in stats.items()},
            })
            if stats["train/skipped_steps"] or not math.isfinite(stats["train/loss"]):
                logger.warning("%s epoch %d: %s skipped optimizer steps, loss %s: the update timing is not that of "
                               "real steps", algo, e, stats["train/skipped_steps"], stats["train/loss"])
            result["epochs"].append(last)
            logger.info("%s epoch %d%s: %.2f s (rollout %.2f, score %.2f, train %.2f)", algo, e,
                        " (warm-up)" if e == 0 else "",
                        *(last["seconds"][k] for k in ("epoch", "rollout", "score", "train")))
            write_results(run)
        result["flops"] = measure_flops(trainer, sampler, rollout)
        if run.profile and run.time_left() > 30:
            result["profile"] = profile_top_ops(trainer, sampler, rollout, run.workload)
        elif run.profile:
            result["profile"] = {"skipped": f"deadline: {run.time_left():.0f} s left"}
        result.update(summarize_algo(result, run))
        write_results(run)
    finally:
        for h in hooks:
            h.remove()
        release(trainer, pipe)
    return result


def summarize_algo(result: dict[str, Any], run: Run) -> dict[str, Any]:
    """Medians and ranges over the timed epochs: seconds, throughput, FLOPs, MFU / HFU, memory."""
    timed = [e for e in result["epochs"] if not e["warmup"]]
    if not timed:
        return {"summary_error": "no timed epoch finished"}
    f = result["flops"]
    per = f["per_row"]

    def epoch_figures(e: dict[str, Any]) -> dict[str, float]:
        s = e["seconds"]
        rollout_flops = (e["nfe"] * per["model_eval"] + e["samples"] * per["decode"]
                         + e["prompts"] * per["encode_prompt"])
        train_model = e["trained_transitions"] * f["per_trained_transition_model"]
        train_hw = e["trained_transitions"] * f["per_trained_transition_hardware"]
        train_useful = e["distinct_train_inputs"] * f["per_trained_transition_model"]
        out = {"rollout_images_per_s": e["samples"] / s["rollout"],
               "rollout_model_evals_per_s": e["nfe"] / s["rollout"],
               "train_transitions_per_s": e["trained_transitions"] / s["train"],
               "epoch_samples_per_s": e["samples"] / s["epoch"],
               "rollout_tflops_per_s": rollout_flops / s["rollout"] / 1e12,
               "train_model_tflops_per_s": train_model / s["train"] / 1e12,
               "train_hardware_tflops_per_s": train_hw / s["train"] / 1e12,
               "train_useful_tflops_per_s": train_useful / s["train"] / 1e12,
               "epoch_model_tflops_per_s": (rollout_flops + train_model) / s["epoch"] / 1e12,
               "epoch_hardware_tflops_per_s": (rollout_flops + train_hw) / s["epoch"] / 1e12}
        for key in [k for k in out if k.endswith("tflops_per_s")]:
            stem = key.removesuffix("_tflops_per_s")
            if run.peak:
                out[f"{stem}_utilisation"] = out[key] / run.peak
            out[f"{stem}_of_matmul_ceiling"] = out[key] / run.ceiling_tflops
        return out

    figures = [epoch_figures(e) for e in timed]
    seconds = {k: summarize([e["seconds"][k] for e in timed]) for k in timed[0]["seconds"]}
    summary: dict[str, Any] = {
        "timed_epochs": len(timed),
        "workload": {k: timed[0][k] for k in ("prompts", "samples", "nfe", "trained_transitions",
                                              "distinct_train_inputs")},
        "seconds": seconds,
        "figures": {k: summarize([fig[k] for fig in figures]) for k in figures[0]},
        "first_ratio_warmup": result["epochs"][0]["train_stats"].get("first_ratio"),
    }
    if "memory" in timed[0]:
        summary["memory_peak_allocated_gib"] = max(e["memory"]["epoch_peak_allocated_gib"] for e in timed)
        summary["memory_peak_reserved_gib"] = max(e["memory"]["epoch_peak_reserved_gib"] for e in timed)
        phases = {name for e in timed for name in e["memory"]["phases"]}
        summary["memory_phases_gib"] = {  # the largest of the timed epochs
            name: {k: max(e["memory"]["phases"].get(name, {}).get(k, 0.0) for e in timed)
                   for k in ("peak_allocated_gib", "allocated_after_gib", "reserved_after_gib")}
            for name in sorted(phases)}
    fig = summary["figures"]
    stem = "utilisation" if run.peak else "of_matmul_ceiling"
    logger.info("%s: %.2f images/s rollout, %.1f transitions/s training; %s: rollout %s, train %s (HFU %s, useful %s)",
                result["recipe"], fig["rollout_images_per_s"]["median"], fig["train_transitions_per_s"]["median"],
                "MFU" if run.peak else "of the matmul ceiling (no data-sheet peak)",
                *(f"{100 * fig[f'{k}_{stem}']['median']:.1f}%" for k in ("rollout", "train_model", "train_hardware",
                                                                          "train_useful")))
    return summary


def release(trainer: Any, pipe: Any) -> None:
    """Give the shared pipeline back as it was built: no accelerate autocast wrapper, no LoRA layers."""
    from accelerate.utils import extract_model_from_parallel

    extract_model_from_parallel(pipe.transformer, keep_fp32_wrapper=False)
    pipe.transformer.unload_lora()
    trainer.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_results(run: Run) -> Path:
    path = run.out_path
    run.results["provenance"]["load_average_end"] = list(os.getloadavg())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run.results, indent=1, default=str))
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random SD3 on CPU (checks every CPU code path)")
    parser.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after the warm-up epoch (>= 3)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak dense bf16 TFLOP/s for MFU")
    parser.add_argument("--matmul-size", type=int, default=None, help="n of the n^3 matmul ceiling (8192; tiny 256)")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="stop starting timed epochs that would end later than this many seconds from start")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's on GPU; 1 with --tiny, as the tests use)")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler capture")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench" / "results",
                        help="folder of the results JSON, named after the device (default bench/results)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logger.setLevel(logging.INFO)
    if args.epochs < 3:
        parser.error(f"--epochs={args.epochs}: the median and range need at least 3 timed epochs; "
                     "pass --epochs 3 or more")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: the SD3.5-Medium-shaped run needs a GPU; pass --tiny for the CPU check")
    if args.threads is not None or args.tiny:
        torch.set_num_threads(args.threads or 1)
    start = time.monotonic()
    device = torch.device("cpu") if args.tiny else torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float32 if args.tiny else torch.bfloat16
    run = Run(tiny=args.tiny, device=device, workload=TINY_WORKLOAD if args.tiny else GPU_WORKLOAD,
              epochs=args.epochs, out=Path(tempfile.mkdtemp(prefix="alignkit_gpu_throughput_")),
              deadline=start + args.deadline_s if args.deadline_s else None, peak=peak_tflops(device, args.peak_tflops),
              ceiling_tflops=0.0, profile=not args.no_profile,
              out_path=args.out_dir / results_name(device, args.tiny))
    run.results = {"provenance": provenance(), "device": device_name(device), "tiny": args.tiny,
                   "peak_tflops_datasheet": run.peak, "workload": run.workload.__dict__, "legend": LEGEND,
                   "algos": {}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        run.results["device_properties"] = {"memory_gib": props.total_memory / GIB,
                                            "multiprocessors": props.multi_processor_count,
                                            "capability": f"{props.major}.{props.minor}"}
    ceiling = matmul_ceiling(device, args.matmul_size or (256 if args.tiny else 8192), dtype)
    run.ceiling_tflops = ceiling["tflops"]
    run.results["matmul_ceiling"] = ceiling
    logger.info("matmul ceiling: %.1f TFLOP/s (%d^3 %s)", ceiling["tflops"], ceiling["n"], ceiling["dtype"])

    t0 = time.perf_counter()
    spec = TINY if args.tiny else SD35_MEDIUM
    t5_len = 16 if args.tiny else 128  # the recipes' backbone.max_sequence_length
    pipe = build_pipeline(spec, device, dtype, t5_max_length=max(t5_len, 77))
    if device.type == "cuda":
        torch.cuda.synchronize()
    sizes = component_sizes(pipe)
    text = ("text_encoder", "text_encoder_2", "text_encoder_3")
    run.results["model"] = {
        "built": f"meta device -> {device.type}, {str(dtype).removeprefix('torch.')}, once for both methods",
        "build_s": time.perf_counter() - t0, "components": sizes,
        "text_encoders_gib": sum(sizes[k]["gib"] for k in text),
        "note": "real-size CLIP-L, CLIP-G and T5-XXL encoders stay on the device throughout: every memory "
                "figure includes them" if not args.tiny else "tiny shapes",
    }
    if device.type == "cuda":
        run.results["model"]["allocated_after_build_gib"] = torch.cuda.memory_allocated() / GIB
    logger.info("built in %.1f s: %s", run.results["model"]["build_s"],
                ", ".join(f"{k} {v['params'] / 1e6:.0f}M" for k, v in sizes.items()))
    try:
        for algo in args.algos:
            if run.time_left() < 20:
                run.results["algos"][algo] = {"skipped": f"deadline: {run.time_left():.0f} s left"}
                logger.warning("%s skipped: deadline", algo)
                continue
            measure(algo, pipe, run)
            run.profile = False  # one capture per run: both methods run the same model
            gc.collect()  # the method's trainer, rollout and optimizer state
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        run.results["wall_s"] = time.monotonic() - start
        run.results["process_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        path = write_results(run)
        logger.info("written %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
