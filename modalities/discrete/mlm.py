"""Masked-diffusion adapter over a transformers bidirectional masked LM (LLaDA / MDLM style).

Loaded with ``from_pretrained`` from a hub id, a local folder or ``builtin:<name>``, with its tokenizer:

- a model transformers knows (BERT, ModernBERT, ...): ``AutoModelForMaskedLM``;
- a model that ships its own code (``auto_map`` in ``config.json``, a ``model_type`` transformers does not
  know; LLaDA, Dream): only with ``backbone.trust_remote_code: true`` (refused with an error naming the
  setting otherwise, before any code runs), through the first auto class its ``auto_map`` registers of
  ``AutoModelForMaskedLM``, ``AutoModelForCausalLM``, ``AutoModel`` (LLaDA registers only the last two;
  its forward returns bidirectional logits whatever the class name says).

The mask token is the tokenizer's (``tokenizer.mask_token``) or, when the tokenizer has none, the model config's
``mask_token_id`` (LLaDA: 126336); the two must agree when both exist. The prompt is a prefix that is never
masked: its tokens are left-padded to ``backbone.max_sequence_length`` (padding is excluded by the attention
mask), so the ``G = backbone.options.gen_length`` generated positions always sit at the same positions.

Backbone options (``backbone.options``): ``gen_length`` (generated positions, default 8), ``scale``
(``masked_fraction`` / ``entropy`` / ``uniform``, the exploration scale used by noise-aware weighting),
``schedule`` (``cosine`` / ``linear``), ``end_token`` (the token that fills the generated region after
the text; default the tokenizer's EOS, else SEP), ``chat_template`` (wrap each prompt as a user turn of the
tokenizer's chat template, with the assistant header appended: instruction-tuned models such as
LLaDA-8B-Instruct), ``deterministic_step`` (``argmax``, greedy, the default; ``keyed_sample``, a draw keyed by
the state, for image tokens: :mod:`alignkit.modalities.discrete.masked`). ``algo.noise_level`` is the sampling
temperature and ``algo.step_kind`` must be ``masked_confidence`` (see :mod:`alignkit.modalities.discrete.masked`).
Evaluation may sample with another number of steps (``eval.num_steps``, :meth:`MaskedLMSampler.eval_settings`).

Trainable weights: LoRA on ``backbone.lora.target_modules`` (peft's ``inject_adapter_in_model``) or,
with LoRA disabled, the whole model; the reference model for the KL term is the adapter-disabled model
(or a frozen copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch

from alignkit.config import BackboneConfig, ConfigError
from alignkit.fsdp import module_state
from alignkit.interfaces import EvalSettings
from alignkit.modalities.diffusers_common import DTYPES, looks_like_hub_id, resolve_pretrained
from alignkit.modalities.discrete.masked import (
    DETERMINISTIC_STEPS,
    SCALES,
    SCHEDULES,
    MaskedDiffusionSampler,
    reveal_schedule,
)
from alignkit.modalities.policy import PolicyModule, save_peft_adapter
from alignkit.types import Conditioning

logger = logging.getLogger(__name__)

OPTIONS = {"gen_length": 8, "scale": "masked_fraction", "schedule": "cosine", "end_token": None,
           "chat_template": False, "deterministic_step": "argmax"}
REMOTE_AUTO_CLASSES = ("AutoModelForMaskedLM", "AutoModelForCausalLM", "AutoModel")
"""Auto classes tried, in order, for a model that ships its own code (the first its ``auto_map`` registers)."""


def model_config_dict(source: str, cfg: BackboneConfig) -> dict[str, Any]:
    """The model's ``config.json`` as a dict, read without running any of its code."""
    from transformers import PretrainedConfig

    kwargs = {"revision": cfg.revision} if cfg.revision else {}
    config, _ = PretrainedConfig.get_config_dict(source, **kwargs)
    return config


