"""Masked-diffusion adapter over a transformers bidirectional masked LM (LLaDA / MDLM style).

Any ``AutoModelForMaskedLM`` (BERT, ModernBERT, a remote-code LLaDA-style model) with its tokenizer,
loaded with ``from_pretrained`` from a hub id, a local folder or ``builtin:<name>``; ``trust_remote_code``
is passed only when ``backbone.trust_remote_code`` is true. The prompt is a prefix that is never masked:
its tokens are left-padded to ``backbone.max_sequence_length`` (padding is excluded by the attention
mask), so the ``G = backbone.options.gen_length`` generated positions always sit at the same positions.

Backbone options (``backbone.options``): ``gen_length`` (generated positions, default 8), ``scale``
(``masked_fraction`` / ``entropy`` / ``uniform``, the exploration scale used by noise-aware weighting),
``schedule`` (``cosine`` / ``linear``), ``end_token`` (the token that fills the generated region after
the text; default the tokenizer's EOS, else SEP). ``algo.noise_level`` is the sampling temperature and
``algo.step_kind`` must be ``masked_confidence`` (see :mod:`alignkit.modalities.discrete.masked`).

Trainable weights: LoRA on ``backbone.lora.target_modules`` (peft's ``inject_adapter_in_model``) or,
with LoRA disabled, the whole model; the reference model for the KL term is the adapter-disabled model
(or a frozen copy).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch

from alignkit.config import BackboneConfig, ConfigError
from alignkit.fsdp import module_state
from alignkit.modalities.diffusers_common import DTYPES, looks_like_hub_id, resolve_pretrained
from alignkit.modalities.discrete.masked import SCALES, SCHEDULES, MaskedDiffusionSampler
from alignkit.modalities.policy import PolicyModule, save_peft_adapter
from alignkit.types import Conditioning

logger = logging.getLogger(__name__)

OPTIONS = {"gen_length": 8, "scale": "masked_fraction", "schedule": "cosine", "end_token": None}


def load_masked_lm(cfg: BackboneConfig) -> tuple[torch.nn.Module, Any]:
    """``AutoModelForMaskedLM`` and ``AutoTokenizer`` ``from_pretrained`` of ``cfg.pretrained``."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    source = resolve_pretrained(cfg.pretrained)
    if not Path(source).expanduser().exists() and not looks_like_hub_id(source):
        raise FileNotFoundError(
            f"backbone.pretrained={cfg.pretrained!r}: no such folder, and not a hub id 'org/name'; give a folder "
            "holding a masked LM and its tokenizer (save_pretrained layout), a hub id or builtin:arithmetic"
        )
    kwargs: dict[str, Any] = {}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.trust_remote_code:
        kwargs["trust_remote_code"] = True
    logger.info("loading a masked LM from %s", source)
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    model = AutoModelForMaskedLM.from_pretrained(source, dtype=DTYPES[cfg.dtype], **kwargs)
    return model, tokenizer


def encode_prefix(tokenizer: Any, prompts: list[str], length: int, *, fill: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt tokens left-padded to ``length``: ``(ids [P, length] long, mask [P, length] long)``.

    Padding uses the tokenizer's pad token (``fill`` when it has none) and is 0 in the mask.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fill
    ids = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        tokens = tokenizer(prompt)["input_ids"]
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
        if tokenizer.mask_token_id is None:
            raise ValueError(f"backbone.pretrained={cfg.pretrained!r}: the tokenizer has no mask token; a masked "
                             "diffusion model needs one (tokenizer.mask_token)")
        end = opts["end_token"] or tokenizer.eos_token or tokenizer.sep_token
        end_id = tokenizer.convert_tokens_to_ids(end) if end is not None else None
        if end_id is None or end_id == tokenizer.unk_token_id:
            raise ValueError(f"backbone.options.end_token={opts['end_token']!r}: the tokenizer has no such token (nor "
                             "an EOS / SEP token); name the token that fills the region after the text")
        self.tokenizer = tokenizer
        self.end_id = int(end_id)
        forbidden = self.forbidden_ids(tokenizer, opts)
        super().__init__(gen_length=int(self.generated_length(opts)[0] or 0), num_steps=cfg.num_steps,
                         mask_id=int(tokenizer.mask_token_id), step_kind=step_kind, temperature=noise_level,
                         scale=opts["scale"], schedule=opts["schedule"], forbidden=forbidden)
        self.cfg = cfg
        self._device = torch.device(device)
        self.prompt_length = cfg.max_sequence_length
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        if limit is not None and self.prompt_length + self.gen_length > limit:
            raise ValueError(
                f"backbone.max_sequence_length={self.prompt_length} + backbone.options.gen_length={self.gen_length} "
                f"exceeds the model's max_position_embeddings={limit}; shorten one of them"
            )
        model.to(self._device)
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
        if cfg.max_sequence_length < 1:
            problems.append(f"{path}.max_sequence_length={cfg.max_sequence_length}: the prompt length must be >= 1")
        return problems

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
        ids, mask = encode_prefix(self.tokenizer, prompts, self.prompt_length, fill=self.end_id)
        return {"prompt_ids": ids.to(self._device), "prompt_mask": mask.to(self._device)}

    def logits(self, state: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        model = self.policy
        ids = torch.cat([cond["prompt_ids"].to(self._device), state], dim=1)  # [B, Lp + G]
        mask = torch.cat([cond["prompt_mask"].to(self._device), torch.ones_like(state)], dim=1)
        out = model(input_ids=ids, attention_mask=mask)
        return out.logits[:, -self.gen_length:, :]  # [B, G, V]

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
