"""A vision-language model as judge (``reward=vlm_judge``): the probability of its answer tokens after a question.

For each image and prompt the judge is asked ``question`` (``{prompt}`` is replaced by the prompt) in the model's
chat template, with the image first in the user turn (and ``system`` as system turn when given); ``answer_prefix``
is appended after the assistant turn opens (e.g. ``"Final Score: "``). From the next-token distribution
``p`` the reward is the expected answer value over the answer tokens, renormalised to them::

    score = sum_a value_a * P(a) / sum_a P(a)        P(a) = sum of p over the token ids spelling answer a

So ``answer_tokens=["Yes", "No"]`` with values ``[1, 0]`` gives ``P(yes) / (P(yes) + P(no))`` (the default), and
``answer_tokens=["1", ..., "5"]`` gives the expected score (values default to the tokens' numbers).

Answers to token ids: an answer's ids are those of its single-token spellings as written and with a leading
space (``"Yes"`` and ``" Yes"`` are different tokens in byte-level vocabularies; SentencePiece vocabularies add
the space themselves) and, for a vocabulary entry written out (``"ĠYes"``), that entry. An answer with no
single-token spelling is refused, naming ``answer_tokens``. Quote YAML words: an unquoted ``Yes`` is a boolean.

Batching: prompts are padded on the right and each row's logits are read at its own last token, so a score does
not depend on the batch (only the positions read are projected to the vocabulary). A judge whose answer tokens
get little probability (the question or the prefix does not lead to an answer) is reported once in the log.

Models: any ``AutoModelForImageTextToText`` with an ``AutoProcessor`` that has a chat template (Qwen2-VL /
Qwen2.5-VL, LLaVA, Idefics3, PaliGemma with a template...). Default: ``Qwen/Qwen2.5-VL-7B-Instruct`` asked
yes/no. UnifiedReward checkpoints (``CodeGoat24/UnifiedReward-qwen-7b``) were trained to write
"Final Score: <1-5>": use :data:`SCORE_QUESTION` (UnifiedReward-style), the score tokens and
``answer_prefix="Final Score: "`` (``recipes/reward/unifiedreward.yaml``), or the exact prompt the checkpoint
was trained on as ``question``. ``trust_remote_code`` is passed on only when set.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from alignkit.errors import ModelLoadError
from alignkit.rewards.preference import PreferenceReward

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
YES_NO_QUESTION = "Does this image show the following description? Answer Yes or No.\nDescription: {prompt}"
SCORE_QUESTION = (
    "You are given a text caption and an image generated from it. Judge the image on two criteria:\n"
    "1. Alignment with the caption: the objects, their attributes and their relations are as the caption says.\n"
    "2. Image quality: clarity, detail, colour and overall aesthetic appeal.\n"
    "Weighing both, give a score from 1 to 5 after 'Final Score:'.\n"
    "Text Caption: [{prompt}]"
)
"""A UnifiedReward-style scoring question (two criteria, a 1-5 score after "Final Score:")."""
SCORE_TOKENS: tuple[str, ...] = ("1", "2", "3", "4", "5")
LOW_MASS = 0.05
"""Below this mean probability on the answer tokens the judge is probably not answering; logged once."""


def _answer_values(tokens: Any, values: Any) -> tuple[list[str], list[float]]:
    if isinstance(tokens, str) or not isinstance(tokens, Sequence) or len(tokens) < 2:
        raise ValueError(f"answer_tokens={tokens!r}: give at least two answers, e.g. ['Yes', 'No']")
    for i, t in enumerate(tokens):
        if not isinstance(t, str) or not t.strip():
            hint = " (YAML reads unquoted Yes/No/true as booleans: quote them, \"Yes\")" if isinstance(t, bool) else ""
            raise ValueError(f"answer_tokens[{i}]={t!r} is not a word{hint}")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"answer_tokens={list(tokens)} repeats an answer; list each once")
    if values is None:
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            if len(tokens) != 2:
                raise ValueError(f"answer_values is required for answer_tokens={list(tokens)} (not numbers, not "
                                 "a yes/no pair); give one value per answer") from None
            values = [1.0, 0.0]
    if isinstance(values, str) or not isinstance(values, Sequence) or len(values) != len(tokens):
        raise ValueError(f"answer_values={values!r}: give one value per answer token ({len(tokens)})")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"answer_values[{i}]={v!r}: give a finite number")
        out.append(float(v))
    return list(tokens), out


def answer_token_ids(tokenizer: Any, answers: Sequence[str], source: str) -> list[list[int]]:
    """Token ids of each answer (module docstring); disjoint across answers.

    Raises:
        ValueError: an answer has no single-token spelling, or two answers share a token; naming ``answer_tokens``.
    """
    vocab = tokenizer.get_vocab()
    unk = tokenizer.unk_token_id
    ids: list[list[int]] = []
    for i, answer in enumerate(answers):
        found: list[int] = []
        pieces = []
        for text in (answer, " " + answer):
            enc = tokenizer.encode(text, add_special_tokens=False)
            pieces.append(tokenizer.convert_ids_to_tokens(enc))
            if len(enc) == 1 and enc[0] != unk and enc[0] not in found:
                found.append(enc[0])
        if answer in vocab and vocab[answer] not in found:
            found.append(vocab[answer])
        if not found:
            raise ValueError(f"answer_tokens[{i}]={answer!r} is not one token of {source}'s vocabulary (it encodes "
                             f"to {pieces[0]}, with a leading space to {pieces[1]}); choose answers the tokenizer "
                             "keeps whole (e.g. 'Yes'/'No', digits) or write the vocabulary entry itself")
        for j, earlier in enumerate(ids):
            if shared := set(found) & set(earlier):
                raise ValueError(f"answer_tokens[{j}]={answers[j]!r} and answer_tokens[{i}]={answer!r} share the "
                                 f"token(s) {tokenizer.convert_ids_to_tokens(sorted(shared))}; give distinct answers")
        ids.append(found)
    return ids


class VLMJudge(PreferenceReward):
    """Expected answer value of a vision-language judge (module docstring).

    Args:
        model: ``AutoModelForImageTextToText`` checkpoint (hub id or folder); ``processor`` when elsewhere.
        question: the user turn's text, with ``{prompt}`` where the prompt goes.
        answer_tokens: the answers read from the next-token distribution.
        answer_values: each answer's value; by default the answers read as numbers, or ``[1, 0]`` for two
            answers that are not numbers (a yes/no pair, yes first).
        answer_prefix: text after the opened assistant turn, before the answer (e.g. ``"Final Score: "``).
        system: an optional system turn.
        chat_template: a Jinja chat template replacing the processor's.
        device, dtype, batch_size: as the other model rewards (:mod:`alignkit.rewards.preference`).
        trust_remote_code: run the checkpoint's own code (only when a recipe sets it).
        revision: the checkpoint revision.
    """

    def __init__(self, model: str = DEFAULT_MODEL, processor: str | None = None, *,
                 question: str = YES_NO_QUESTION, answer_tokens: Sequence[str] = ("Yes", "No"),
                 answer_values: Sequence[float] | None = None, answer_prefix: str = "",
                 system: str | None = None, chat_template: str | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 batch_size: int = 4, trust_remote_code: bool = False, revision: str | None = None) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if not isinstance(question, str) or "{prompt}" not in question:
            raise ValueError(f"question={question!r} has no '{{prompt}}'; write where the prompt goes, e.g. "
                             "'Does this image show {prompt}? Answer Yes or No.'")
        self.answers, values = _answer_values(answer_tokens, answer_values)
        super().__init__(device, dtype, batch_size)
        self.question, self.answer_prefix, self.system = question, answer_prefix, system
        fix = "Give an image-text-to-text checkpoint (save_pretrained folder or hub id), e.g. " + DEFAULT_MODEL
        try:
            self.processor = AutoProcessor.from_pretrained(processor or model, revision=revision,
                                                           trust_remote_code=trust_remote_code)
            self.model = AutoModelForImageTextToText.from_pretrained(
                model, revision=revision, dtype=self.dtype, trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise ModelLoadError(f"vlm_judge model={model!r} cannot be loaded: {str(exc).strip()} {fix}") from exc
        except ValueError as exc:  # transformers: no AutoModelForImageTextToText class for this config
            raise ValueError(f"vlm_judge model={model!r}: {exc} {fix}") from exc
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.chat_template = chat_template
        if chat_template is None and not getattr(self.processor, "chat_template", None):
            raise ValueError(f"the processor of vlm_judge model={model!r} has no chat template; pass chat_template "
                             "(a Jinja template with an image placeholder in the user turn)")
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "right"  # rows keep positions 0..n-1 as when scored alone; see score_batch
        self.answer_ids = answer_token_ids(tokenizer, self.answers, model)
        self.values = torch.tensor(values)  # [A]
        self._keep_positions = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._warned = False

    def texts(self, prompts: Sequence[str]) -> list[str]:
        """The chat-formatted model input of each prompt, up to and including ``answer_prefix``."""
        out = []
        for prompt in prompts:
            messages: list[dict[str, Any]] = []
            if self.system is not None:
                messages.append({"role": "system", "content": [{"type": "text", "text": self.system}]})
            messages.append({"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": self.question.replace("{prompt}", prompt)}]})
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                                      chat_template=self.chat_template)
            out.append(text + self.answer_prefix)
        return out

    def answer_log_probs(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """``[b, A]`` log-probabilities of the answers as the next token."""
        inputs = self.processor(images=images, text=self.texts(prompts), padding=True, return_tensors="pt")
        mask = inputs["attention_mask"]  # [b, T]
        last = (mask * torch.arange(mask.shape[1])).argmax(dim=1)  # [b] each row's last real token
        inputs = {k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if self._keep_positions:
            positions, index = last.unique(return_inverse=True)
            logits = self.model(**inputs, logits_to_keep=positions.to(self.device)).logits  # [b, k, V]
        else:
            logits, index = self.model(**inputs).logits, last
        rows = logits[torch.arange(len(images)), index.to(logits.device)].float().log_softmax(dim=-1)  # [b, V]
        return torch.stack([rows[:, ids].logsumexp(dim=-1) for ids in self.answer_ids], dim=-1).cpu()

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        logp = self.answer_log_probs(images, prompts)  # [b, A]
        mass = logp.logsumexp(dim=-1).exp()  # [b]
        if not self._warned and float(mass.mean()) < LOW_MASS:
            self._warned = True
            logger.warning("vlm_judge: the answers %s get %.1f%% of the next-token probability on average; the "
                           "question / answer_prefix may not lead the model to answer with them", self.answers,
                           100 * float(mass.mean()))
        return logp.softmax(dim=-1) @ self.values  # [b]


def save_tiny_llava(folder: str | Path, *, seed: int = 0, image_size: int = 16) -> Path:
    """A tiny random LLaVA (CLIP vision tower, Llama language model) with a byte-level BPE tokenizer trained in
    process and a plain chat template, saved with ``save_pretrained`` (tests and demos; nothing is downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    folder = Path(folder)
    corpus = [YES_NO_QUESTION, SCORE_QUESTION, "USER: ASSISTANT: Yes No yes no 1 2 3 4 5",
              "a photo of a cat and a dog, two red apples, a blue car left of a tree"] * 4
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>", "<image>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=image_size, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).eval().save_pretrained(folder)
    template = ("{% for m in messages %}{{ m['role'] | upper }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>{{ '\\n' }}{% else %}{{ c['text'] }}{% endif %}"
                "{% endfor %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8, chat_template=template,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(folder)
    return folder
