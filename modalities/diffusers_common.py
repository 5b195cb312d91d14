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
from safetensors.torch import load_file, save_file

from alignkit.config import BackboneConfig, ConfigError
from alignkit.flow import FlowMatchingSampler, randn
from alignkit.fsdp import module_state
from alignkit.interfaces import EvalSettings
from alignkit.modalities.policy import PolicyModule, float_trainable, inject_peft_lora
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
        """LoRA: diffusers' ``save_lora_weights`` format (``pipe.load_lora_weights(directory)`` loads it).

        Pipelines without diffusers' LoRA loader (e.g. ``StableAudio3Pipeline``) get the same file, keys
        prefixed ``transformer.``, plus peft's ``adapter_config.json``: load it with
        :meth:`load_trainable`, or with peft (``inject_adapter_in_model`` + ``set_peft_model_state_dict``).
        Full fine-tuning: the transformer's ``save_pretrained`` layout (``config.json`` and one
        ``diffusion_pytorch_model.safetensors`` in ``transformer/``; ``from_pretrained`` loads it).
        """
        directory.mkdir(parents=True, exist_ok=True)
        transformer = self.pipe.transformer
        if self.cfg.lora.enabled:
            from peft.utils import get_peft_model_state_dict

            layers = get_peft_model_state_dict(transformer, state_dict=params)
            if hasattr(self.pipeline_class, "save_lora_weights"):
                self.pipeline_class.save_lora_weights(
                    directory, transformer_lora_layers=layers, safe_serialization=True
                )
            else:
                save_file({f"transformer.{k}": v.contiguous() for k, v in layers.items()},
                          str(directory / LORA_WEIGHTS_NAME))
                transformer.peft_config["default"].save_pretrained(str(directory))
        elif params is None:
            transformer.save_pretrained(directory / "transformer", safe_serialization=True)
        else:  # gathered from the shards: the same layout, written from the given tensors
            target = directory / "transformer"
            target.mkdir(parents=True, exist_ok=True)
            transformer.save_config(target)
            state = {k: v.contiguous() for k, v in module_state(transformer, params).items()}
            save_file(state, str(target / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

    def load_trainable(self, directory: Path) -> None:
        transformer = self.pipe.transformer
        if self.cfg.lora.enabled:
            from peft.utils import set_peft_model_state_dict

            path = directory / LORA_WEIGHTS_NAME
            state = load_file(path)
            state = {k.removeprefix("transformer."): v for k, v in state.items()}
            result = set_peft_model_state_dict(transformer, state)
            unexpected = getattr(result, "unexpected_keys", []) or []
            if unexpected:
                raise ValueError(f"{path}: {len(unexpected)} LoRA keys do not match the model, e.g. {unexpected[:3]}")
        else:
            from safetensors.torch import load_model

            files = sorted((directory / "transformer").glob("*.safetensors"))
            if len(files) != 1:
                raise FileNotFoundError(f"expected one safetensors file in {directory / 'transformer'}, got {files}")
            load_model(transformer, files[0], strict=True)
        float_trainable(transformer)

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

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents ``[B, C, h, w]`` to images ``[B, 3, H, W]`` in [0, 1] (float32)."""
        vae = self.pipe.vae
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + shift
        image = vae.decode(latents, return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp(0, 1)
