"""One torch module as the policy: trained through LoRA adapters or fully, with the KL reference it implies.

Shared by the diffusers flow adapters (the pipeline's ``transformer``) and the masked-LM adapters (the
``transformers`` model). Under LoRA the base weights are frozen and the reference model is the same module with
its adapters switched off; under full fine-tuning every weight trains and a frozen copy made at construction is
the reference. Trainable parameters are float32 whatever ``backbone.dtype`` is.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch

from alignkit.config import LoraConfig


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


class PolicyModule:
    """Mixin of a sampler whose policy is one module (see the module docstring).

    Call :meth:`_init_policy` in the constructor; forwards go through :attr:`policy` (the reference inside
    :meth:`reference`).
    """

    _policy: torch.nn.Module
    _module: torch.nn.Module
    _reference_copy: torch.nn.Module | None
    _use_reference: bool

    def _init_policy(self, module: torch.nn.Module, lora: LoraConfig, *,
                     inject: Callable[[torch.nn.Module, Any], None] = inject_peft_lora) -> None:
        """Freeze and add LoRA (``lora.enabled``) or unfreeze and copy the reference; trainable weights float32.

        Raises:
            ValueError: ``lora.target_modules`` match no layer of ``module`` (the message lists its layers).
        """
        self._reference_copy = None
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
