"""What every diffusers flow-matching adapter shares: loading, LoRA, the reference model, checkpoints.

Image (SD3, FLUX), video (Wan) and audio adapters subclass :class:`DiffusersFlowSampler` and add only
prompt encoding, the guided velocity, initial noise and decoding.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import save_file

from alignkit.config import BackboneConfig, ConfigError
from alignkit.flow import FlowMatchingSampler, randn
from alignkit.fsdp import module_state
from alignkit.interfaces import EvalSettings
from alignkit.modalities.policy import (
    PEFT_LAYOUT,
    LoraLayout,
    PolicyModule,
    inject_peft_lora,
    lora_settings,
    save_peft_adapter,
)
from alignkit.registry import SHIPPED_MODELS

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"

BuiltinBuilder = Callable[[], Any]
BUILTIN_PIPELINES: dict[str, BuiltinBuilder] = {}
"""``builtin:<name>`` tiny random pipelines: a builder returning a pipeline, built offline, saved to the cache
and loaded back. Pretrained folders shipped in the package (the worlds' models) are found through
:data:`alignkit.registry.SHIPPED_MODELS` instead."""


def register_builtin(name: str) -> Callable[[BuiltinBuilder], BuiltinBuilder]:
    """Register the tiny random pipeline ``builtin:<name>``."""

    def decorator(fn: BuiltinBuilder) -> BuiltinBuilder:
        if name in BUILTIN_PIPELINES:
            raise KeyError(f"builtin pipeline {name!r} is already registered")
        BUILTIN_PIPELINES[name] = fn
        return fn

    return decorator


def is_shipped(name: str) -> bool:
    """Whether ``builtin:<name>`` is a pretrained folder shipped in the package (an ``alignkit.models`` entry)."""
    return name in SHIPPED_MODELS


def builtin_cache_dir() -> Path:
    return Path(os.environ.get("ALIGNKIT_CACHE", Path.home() / ".cache" / "alignkit"))


def resolve_pretrained(pretrained: str) -> str:
    """Turn ``builtin:<name>`` into a local pipeline folder (built and saved once); pass others through.

    Builtin pipelines are saved with ``save_pretrained`` and always loaded through ``from_pretrained``,
    so the demo exercises the same loading code as a hub id or a user's folder.
    """
    if not pretrained.startswith("builtin:"):
        return pretrained
    name = pretrained.removeprefix("builtin:")
    if is_shipped(name):  # shipped weights: a pipeline folder inside the package
        return str(SHIPPED_MODELS.get(name)())
    if name not in BUILTIN_PIPELINES:
        valid = sorted({*BUILTIN_PIPELINES, *SHIPPED_MODELS.names()})
        raise ValueError(
            f"backbone.pretrained={pretrained!r}: no builtin pipeline {name!r}; "
            f"valid: {', '.join('builtin:' + n for n in valid)}"
        )
    folder = builtin_cache_dir() / name
    if (folder / "model_index.json").exists():
        return str(folder)
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        _build_builtin(name, folder)
        return str(folder)
    # transformers writes a model's files on rank 0 only when a process group exists: rank 0 builds, the
    # others wait for it (and the barrier is reached even when the build fails)
    try:
        if dist.get_rank() == 0:
            _build_builtin(name, folder)
    finally:
        dist.barrier()
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"backbone.pretrained={pretrained!r}: process 0 did not build {folder} (see its log), or this machine "
            "does not share that folder; build it once in one process (alignkit train with this recipe) first"
        )
    return str(folder)


def _build_builtin(name: str, folder: Path) -> None:
    """Build builtin pipeline ``name`` into a private temporary folder and rename it to ``folder``."""
    logger.info("building builtin:%s into %s", name, folder)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    BUILTIN_PIPELINES[name]().save_pretrained(tmp, safe_serialization=True)
    if folder.exists():  # another launch finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(folder)


def looks_like_hub_id(source: str) -> bool:
    """``org/name`` (one slash, no path prefix)."""
    return not source.startswith((".", "/", "~")) and source.count("/") == 1 and " " not in source


def local_pipeline_folder(pretrained: str) -> Path | None:
    """The local pipeline folder ``pretrained`` names, when it can be read without loading or building it.

    A local folder or a shipped ``builtin:`` model (with ``model_index.json``), or a tiny ``builtin:`` pipeline
    already built into the cache; None for a hub id, an unbuilt builtin or a shipped model whose weights are
    not built yet (loading raises with the command that builds them).
    """
    if pretrained.startswith("builtin:"):
        name = pretrained.removeprefix("builtin:")
        if is_shipped(name):
            try:
                return Path(resolve_pretrained(pretrained))
            except FileNotFoundError:
                return None
        folder = builtin_cache_dir() / name
        return folder if (folder / "model_index.json").is_file() else None
    folder = Path(pretrained).expanduser()
    return folder if (folder / "model_index.json").is_file() else None


def component_config(pretrained: str, component: str) -> dict[str, Any]:
    """``<component>/config.json`` of the pipeline ``pretrained`` names when it is readable without loading
    (:func:`local_pipeline_folder`), else ``{}``: shape checks before any model loads fall back to the released
    checkpoint's values and run again on the loaded pipeline."""
    folder = local_pipeline_folder(pretrained)
    path = None if folder is None else folder / component / "config.json"
    return json.loads(path.read_text()) if path is not None and path.is_file() else {}


def resolution_shift_kwargs(scheduler_config: Any, num_steps: int, image_seq_len: int) -> dict[str, Any]:
    """``set_timesteps`` arguments of the FLUX / Qwen-Image pipelines: sigmas ``linspace(1, 1/N, N)`` and the
    resolution-dependent shift ``mu`` of ``image_seq_len`` packed latent tokens (``calculate_shift`` with the
    scheduler's ``base/max_image_seq_len`` and ``base/max_shift``)."""
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    cfg = scheduler_config
    mu = calculate_shift(
        image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15),
    )
    return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps), "mu": mu}


