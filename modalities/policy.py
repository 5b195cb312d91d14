"""One torch module as the policy: trained through LoRA adapters or fully, with the KL reference it implies.

Shared by the diffusers flow adapters (the pipeline's ``transformer``) and the masked-LM adapters (the
``transformers`` model). Under LoRA the base weights are frozen and the reference model is the same module with
its adapters switched off; under full fine-tuning every weight trains and a frozen copy made at construction is
the reference. Trainable parameters are float32 whatever ``backbone.dtype`` is.
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from alignkit.config import LoraConfig

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
"""peft's adapter weights file (``PeftModel.save_pretrained`` / ``from_pretrained``)."""
ADAPTER_CONFIG_NAME = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
"""The key prefix of a ``PeftModel``'s saved adapter."""
LORA_METADATA_KEY = "lora_adapter_metadata"
"""The safetensors header entry where diffusers' ``save_lora_weights`` writes the adapter settings
(``diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY``); ``load_lora_weights`` builds its LoRA from it."""


def inject_peft_lora(module: torch.nn.Module, config: Any) -> None:
    """peft's ``inject_adapter_in_model`` of LoRA ``config`` as adapter ``default``, recording
    ``module.peft_config`` (what peft's state-dict helpers read)."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, module, adapter_name="default")
    module.peft_config = {"default": config}


def set_lora_enabled(module: torch.nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer of ``module`` on or off (off: the base model, the KL reference); the loop that
    diffusers' and transformers' ``enable_adapters`` / ``disable_adapters`` run, without their requirement that
    the adapter was added through them."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in module.modules():
        if isinstance(layer, BaseTunerLayer):
            layer.enable_adapters(enabled)


def float_trainable(module: torch.nn.Module) -> None:
    """Cast ``module``'s trainable parameters to float32 in place (the same Parameter objects)."""
    for p in module.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def lora_target_message(module: torch.nn.Module, targets: list[str]) -> str:
    """The error for ``backbone.lora.target_modules`` that match no layer: the Linear layer names there are."""
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)})
    return (f"backbone.lora.target_modules={targets} matched no layer of {type(module).__name__}; its Linear "
            f"layer names include: {', '.join(linear[:20])}")


@dataclass(frozen=True)
class LoraLayout:
    """One on-disk LoRA format :meth:`PolicyModule.load_trainable` reads.

    Attributes:
        weights: the safetensors file's name in the checkpoint folder.
        prefix: what precedes the module's own parameter names in its keys (``transformer.`` for diffusers'
            ``save_lora_weights``, ``base_model.model.`` for peft's ``PeftModel.save_pretrained``).
    """

    weights: str
    prefix: str


PEFT_LAYOUT = LoraLayout(ADAPTER_WEIGHTS_NAME, PEFT_PREFIX)
"""peft's adapter folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (``PeftModel.from_pretrained``)."""