def remote_auto_class(config: dict[str, Any], cfg: BackboneConfig) -> str | None:
    """The auto class to load a model that ships its own code with, or None for a model transformers knows.

    Raises:
        ValueError: the model needs its own code and ``backbone.trust_remote_code`` is false, or its ``auto_map``
            registers none of :data:`REMOTE_AUTO_CLASSES`.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    auto_map = config.get("auto_map") or {}
    if not auto_map or config.get("model_type") in CONFIG_MAPPING:
        return None
    shipped = ", ".join(f"{k}: {v}" for k, v in auto_map.items())
    if not cfg.trust_remote_code:
        raise ValueError(
            f"backbone.pretrained={cfg.pretrained!r} ships its own model code (config.json auto_map: {shipped}; "
            f"model_type {config.get('model_type')!r} is not one transformers knows), which runs when it loads. Set "
            "backbone.trust_remote_code=true if you trust this model's code; nothing was run")
    found = next((name for name in REMOTE_AUTO_CLASSES if name in auto_map), None)
    if found is None:
        raise ValueError(f"backbone.pretrained={cfg.pretrained!r}: its auto_map ({shipped}) registers none of "
                         f"{', '.join(REMOTE_AUTO_CLASSES)}; a masked LM needs a model class returning logits")
    return found


def load_masked_lm(cfg: BackboneConfig) -> tuple[torch.nn.Module, Any]:
    """The model and its ``AutoTokenizer``, ``from_pretrained`` of ``cfg.pretrained``: ``AutoModelForMaskedLM``
    for a model transformers knows; a model that ships its own code through its ``auto_map``
    (:func:`remote_auto_class`, only with ``backbone.trust_remote_code``)."""
    import transformers

    source = resolve_pretrained(cfg.pretrained)
    if not Path(source).expanduser().exists() and not looks_like_hub_id(source):
        raise FileNotFoundError(
            f"backbone.pretrained={cfg.pretrained!r}: no such folder, and not a hub id 'org/name'; give a folder "
            "holding a masked LM and its tokenizer (save_pretrained layout), a hub id or builtin:arithmetic"
        )
    auto_class = remote_auto_class(model_config_dict(source, cfg), cfg)
    kwargs: dict[str, Any] = {}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    logger.info("loading a masked LM from %s%s", source, f" ({auto_class}, the model's own code)" if auto_class else "")
    tokenizer = transformers.AutoTokenizer.from_pretrained(source, **kwargs)
    loader = getattr(transformers, auto_class or "AutoModelForMaskedLM")
    model = loader.from_pretrained(source, dtype=DTYPES[cfg.dtype], **kwargs)
    return model, tokenizer


def mask_token_id(tokenizer: Any, model: torch.nn.Module, pretrained: str) -> int:
    """The mask token: the tokenizer's, else the model config's ``mask_token_id`` (LLaDA-style).

    Raises:
        ValueError: neither has one, the two disagree, or the id is outside the model's vocabulary.
    """
    config = getattr(model, "config", None)
    from_tokenizer = tokenizer.mask_token_id
    from_config = getattr(config, "mask_token_id", None)
    if from_tokenizer is not None and from_config is not None and int(from_tokenizer) != int(from_config):
        raise ValueError(f"backbone.pretrained={pretrained!r}: the tokenizer's mask token ({tokenizer.mask_token!r}, "
                         f"id {from_tokenizer}) differs from the model config's mask_token_id={from_config}; fix one "
                         "of them so the model sees the mask it was trained with")
    mask = from_tokenizer if from_tokenizer is not None else from_config
    if mask is None:
        raise ValueError(f"backbone.pretrained={pretrained!r}: no mask token: the tokenizer has none "
                         "(tokenizer.mask_token) and the model config has no mask_token_id; a masked diffusion model "
                         "needs one")
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and not 0 <= int(mask) < int(vocab):
        raise ValueError(f"backbone.pretrained={pretrained!r}: mask token id {mask} is outside the model's "
                         f"vocabulary (vocab_size={vocab})")
    return int(mask)


def chat_prompts(tokenizer: Any, prompts: list[str]) -> list[str]:
    """Each prompt as one user turn of the tokenizer's chat template, ending with the assistant's header."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts]