def absent_components(source: str) -> dict[str, None]:
    """Components a local pipeline folder saved as absent (``[null, null]``), to pass as None on loading.

    SD3 without its T5 encoder is saved this way; ``from_pretrained`` needs them named explicitly.
    """
    index = Path(source).expanduser() / "model_index.json"
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    return {k: None for k, v in entries.items() if isinstance(v, list) and v and all(x is None for x in v)}


def load_pipeline(pipeline_class: type, cfg: BackboneConfig) -> Any:
    """``pipeline_class.from_pretrained`` of a hub id or a local folder, as users load it."""
    source = resolve_pretrained(cfg.pretrained)
    if not Path(source).expanduser().exists() and not looks_like_hub_id(source):
        raise FileNotFoundError(
            f"backbone.pretrained={cfg.pretrained!r}: no such folder, and not a hub id 'org/name'; "
            "give an existing pipeline folder (one with model_index.json) or a hub id"
        )
    kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype]}
    kwargs.update(absent_components(source))
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.variant:
        kwargs["variant"] = cfg.variant
    if cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    logger.info("loading %s from %s", pipeline_class.__name__, source)
    return pipeline_class.from_pretrained(source, **kwargs)


def add_lora(module: torch.nn.Module, config: Any) -> None:
    """Add the peft LoRA adapter ``config`` (named ``default``) to ``module``.

    diffusers models with its ``PeftAdapterMixin`` (SD3, FLUX, Wan) use ``add_adapter``; models without it
    (``StableAudio3DiTModel``) get the same injection through peft
    (:func:`alignkit.modalities.policy.inject_peft_lora`), so peft's state-dict helpers work on both.
    """
    if callable(getattr(module, "add_adapter", None)):
        module.add_adapter(config)
        return
    inject_peft_lora(module, config)


