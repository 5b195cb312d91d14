"""Offline builders for masked token models: a character tokenizer and tiny bidirectional transformers.

Nothing here touches the Hugging Face Hub: the tokenizer is built in-process with the ``tokenizers``
library and models are constructed from hand-written configs with weights drawn from a seeded RNG. The
result is saved with ``save_pretrained`` and loaded back with ``AutoModelForMaskedLM`` /
``AutoTokenizer.from_pretrained``, the path a hub model takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

PAD_TOKEN = "[PAD]"
UNK_TOKEN = "[UNK]"
MASK_TOKEN = "[MASK]"
EOS_TOKEN = "[EOS]"
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, MASK_TOKEN, EOS_TOKEN)
DIGITS_AND_OPS = "0123456789+-*="


def build_char_tokenizer(chars: Sequence[str] | str = DIGITS_AND_OPS, model_max_length: int = 64
                         ) -> PreTrainedTokenizerFast:
    """A character-level tokenizer over ``chars`` with ``[PAD] [UNK] [MASK] [EOS]`` (ids 0-3).

    Every character is one token (unknown ones map to ``[UNK]``); no special tokens are added around a
    text; decoding joins tokens without spaces. ``[EOS]`` fills a generated region after its text.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        if len(ch) != 1:
            raise ValueError(f"chars: {ch!r} is not one character; give single characters, e.g. '0123456789+='")
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, mask_token=MASK_TOKEN,
        eos_token=EOS_TOKEN, model_max_length=model_max_length, padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_masked_lm(tokenizer: PreTrainedTokenizerFast, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                         intermediate: int | None = None, max_positions: int = 32, seed: int = 0) -> BertForMaskedLM:
    """A randomly initialised bidirectional ``BertForMaskedLM`` (dropout 0, so train and eval forwards agree).

    Args:
        tokenizer: gives the vocabulary size and the pad token.
        hidden, layers, heads, intermediate: transformer size (``intermediate`` defaults to ``2 * hidden``).
        max_positions: longest prompt + generated sequence.
        seed: seed of the initialisation (the global RNG is left untouched).
    """
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=intermediate or 2 * hidden, max_position_embeddings=max_positions,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id,
        type_vocab_size=1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForMaskedLM(config)


def save_masked_lm(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> Path:
    """``save_pretrained`` of model (safetensors) and tokenizer into ``folder``; returns it."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def build_word_tokenizer(words: Sequence[str], extra_tokens: Sequence[str] = (), model_max_length: int = 512
                         ) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` plus ``extra_tokens`` (e.g. image-token names), with
    ``[PAD] [UNK] [MASK] [EOS]`` (ids 0-3); no special tokens are added around a text."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in [*words, *extra_tokens]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD_TOKEN, unk_token=UNK_TOKEN, mask_token=MASK_TOKEN,
        eos_token=EOS_TOKEN, model_max_length=model_max_length, padding_side="left",
    )