def encode_prefix(tokenizer: Any, prompts: list[str], length: int, *, fill: int,
                  chat_template: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt tokens left-padded to ``length``: ``(ids [P, length] long, mask [P, length] long)``.

    Padding uses the tokenizer's pad token (``fill`` when it has none) and is 0 in the mask. With ``chat_template``
    each prompt is a user turn of the tokenizer's chat template (:func:`chat_prompts`), tokenised without adding
    special tokens (the template writes its own).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fill
    ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    texts = chat_prompts(tokenizer, prompts) if chat_template else prompts
    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        tokens = tokenizer(text, **({"add_special_tokens": False} if chat_template else {}))["input_ids"]
        if len(tokens) > length:
            raise ValueError(f"prompt {prompt!r} has {len(tokens)} tokens, more than backbone.max_sequence_length="
                             f"{length}; raise backbone.max_sequence_length")
        if tokens:
            ids[i, -len(tokens):] = torch.tensor(tokens)
            mask[i, -len(tokens):] = 1
    return ids, mask


def encode_targets(tokenizer: Any, texts: list[str], length: int, *, end_id: int) -> torch.Tensor:
    """``[B, length]`` long: each text's tokens (no special tokens) followed by ``end_id`` fill.

    Raises:
        ValueError: when a text does not fit (at least one end token is kept).
    """
    out = torch.full((len(texts), length), end_id, dtype=torch.long)
    for i, text in enumerate(texts):
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(tokens) >= length:
            raise ValueError(f"target {text!r} has {len(tokens)} tokens; backbone.options.gen_length={length} keeps "
                             "room for one end token: raise it")
        out[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out


class MaskedLMSampler(PolicyModule, MaskedDiffusionSampler):
    """A masked LM as a masked-diffusion policy over ``G`` generated tokens; samples decode to text.

    Conditioning (``P`` prompts): ``prompt_ids`` ``[P, Lp]`` long (left-padded) and ``prompt_mask``
    ``[P, Lp]`` long (1 on prompt tokens). States: ``[B, G]`` long.
    """

    modality: ClassVar[str] = "text"

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: BackboneConfig, *, step_kind: str,
                 noise_level: float, device: torch.device | str) -> None:
        problems = self.check_config(cfg)
        if problems:
            raise ConfigError(problems)
        opts = {**self.options_defaults(), **cfg.options}
        mask_id = mask_token_id(tokenizer, model, cfg.pretrained)
        if opts["chat_template"] and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"backbone.options.chat_template=true: the tokenizer of {cfg.pretrained!r} has no chat "
                             "template; set backbone.options.chat_template=false to encode prompts as they are")
        end = opts["end_token"] or tokenizer.eos_token or tokenizer.sep_token
        end_id = tokenizer.convert_tokens_to_ids(end) if end is not None else None
        if end_id is None or end_id == tokenizer.unk_token_id:
            raise ValueError(f"backbone.options.end_token={opts['end_token']!r}: the tokenizer has no such token (nor "
                             "an EOS / SEP token); name the token that fills the region after the text")
        self.tokenizer = tokenizer
        self.end_id = int(end_id)
        forbidden = self.forbidden_ids(tokenizer, opts)
        super().__init__(gen_length=int(self.generated_length(opts)[0] or 0), num_steps=cfg.num_steps,
                         mask_id=mask_id, step_kind=step_kind, temperature=noise_level,
                         scale=opts["scale"], schedule=opts["schedule"], forbidden=forbidden,
                         deterministic_step=opts["deterministic_step"])
        self.cfg = cfg
        self.chat_template = bool(opts["chat_template"])
        self._device = torch.device(device)
        self.prompt_length = cfg.max_sequence_length
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit is not None and self.prompt_length + self.gen_length > limit:
            raise ValueError(
                f"backbone.max_sequence_length={self.prompt_length} + backbone.options.gen_length={self.gen_length} "
                f"exceeds the model's max_position_embeddings={limit}; shorten one of them"
            )
        model.to(self._device)
        if cfg.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(f"backbone.gradient_checkpointing=true: {type(model).__name__} does not support "
                                 "transformers' gradient checkpointing; set backbone.gradient_checkpointing=false")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._init_policy(model, cfg.lora)
        if cfg.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ValueError(f"backbone.gradient_checkpointing=true: {type(model).__name__} does not support "
                                 "gradient checkpointing; set backbone.gradient_checkpointing=false")
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def model(self) -> torch.nn.Module:
        """The masked LM (the unwrapped policy module)."""
        return self._policy

    def forbidden_ids(self, tokenizer: Any, options: dict[str, Any]) -> list[int]:
        """Token ids a generated position may never take: every special token but the end token."""
        return [i for i in tokenizer.all_special_ids if i != self.end_id]

    @classmethod
    def generated_length(cls, options: dict[str, Any], path: str = "backbone") -> tuple[int | None, list[str]]:
        """``G``, the generated positions (``options.gen_length``), or None and the problems with it."""
        g = options["gen_length"]
        if not isinstance(g, int) or isinstance(g, bool) or g < 1:
            return None, [f"{path}.options.gen_length={g!r}: give the number of generated tokens, an int >= 1"]
        return g, []

    @classmethod
    def check_config(cls, cfg: BackboneConfig, path: str = "backbone") -> list[str]:
        problems = []
        valid = cls.options_defaults()
        unknown = sorted(set(cfg.options) - set(valid))
        if unknown:
            problems.append(f"{path}.options has unknown keys {unknown}; valid: {', '.join(valid)}")
        opts = {**valid, **cfg.options}
        g, length_problems = cls.generated_length(opts, path)
        problems += length_problems
        if g is not None and not 2 <= cfg.num_steps <= g + 1:
            problems.append(f"{path}.num_steps={cfg.num_steps}: each step but the final identity step reveals at least "
                            f"one of the {g} generated positions ({path}.options); use 2..{g + 1} steps")
        if opts["scale"] not in SCALES:
            problems.append(f"{path}.options.scale={opts['scale']!r}: use one of {', '.join(SCALES)}")
        if opts["schedule"] not in SCHEDULES:
            problems.append(f"{path}.options.schedule={opts['schedule']!r}: use one of {', '.join(SCHEDULES)}")
        if opts["deterministic_step"] not in DETERMINISTIC_STEPS:
            problems.append(f"{path}.options.deterministic_step={opts['deterministic_step']!r}: use one of "
                            f"{', '.join(DETERMINISTIC_STEPS)} (keyed_sample: a draw keyed by the state, for image "
                            "tokens)")
        if cfg.max_sequence_length < 1:
            problems.append(f"{path}.max_sequence_length={cfg.max_sequence_length}: the prompt length must be >= 1")
        if opts["end_token"] is not None and not isinstance(opts["end_token"], str):
            problems.append(f"{path}.options.end_token={opts['end_token']!r}: give the token as a string (quote it on "
                            f"the command line: {path}.options.end_token=\"'[EOS]'\"), or null for the EOS token")
        if not isinstance(opts["chat_template"], bool):
            problems.append(f"{path}.options.chat_template={opts['chat_template']!r}: use true (wrap prompts in the "
                            "tokenizer's chat template) or false")
        return problems

    # --- evaluation with another number of steps ---------------------------------------------------------

    eval_setting_names: ClassVar[frozenset[str]] = frozenset({"num_steps"})

    @classmethod
    def check_eval_settings(cls, settings: EvalSettings, cfg: BackboneConfig | None = None) -> list[str]:
        """Only ``eval.num_steps`` (text has no guidance or size), within what :meth:`check_config` allows."""
        problems = super().check_eval_settings(settings, cfg)
        if problems or cfg is None:
            return problems
        return cls.changed_backbone_problems(cls.check_config, settings, cfg)

    @contextlib.contextmanager
    def _evaluation_overrides(self, settings: EvalSettings) -> Iterator[None]:
        """The reveal schedule of ``settings.num_steps`` steps for the context (``self.cfg`` with it too)."""
        saved = self.cfg, self.reveal_counts
        try:
            self.cfg = dataclasses.replace(self.cfg, num_steps=settings.num_steps)
            opts = {**self.options_defaults(), **self.cfg.options}
            counts = reveal_schedule(self.gen_length, self.cfg.num_steps - 1, opts["schedule"])
            self.reveal_counts = torch.cat([counts, counts.new_zeros(1)])  # [N], the last step reveals nothing
            yield
        finally:
            self.cfg, self.reveal_counts = saved

    @classmethod
    def from_config(cls, cfg: BackboneConfig, *, step_kind: str, noise_level: float,
                    device: torch.device | str) -> MaskedLMSampler:
        """Check ``cfg``, load model and tokenizer named by ``cfg.pretrained`` and wrap them."""
        problems = cls.check_config(cfg)
        if problems:
            raise ConfigError(problems)
        model, tokenizer = load_masked_lm(cfg)
        return cls(model, tokenizer, cfg, step_kind=step_kind, noise_level=noise_level, device=device)

    @classmethod
    def options_defaults(cls) -> dict[str, Any]:
        """Valid ``backbone.options`` keys with their defaults."""
        return dict(OPTIONS)

    # --- Sampler interface ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self._device

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        ids, mask = encode_prefix(self.tokenizer, prompts, self.prompt_length, fill=self.end_id,
                                  chat_template=self.chat_template)
        return {"prompt_ids": ids.to(self._device), "prompt_mask": mask.to(self._device)}

    def logits(self, state: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        model = self.policy
        ids = torch.cat([cond["prompt_ids"].to(self._device), state], dim=1)  # [B, Lp + G]
        mask = torch.cat([cond["prompt_mask"].to(self._device), torch.ones_like(state)], dim=1)
        out = model(input_ids=ids, attention_mask=mask)
        logits = getattr(out, "logits", None)
        if logits is None and isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
            logits = out[0]  # a remote model returning a plain tuple (logits first)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[1] != ids.shape[1]:
            raise ValueError(f"backbone.pretrained={self.cfg.pretrained!r}: the model's forward returns "
                             f"{type(out).__name__} without token logits [batch, length, vocab]; load a model class "
                             "with a language-modelling head")
        return logits[:, -self.gen_length:, :]  # [B, G, V]

    def decode(self, state: torch.Tensor) -> list[str]:
        """Text of each row: its tokens up to the first end token, special tokens dropped."""
        texts = []
        for row in state.tolist():
            if self.end_id in row:
                row = row[: row.index(self.end_id)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True))
        return texts

    # --- checkpoints ----------------------------------------------------------------------------------

    def save_trainable(self, directory: Path, params: dict[str, torch.Tensor] | None = None) -> None:
        """LoRA: peft's adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``; ``PeftModel.
        from_pretrained(base, directory)`` loads it). Full fine-tuning: ``save_pretrained`` of model and tokenizer
        in ``model/``. :meth:`load_trainable` (:class:`~alignkit.modalities.policy.PolicyModule`) reads both."""
        directory.mkdir(parents=True, exist_ok=True)
        if self.cfg.lora.enabled:
            save_peft_adapter(self.model, directory, params)
        else:
            state = None if params is None else module_state(self.model, params)
            target = directory / self.full_weights_folder
            self.model.save_pretrained(target, safe_serialization=True, state_dict=state)
            self.tokenizer.save_pretrained(target)