def lora_settings(module: torch.nn.Module) -> dict[str, Any]:
    """The JSON form of ``module``'s peft LoRA config (adapter ``default``): rank ``r``, ``lora_alpha``,
    ``target_modules`` (sorted) and peft's other fields, as diffusers' ``*_lora_adapter_metadata`` expects."""
    settings = module.peft_config["default"].to_dict()
    return json.loads(json.dumps(settings, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def save_peft_adapter(module: torch.nn.Module, directory: Path, params: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``module``'s LoRA adapter in peft's layout (what ``PeftModel.save_pretrained`` writes):
    ``adapter_config.json`` (rank, alpha, targets) and ``adapter_model.safetensors``.

    ``PeftModel.from_pretrained(base, directory)`` loads it into a stock ``base`` model, with its alpha.

    Args:
        params: full values of the trainable parameters by name (gathered shards); None: the module's own.
    """
    from peft.utils import get_peft_model_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    layers = get_peft_model_state_dict(module, state_dict=params)
    state = {PEFT_PREFIX + k: v.detach().contiguous() for k, v in layers.items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    module.peft_config["default"].save_pretrained(str(directory))


def saved_lora_settings(path: Path, prefix: str) -> dict[str, Any] | None:
    """The adapter settings saved with LoRA weights file ``path``: diffusers' header metadata (keys
    ``<prefix>r``, ...) or peft's ``adapter_config.json`` beside it; None for files written without either
    (alignkit checkpoints before the metadata was added)."""
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(LORA_METADATA_KEY)
    if raw:
        return {k.removeprefix(prefix): v for k, v in json.loads(raw).items()}
    config = path.parent / ADAPTER_CONFIG_NAME
    if config.is_file():
        return json.loads(config.read_text())
    return None


def _override(value: Any) -> str:
    """``value`` as a hydra command-line override writes it (lists as ``[a,b]``)."""
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


def check_lora_settings(path: Path, saved: dict[str, Any], module: torch.nn.Module) -> None:
    """Refuse LoRA weights saved with another rank, alpha or targets than ``module``'s adapter.

    A different alpha would load without any error and silently rescale the adapter (``alpha / rank``).

    Raises:
        ValueError: naming the saved and the configured values and the ``backbone.lora`` settings to use.
    """
    config = module.peft_config["default"]
    fields = (("r", "rank", config.r), ("lora_alpha", "alpha", config.lora_alpha),
              ("target_modules", "target_modules", config.target_modules))
    fixes = []
    for key, setting, ours in fields:
        theirs = saved.get(key)
        if theirs is None:
            continue
        if key == "target_modules":
            same = sorted(theirs) == sorted(ours) if not isinstance(theirs, str) else theirs == ours
            theirs = sorted(theirs) if not isinstance(theirs, str) else theirs
            ours = sorted(ours) if not isinstance(ours, str) else ours
        else:
            same = float(theirs) == float(ours)
        if not same:
            fixes.append((setting, theirs, ours))
    if fixes:
        saved_as = ", ".join(f"{s}={_override(t)}" for s, t, _ in fixes)
        configured = ", ".join(f"{s}={_override(o)}" for s, _, o in fixes)
        use = " ".join(f"backbone.lora.{s}={_override(t)}" for s, t, _ in fixes)
        raise ValueError(f"{path}: the adapter was saved with {saved_as} but backbone.lora has {configured}; set "
                         f"{use} to load it as it was trained")


def load_lora_folder(module: torch.nn.Module, directory: Path, layouts: tuple[LoraLayout, ...]) -> None:
    """Load the LoRA weights in ``directory`` (the first of ``layouts`` present) into ``module``'s adapter.

    Raises:
        FileNotFoundError: none of the layouts' files is there.
        ValueError: the saved settings differ from the adapter's (:func:`check_lora_settings`), or the saved
            tensors do not match its LoRA layers one to one.
    """
    from peft.utils import set_peft_model_state_dict

    found = [layout for layout in layouts if (directory / layout.weights).is_file()]
    if not found:
        raise FileNotFoundError(f"{directory}: no LoRA weights ({' or '.join(x.weights for x in layouts)}); give the "
                                "folder save_trainable wrote (a checkpoint's trainable/ folder)")
    layout = found[0]
    path = directory / layout.weights
    saved = saved_lora_settings(path, layout.prefix)
    if saved is not None:
        check_lora_settings(path, saved, module)
    state = {k.removeprefix(layout.prefix): v for k, v in load_file(str(path)).items()}
    result = set_peft_model_state_dict(module, state)
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    missing = [k for k in getattr(result, "missing_keys", None) or [] if "lora_" in k]
    if unexpected or missing:
        raise ValueError(f"{path}: the LoRA tensors do not match the model's adapter: {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]}), {len(missing)} missing (e.g. {missing[:3]})")


def load_full_weights(module: torch.nn.Module, folder: Path) -> None:
    """Load the one safetensors file in ``folder`` into ``module``, every parameter and buffer.

    Tied weights are saved once under one of their names (``save_pretrained``); the others count as loaded.

    Raises:
        FileNotFoundError: ``folder`` holds no or several safetensors files.
        ValueError: keys the module lacks, or parameters the file lacks.
    """
    from safetensors.torch import load_model

    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one safetensors file in {folder}, got {files}")
    missing, unexpected = load_model(module, files[0], strict=False)
    named = list(module.named_parameters(remove_duplicate=False))
    loaded = {id(p) for n, p in named if n not in missing}
    untied = [n for n, p in named if n in missing and id(p) not in loaded]
    buffers = {n for n, _ in module.named_buffers()}
    untied += [n for n in missing if n in buffers]
    if unexpected or untied:
        raise ValueError(f"{files[0]} does not match the model: unexpected keys {unexpected[:3]}, missing {untied[:3]}")


class PolicyModule:
    """Mixin of a sampler whose policy is one module (see the module docstring).

    Call :meth:`_init_policy` in the constructor; forwards go through :attr:`policy` (the reference inside
    :meth:`reference`). :meth:`load_trainable` reads what the subclass's ``save_trainable`` writes: LoRA in
    one of :attr:`lora_layouts`, full weights from the folder :attr:`full_weights_folder`.
    """

    lora_layouts: ClassVar[tuple[LoraLayout, ...]] = (PEFT_LAYOUT,)
    """LoRA formats :meth:`load_trainable` reads, the first one present in the folder winning."""
    full_weights_folder: ClassVar[str] = "model"
    """Sub-folder of a checkpoint holding the fully fine-tuned module (``save_pretrained`` layout)."""

    _policy: torch.nn.Module
    _module: torch.nn.Module
    _reference_copy: torch.nn.Module | None
    _use_reference: bool
    _lora: bool

    def _init_policy(self, module: torch.nn.Module, lora: LoraConfig, *,
                     inject: Callable[[torch.nn.Module, Any], None] = inject_peft_lora) -> None:
        """Freeze and add LoRA (``lora.enabled``) or unfreeze and copy the reference; trainable weights float32.

        Raises:
            ValueError: ``lora.target_modules`` match no layer of ``module`` (the message lists its layers).
        """
        self._reference_copy = None
        self._lora = lora.enabled
        if lora.enabled:
            from peft import LoraConfig as PeftLoraConfig

            module.requires_grad_(False)
            config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                    init_lora_weights="gaussian", target_modules=list(lora.target_modules))
            targets = list(lora.target_modules)
            try:
                inject(module, config)
            except ValueError as exc:
                raise ValueError(lora_target_message(module, targets) + f" (peft: {exc})") from exc
            if not any("lora_" in name for name, _ in module.named_parameters()):
                raise ValueError(lora_target_message(module, targets))
        else:
            self._reference_copy = copy.deepcopy(module).requires_grad_(False).eval()
            module.requires_grad_(True)
        float_trainable(module)
        module.eval()
        self._policy = module
        self._module = module
        self._use_reference = False

    @property
    def policy(self) -> torch.nn.Module:
        """The module forwards use: the frozen copy inside :meth:`reference` under full fine-tuning, else the
        trainable module (or the wrapper accelerate made of it)."""
        if self._use_reference and self._reference_copy is not None:
            return self._reference_copy
        return self._module

    def trainable_module(self) -> torch.nn.Module:
        return self._policy

    def set_trainable_module(self, module: torch.nn.Module) -> None:
        self._module = module

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self._policy.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> None:
        self._module.train(mode)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Forwards use the reference model: the frozen copy (full fine-tuning) or the adapters off (LoRA)."""
        if self._reference_copy is not None:
            self._use_reference = True
            try:
                yield
            finally:
                self._use_reference = False
            return
        set_lora_enabled(self._policy, False)
        try:
            yield
        finally:
            set_lora_enabled(self._policy, True)

    def load_trainable(self, directory: Path) -> None:
        """Load trainable weights saved by ``save_trainable`` (also checkpoints written before the adapter
        settings were saved with them) into the policy module, before any wrapping.

        Raises:
            FileNotFoundError / ValueError: see :func:`load_lora_folder` and :func:`load_full_weights`.
        """
        if self._lora:
            load_lora_folder(self._policy, directory, self.lora_layouts)
        else:
            load_full_weights(self._policy, directory / self.full_weights_folder)
        float_trainable(self._policy)