class DiffusersFlowSampler(PolicyModule, FlowMatchingSampler):
    """A flow-matching diffusers pipeline whose ``transformer`` is the policy.

    Frozen parts (text encoders, VAE, base transformer weights) stay in ``cfg.dtype``; trainable
    parameters (LoRA by default) are float32. The reference model for the KL term is the same
    transformer with its adapter disabled (or a frozen copy under full fine-tuning).
    """

    lora_layouts: ClassVar[tuple[LoraLayout, ...]] = (LoraLayout(LORA_WEIGHTS_NAME, "transformer."), PEFT_LAYOUT)
    """diffusers' ``save_lora_weights`` file first; peft's folder for pipelines without diffusers' LoRA loader
    (and Stable Audio 3 checkpoints written before: ``pytorch_lora_weights.safetensors`` keyed ``transformer.``)."""
    full_weights_folder: ClassVar[str] = "transformer"
    valid_options: ClassVar[tuple[str, ...]] = ()
    """``backbone.options`` keys the adapter reads (:meth:`check_config` refuses others)."""

    @classmethod
    def check_config(cls, cfg: BackboneConfig, path: str = "backbone") -> list[str]:
        """Unknown ``backbone.options`` keys (they would be ignored); adapters with more to check override it."""
        unknown = sorted(set(cfg.options) - set(cls.valid_options))
        if not unknown:
            return []
        valid = ", ".join(cls.valid_options) or "none"
        return [f"{path}.options has unknown keys {unknown} for {cls.__name__}; valid keys: {valid} (remove them)"]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Per-sample latent shape (without the batch dimension) of the initial noise."""
        raise NotImplementedError(f"{type(self).__name__} must define latent_shape or override initial_state")

    def initial_state(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """``[B, *latent_shape]`` float32 standard normal noise, row ``b`` drawn from ``generators[b]``."""
        return randn((len(generators), *self.latent_shape), generators, self.device, torch.float32)

    pipeline_class: ClassVar[type]
    modality: ClassVar[str] = "image"

    def __init__(
        self, pipe: Any, cfg: BackboneConfig, *, step_kind: str, noise_level: float, device: torch.device
    ) -> None:
        super().__init__(step_kind=step_kind, noise_level=noise_level)
        self.pipe = pipe
        self.cfg = cfg
        self._device = torch.device(device)
        self.dtype = DTYPES[cfg.dtype]
        pipe.to(self._device)
        pipe.set_progress_bar_config(disable=True)
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval()
        self._configure_vae(getattr(pipe, "vae", None))
        self._init_policy(pipe.transformer, cfg.lora, inject=add_lora)
        if cfg.gradient_checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        self._sigmas, self._timesteps = self._build_schedule()

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def from_config(
        cls, cfg: BackboneConfig, *, step_kind: str, noise_level: float, device: torch.device | str
    ) -> DiffusersFlowSampler:
        """Check ``cfg`` (:meth:`check_config`), load the pipeline named by ``cfg.pretrained`` and wrap it."""
        problems = cls.check_config(cfg)
        if problems:
            raise ConfigError(problems)
        pipe = load_pipeline(cls.pipeline_class, cfg)
        return cls(pipe, cfg, step_kind=step_kind, noise_level=noise_level, device=torch.device(device))

    def _configure_vae(self, vae: torch.nn.Module | None) -> None:
        """Apply ``backbone.vae_tiling`` / ``backbone.vae_slicing`` (an error when the VAE lacks them)."""
        for key, method in (("vae_tiling", "enable_tiling"), ("vae_slicing", "enable_slicing")):
            if not getattr(self.cfg, key):
                continue
            if vae is None or not callable(getattr(vae, method, None)):
                raise ValueError(
                    f"backbone.{key}=true: the VAE ({type(vae).__name__}) has no {method}(); set backbone.{key}=false"
                )
            getattr(vae, method)()

    def _build_schedule(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigmas [N + 1], timesteps [N])`` exactly as the pipeline computes them."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        scheduler.set_timesteps(self.cfg.num_steps, device="cpu", **self._schedule_kwargs())
        return scheduler.sigmas.float().clone(), scheduler.timesteps.float().clone()

    def _schedule_kwargs(self) -> dict[str, Any]:
        return {}

    # --- evaluation settings -----------------------------------------------------------------------------

    eval_setting_names: ClassVar[frozenset[str]] = frozenset({"num_steps", "guidance", "height", "width"})

    @classmethod
    def supported_eval_settings(cls) -> frozenset[str]:
        """Steps and guidance for every modality; height and width for images and video (audio has none: its
        length is an adapter option)."""
        if cls.modality in ("image", "video"):
            return cls.eval_setting_names
        return cls.eval_setting_names - {"height", "width"}

    @classmethod
    def check_eval_settings(cls, settings: EvalSettings, cfg: BackboneConfig | None = None) -> list[str]:
        """Unsupported settings, then what :meth:`check_config` finds with the evaluation values in place (e.g.
        Wan's frame and size multiples)."""
        problems = super().check_eval_settings(settings, cfg)
        if problems or cfg is None:
            return problems
        return cls.changed_backbone_problems(cls.check_config, settings, cfg)

    @contextlib.contextmanager
    def _evaluation_overrides(self, settings: EvalSettings) -> Iterator[None]:
        """Sample with ``settings``: the backbone settings the adapter reads (``self.cfg``) and the schedule built
        from them are swapped for the context and restored after it."""
        saved = self.cfg, self._sigmas, self._timesteps
        try:
            self.cfg = settings.applied_to(self.cfg)
            self._sigmas, self._timesteps = self._build_schedule()
            yield
        finally:
            self.cfg, self._sigmas, self._timesteps = saved

    # --- Sampler interface ----------------------------------------------------------------------------

    @property
    def sigmas(self) -> torch.Tensor:
        return self._sigmas

    @property
    def timesteps(self) -> torch.Tensor:
        """``[N]`` model timesteps (``sigma * num_train_timesteps``)."""
        return self._timesteps

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def transformer(self) -> torch.nn.Module:
        """The transformer forwards use (:attr:`alignkit.modalities.policy.PolicyModule.policy`)."""
        return self.policy

    # --- checkpoints ----------------------------------------------------------------------------------

    def save_trainable(self, directory: Path, params: dict[str, torch.Tensor] | None = None) -> None:
        """Write the trainable weights as a stock diffusers pipeline loads them, at full strength.

        LoRA, pipelines with diffusers' LoRA loader (SD3, FLUX, Wan): ``save_lora_weights`` with the adapter's
        settings (rank, alpha, targets) in the file's ``lora_adapter_metadata`` header, so that
        ``pipe.load_lora_weights(directory)`` rebuilds the adapter with its alpha (without them diffusers
        assumes alpha = rank, i.e. scale 1). Pipelines without it (``StableAudio3Pipeline``): peft's adapter
        folder (``adapter_config.json`` + ``adapter_model.safetensors``); ``PeftModel.from_pretrained(
        pipe.transformer, directory)`` adds it to the pipeline's transformer in place.
        Full fine-tuning: the transformer's ``save_pretrained`` layout in ``transformer/`` (``config.json`` and
        one ``diffusion_pytorch_model.safetensors``); ``<TransformerClass>.from_pretrained`` loads it.
        """
        directory.mkdir(parents=True, exist_ok=True)
        transformer = self.pipe.transformer
        if self.cfg.lora.enabled:
            if not hasattr(self.pipeline_class, "save_lora_weights"):
                save_peft_adapter(transformer, directory, params)
                return
            from peft.utils import get_peft_model_state_dict

            self.pipeline_class.save_lora_weights(
                directory, transformer_lora_layers=get_peft_model_state_dict(transformer, state_dict=params),
                transformer_lora_adapter_metadata=lora_settings(transformer), safe_serialization=True,
            )
        elif params is None:
            transformer.save_pretrained(directory / self.full_weights_folder, safe_serialization=True)
        else:  # gathered from the shards: the same layout, written from the given tensors
            target = directory / self.full_weights_folder
            target.mkdir(parents=True, exist_ok=True)
            transformer.save_config(target)
            state = {k: v.contiguous() for k, v in module_state(transformer, params).items()}
            save_file(state, str(target / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

    # --- helpers for subclasses -----------------------------------------------------------------------

    @property
    def do_cfg(self) -> bool:
        """Whether classifier-free guidance is on (``guidance_scale > 1``), in sampling and in training."""
        return self.cfg.guidance_scale > 1.0

    def guide(self, out: torch.Tensor) -> torch.Tensor:
        """CFG of a batched prediction ``[2B, ...]`` (unconditional rows first) -> ``[B, ...]``."""
        uncond, text = out.chunk(2)
        return uncond + self.cfg.guidance_scale * (text - uncond)

    def model_timestep(self, step: torch.Tensor) -> torch.Tensor:
        """``[B]`` model timesteps for schedule indices ``step``."""
        return self._timesteps.to(self._device)[step.cpu()].to(self._device)

    def vae_decode_normalized(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, F, h, w]`` normalised per channel by the VAE's ``latents_mean`` / ``latents_std``
        (Wan, Qwen-Image: 5-D causal VAEs) to pixels ``[B, 3, F', H, W]`` in [0, 1] (float32)."""
        vae = self.pipe.vae
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, device=latents.device, dtype=vae.dtype).view(shape)
        std = torch.tensor(vae.config.latents_std, device=latents.device, dtype=vae.dtype).view(shape)
        pixels = vae.decode(latents.to(vae.dtype) * std + mean, return_dict=False)[0]  # [B, 3, F', H, W] in [-1, 1]
        return (pixels.float() / 2 + 0.5).clamp(0, 1)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents ``[B, C, h, w]`` to images ``[B, 3, H, W]`` in [0, 1] (float32)."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + shift
        image = vae.decode(latents, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)
