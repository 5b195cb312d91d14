"""Tiny, randomly initialised diffusers pipelines that are built entirely offline.

The builders in this module never touch the Hugging Face Hub: tokenizers are built in-process with the
``tokenizers`` library and every model is constructed from a hand-written tiny config with weights drawn
from a seeded RNG. They are meant for unit tests, demos and benchmarks, not for producing meaningful images.

Size conventions (both families):

* ``sample_size`` is the latent height/width the transformer is built for.
* The tiny VAE downsamples by :data:`TINY_VAE_SCALE_FACTOR` (2), so a pipeline built with
  ``sample_size=32`` is meant to be called with ``height=width=64``; see :func:`tiny_image_size`
  (the pixel size is also recorded as ``pipe.vae.config.sample_size``).

Example:
    >>> pipe = build_tiny_sd3_pipeline(seed=0)
    >>> size = tiny_image_size(pipe)
    >>> out = pipe(prompt="a red circle", height=size, width=size, num_inference_steps=2, output_type="pt")
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE, WordLevel
from tokenizers.processors import TemplateProcessing
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    T5Config,
    T5EncoderModel,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

__all__ = [
    "BOS_TOKEN",
    "DEFAULT_VOCAB_WORDS",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "QWEN_SPECIAL_TOKENS",
    "SD3_MID_TRANSFORMER",
    "TINY_QWEN_IMAGE_SIZE",
    "TINY_VAE_SCALE_FACTOR",
    "UNK_TOKEN",
    "build_tiny_flux_pipeline",
    "build_tiny_qwen_image_pipeline",
    "build_tiny_qwen_tokenizer",
    "build_tiny_sd3_pipeline",
    "build_tiny_tokenizer",
    "clip_text_config",
    "load_tiny_pipeline",
    "save_tiny_pipeline",
    "tiny_image_size",
]

logger = logging.getLogger(__name__)

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

#: Pixels per latent cell of the tiny VAEs (``2 ** (len(block_out_channels) - 1)``).
TINY_VAE_SCALE_FACTOR = 2

# Tokenizer max lengths. 77 matches CLIP; the T5 tokenizers only bound ``padding="longest"`` calls because
# the pipelines always pass ``max_sequence_length`` explicitly (SD3: 256, FLUX: 512 by default).
_CLIP_MAX_LENGTH = 77
_T5_MAX_LENGTH = 512

_COMMON_WORDS = """
a an the and or but not no nor so yet if then than that this these those there here it its is are was were
be been being am has have had do does did done can could will would shall should may might must of in on at
by for with without from to into onto over under above below behind beside between near far inside outside
up down left right top bottom front back center middle around across through along against among up
i you he she we they me him her us them my your his our their mine yours what which who whom whose when
where why how all any both each every few many more most much other some such only own same very too just
also again once always never often sometimes now today night day morning evening
one two three four five six seven eight nine ten eleven twelve hundred thousand first second third last
red orange yellow green blue purple violet pink brown black white gray grey gold silver cyan magenta
dark light bright pale colorful colourful transparent shiny matte glowing
circle circles square squares triangle triangles rectangle rectangles star stars heart hearts line lines
dot dots shape shapes cube cubes sphere spheres ball balls box boxes ring rings cross stripe stripes
pattern grid spiral wave waves
big small large tiny huge little long short tall wide narrow thick thin round flat sharp soft hard
old new young beautiful ugly pretty cute happy sad angry calm quiet loud fast slow hot cold warm cool wet dry
clean dirty empty full open closed high low heavy simple complex detailed realistic abstract
cat cats dog dogs bird birds fish horse horses cow sheep pig lion tiger bear elephant monkey rabbit mouse
fox wolf deer duck chicken frog snake butterfly bee insect animal animals
man men woman women person people child children boy girl baby friend family face hand hands eye eyes
hair head body
house houses home building city town street road car cars bus truck train plane boat ship bicycle bridge
tower castle church school room kitchen door window wall floor roof garden park farm
tree trees flower flowers grass leaf leaves forest mountain mountains hill river lake sea ocean beach sand
rock stone sky cloud clouds sun moon rain snow fire water ice wind storm field desert island
table chair bed lamp book books cup bottle glass plate bowl food apple apples banana orange cake bread
pizza fruit vegetable coffee tea clock phone computer picture photo painting drawing
image art style photograph illustration sketch cartoon render portrait landscape scene view background
foreground texture color colour light shadow reflection
is sitting standing running walking flying swimming eating drinking holding looking playing sleeping
jumping smiling wearing riding reading writing painting make made see look go come get give take put
sit stand run walk fly swim eat drink hold play sleep jump smile wear ride read write draw paint
high quality best lowres blurry sharp focus detail hd photo realistic
"""

_PUNCTUATION = list(".,!?;:'\"-()[]{}/\\&*+=#%@$<>|_~`^")


def _default_vocab_words() -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    candidates = (
        _COMMON_WORDS.split()
        + [str(d) for d in range(10)]
        + [chr(c) for c in range(ord("a"), ord("z") + 1)]
        + _PUNCTUATION
    )
    for word in candidates:
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


#: Default tokenizer vocabulary: common English words, digits, letters and punctuation (lowercase).
DEFAULT_VOCAB_WORDS: tuple[str, ...] = tuple(_default_vocab_words())


def build_tiny_tokenizer(
    vocab_words: list[str] | None = None, model_max_length: int = _CLIP_MAX_LENGTH
) -> PreTrainedTokenizerFast:
    """Builds a word-level tokenizer in-process, without any download.

    The vocabulary is ``[<pad>, <unk>, *words, <|startoftext|>, <|endoftext|>]``: the end-of-text token
    has the highest id, as in CLIP, so both CLIP pooling rules (argmax id and first ``eos_token_id``)
    pick the same position. Text is lowercased and split on whitespace and punctuation; unknown words map
    to ``<unk>``. Every encoded sequence is wrapped as ``<|startoftext|> ... <|endoftext|>``.

    Args:
        vocab_words: Words of the vocabulary (lowercased, deduplicated, order kept). Defaults to
            :data:`DEFAULT_VOCAB_WORDS`.
        model_max_length: Maximum sequence length stored on the tokenizer.

    Returns:
        A fast tokenizer that supports ``padding="max_length"``, truncation, ``return_tensors="pt"`` and
        ``save_pretrained`` / ``from_pretrained``.
    """
    words = DEFAULT_VOCAB_WORDS if vocab_words is None else vocab_words
    specials = (PAD_TOKEN, UNK_TOKEN, BOS_TOKEN, EOS_TOKEN)
    vocab: dict[str, int] = {PAD_TOKEN: 0, UNK_TOKEN: 1}
    for word in words:
        word = word.lower()
        if word and word not in vocab and word not in specials:
            vocab[word] = len(vocab)
    vocab[BOS_TOKEN] = len(vocab)
    vocab[EOS_TOKEN] = len(vocab)

    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(True)]
    )
    backend.post_processor = TemplateProcessing(
        single=f"{BOS_TOKEN} $A {EOS_TOKEN}",
        pair=f"{BOS_TOKEN} $A {EOS_TOKEN} $B:1 {EOS_TOKEN}:1",
        special_tokens=[(BOS_TOKEN, vocab[BOS_TOKEN]), (EOS_TOKEN, vocab[EOS_TOKEN])],
    )
    backend.add_special_tokens(list(specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        truncation_side="right",
    )


def tiny_image_size(pipe_or_sample_size: DiffusionPipeline | int = 32) -> int:
    """Returns the pixel height/width that a tiny pipeline is meant to be called with.

    Args:
        pipe_or_sample_size: A pipeline from one of the tiny builders (also after a save/load round trip:
            the size is stored as the VAE's ``sample_size``), or the latent ``sample_size`` passed to a
            builder.

    Returns:
        ``sample_size * vae_scale_factor`` pixels.
    """
    if isinstance(pipe_or_sample_size, int):
        return pipe_or_sample_size * TINY_VAE_SCALE_FACTOR
    if isinstance(pipe_or_sample_size, QwenImagePipeline):  # its VAE records no sample size
        return TINY_QWEN_IMAGE_SIZE
    return int(pipe_or_sample_size.vae.config.sample_size)


def _check_sample_size(sample_size: int) -> None:
    if sample_size <= 0 or sample_size % 2:
        raise ValueError(f"sample_size must be a positive even number of latent pixels, got {sample_size}")


def _tiny_vae(*, seed: int, sample_size: int, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),  # two blocks -> vae_scale_factor == TINY_VAE_SCALE_FACTOR
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=sample_size * TINY_VAE_SCALE_FACTOR,  # pixels; read back by tiny_image_size()
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def clip_text_config(
    tokenizer: PreTrainedTokenizerFast, *, hidden_size: int, projection_dim: int | None = None
) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=projection_dim if projection_dim is not None else hidden_size,
        num_hidden_layers=2,  # pipelines read hidden_states[-2]; keep it distinct from the embeddings
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        # CLIP pools at the first ``eos_token_id``; an id of exactly 2 would select the legacy argmax rule.
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def tiny_t5_settings(vocab_size: int, pad_id: int, eos_id: int, d_model: int) -> dict[str, Any]:
    """Config fields of a 2-layer T5-family encoder of width ``d_model`` (4 heads of 8 dims, gated-GELU FFN of
    ``2 d_model``, no dropout), for ``T5Config`` and ``UMT5Config`` alike."""
    return {
        "vocab_size": vocab_size, "d_model": d_model, "d_kv": 8, "d_ff": 2 * d_model, "num_layers": 2,
        "num_decoder_layers": 0, "num_heads": 4, "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32, "dropout_rate": 0.0, "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": False, "use_cache": False, "pad_token_id": pad_id, "eos_token_id": eos_id,
        "decoder_start_token_id": pad_id,
    }


def _t5_encoder(tokenizer: PreTrainedTokenizerFast, *, seed: int, d_model: int) -> T5EncoderModel:
    torch.manual_seed(seed)
    config = T5Config(**tiny_t5_settings(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, d_model))
    return T5EncoderModel(config)


def _finalize(pipe: DiffusionPipeline, dtype: torch.dtype) -> None:
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            # Eval mode, like ``from_pretrained``: the VAE in train mode decodes ~1e-6 differently, so
            # outputs would not match the same pipeline after a save/load round trip bit for bit.
            component.eval()
            if dtype != torch.float32:
                # Plain ``nn.Module.to``: diffusers' override warns about fp32-pinned modules even when
                # there are none, and nothing in these tiny models needs pinning.
                torch.nn.Module.to(component, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)


SD3_MID_TRANSFORMER: dict[str, Any] = {"num_layers": 8, "attention_head_dim": 64, "num_attention_heads": 6}
"""A mid-size random SD3 transformer (~30M parameters) for CPU benchmarks: ``transformer_kwargs=...``."""


def build_tiny_sd3_pipeline(
    *,
    seed: int = 0,
    sample_size: int = 32,
    with_t5: bool = False,
    dtype: torch.dtype = torch.float32,
    transformer_kwargs: dict[str, Any] | None = None,
) -> StableDiffusion3Pipeline:
    """Builds a tiny random Stable Diffusion 3 pipeline offline.

    Shapes mirror SD3 at toy scale: two CLIP text encoders with projections (hidden 16 and 32, so their
    concatenated hidden states are zero-padded to the 64-wide joint space like CLIP-L/G into T5-XXL), an
    optional T5 encoder of width 64, an MMDiT with patch size 2 and a 4-channel VAE that downsamples by 2.
    Without T5, ``text_encoder_3``/``tokenizer_3`` are ``None`` and the pipeline feeds zeros in their place.

    Args:
        seed: Seed for all random weights; the global torch RNG state is restored afterwards.
        sample_size: Latent height/width (must be even). Call the pipeline with
            ``height = width = sample_size * 2`` pixels (:func:`tiny_image_size`).
        with_t5: Whether to include a tiny T5 encoder as ``text_encoder_3``.
        dtype: Dtype of every module.
        transformer_kwargs: Overrides of the transformer config (e.g. :data:`SD3_MID_TRANSFORMER`);
            ``caption_projection_dim`` follows the attention width.

    Returns:
        The pipeline on CPU, every module in eval mode (as after ``from_pretrained``), progress bar off.
    """
    _check_sample_size(sample_size)
    clip_l_dim, clip_g_dim, joint_dim = 16, 32, 64
    tkw: dict[str, Any] = {"num_layers": 1, "attention_head_dim": 8, "num_attention_heads": 4}
    tkw.update(transformer_kwargs or {})
    tkw.setdefault("caption_projection_dim", tkw["attention_head_dim"] * tkw["num_attention_heads"])
    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tiny_tokenizer()
        tokenizer_2 = build_tiny_tokenizer()

        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=2,
            in_channels=4,
            joint_attention_dim=joint_dim,
            pooled_projection_dim=clip_l_dim + clip_g_dim,
            **tkw,
            out_channels=4,
            pos_embed_max_size=sample_size,  # allows up to 2x the default resolution
        )
        vae = _tiny_vae(seed=seed + 1, sample_size=sample_size, scaling_factor=1.5035, shift_factor=0.0609)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModelWithProjection(clip_text_config(tokenizer, hidden_size=clip_l_dim))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2, hidden_size=clip_g_dim))
        if with_t5:
            tokenizer_3 = build_tiny_tokenizer(model_max_length=_T5_MAX_LENGTH)
            text_encoder_3 = _t5_encoder(tokenizer_3, seed=seed + 4, d_model=joint_dim)
        else:
            tokenizer_3, text_encoder_3 = None, None
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    _finalize(pipe, dtype)
    return pipe


def build_tiny_flux_pipeline(
    *, seed: int = 0, sample_size: int = 32, guidance_embeds: bool = True, dtype: torch.dtype = torch.float32
) -> FluxPipeline:
    """Builds a tiny random FLUX.1 pipeline offline.

    Shapes mirror FLUX.1 at toy scale: a CLIP text encoder (hidden 32, its pooled output feeds the
    transformer), a T5 encoder of width 32, a transformer with one double and one single stream block
    (2 heads of 16 dims, RoPE axes ``(4, 4, 8)``) over 2x2-packed latents of a 4-channel VAE that
    downsamples by 2, and a flow-matching scheduler with FLUX's resolution-dependent (dynamic) shift.

    Args:
        seed: Seed for all random weights; the global torch RNG state is restored afterwards.
        sample_size: Latent height/width (must be even for 2x2 packing). Call the pipeline with
            ``height = width = sample_size * 2`` pixels (:func:`tiny_image_size`); the builder also sets
            ``pipe.default_sample_size`` so that omitting them gives this size (restored by
            :func:`load_tiny_pipeline`, not by a plain ``FluxPipeline.from_pretrained``).
        guidance_embeds: Whether the transformer embeds a distilled guidance scale (FLUX.1-dev style);
            ``False`` gives a FLUX.1-schnell style transformer.
        dtype: Dtype of every module.

    Returns:
        The pipeline on CPU, every module in eval mode (as after ``from_pretrained``), progress bar off.
    """
    _check_sample_size(sample_size)
    clip_dim, t5_dim, latent_channels = 32, 32, 4
    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tiny_tokenizer()
        tokenizer_2 = build_tiny_tokenizer(model_max_length=_T5_MAX_LENGTH)

        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * latent_channels,  # 2x2 packed latents
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=t5_dim,
            pooled_projection_dim=clip_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),  # sums to attention_head_dim
        )
        vae = _tiny_vae(seed=seed + 1, sample_size=sample_size, scaling_factor=0.3611, shift_factor=0.1159)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden_size=clip_dim))
        text_encoder_2 = _t5_encoder(tokenizer_2, seed=seed + 3, d_model=t5_dim)
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        )

    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.default_sample_size = sample_size  # FluxPipeline hard-codes 128 otherwise
    _finalize(pipe, dtype)
    return pipe


QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
)
"""Special tokens of the tiny Qwen tokenizer, as in Qwen2.5-VL's (``<|endoftext|>`` pads; the chat markers frame the
prompt template; the vision ids are the text encoder config's image / video token ids)."""

_QWEN_LATENT_SIZE = 8
#: Pixel height / width the tiny Qwen-Image pipeline is called with by default (latent 8 x VAE factor 4).
TINY_QWEN_IMAGE_SIZE = 32


def _qwen_prompt_template() -> tuple[str, int]:
    """``QwenImagePipeline``'s prompt template and the number of template-prefix tokens its ``encode_prompt`` drops,
    read from the installed diffusers (a pipeline without components) rather than copied."""
    bare = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return bare.prompt_template_encode, bare.prompt_template_encode_start_idx


def build_tiny_qwen_tokenizer(vocab_words: list[str] | None = None) -> Qwen2Tokenizer:
    """Builds a tiny byte-level BPE ``Qwen2Tokenizer`` in-process, without any download.

    The merges are learnt (``tokenizers``' BPE trainer, deterministic) from ``QwenImagePipeline``'s prompt
    template and the vocabulary words, so the template's system prefix is exactly
    ``prompt_template_encode_start_idx`` (34) tokens, as with the real Qwen2.5-VL tokenizer: ``encode_prompt``
    drops the same prefix. Any text tokenizes (byte-level fallback); words of the vocabulary, with or without a
    leading space, are one token each. Right padding with ``<|endoftext|>``, as Qwen2.5-VL.

    Args:
        vocab_words: Words to learn merges for. Defaults to :data:`DEFAULT_VOCAB_WORDS`.

    Raises:
        RuntimeError: the template prefix does not tokenize to the pipeline's drop index (a diffusers change).
    """
    words = list(DEFAULT_VOCAB_WORDS if vocab_words is None else vocab_words)
    template, drop = _qwen_prompt_template()
    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=1 << 16, min_frequency=1, show_progress=False, special_tokens=list(QWEN_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([template.format(""), " ".join(words), *words], trainer)
    vocab, merges = _bpe_vocab_and_merges(backend)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS[1:]])
    prefix = len(tokenizer(template.split("{}")[0]).input_ids)
    if prefix != drop:
        raise RuntimeError(f"the tiny Qwen tokenizer splits QwenImagePipeline's template prefix into {prefix} tokens, "
                           f"but encode_prompt drops {drop}; the installed diffusers changed its template")
    return tokenizer


def _bpe_vocab_and_merges(backend: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and the merges (in rank order) of a trained BPE ``backend``."""
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


def build_tiny_qwen_image_pipeline(seed: int = 0, *, dtype: torch.dtype = torch.float32) -> QwenImagePipeline:
    """Builds a tiny random Qwen-Image pipeline offline.

    Shapes mirror Qwen-Image at toy scale: a Qwen2.5-VL text encoder (2 layers of width 32, multimodal RoPE
    sections ``(2, 2, 4)``, a 1-block vision tower the pipeline never calls) whose last hidden states feed a
    2-block MMDiT (2 heads of 16 dims, RoPE axes ``(4, 6, 6)``) over 2x2-packed latents of a 4-channel causal
    video VAE (``AutoencoderKLQwenImage``) that downsamples space by 4 (``vae_scale_factor`` 4, so height and
    width are multiples of 8), with non-trivial per-channel ``latents_mean`` / ``latents_std``, and Qwen-Image's
    released scheduler settings (dynamic exponential shift, ``max_image_seq_len`` 8192, ``shift_terminal`` 0.02).

    Args:
        seed: Seed for all random weights; the global torch RNG state is restored afterwards.
        dtype: Dtype of every module.

    Returns:
        The pipeline on CPU, every module in eval mode (as after ``from_pretrained``), progress bar off, and
        ``default_sample_size`` set so that omitting height / width gives :data:`TINY_QWEN_IMAGE_SIZE` pixels
        (restored by :func:`load_tiny_pipeline`, not by a plain ``QwenImagePipeline.from_pretrained``).
    """
    text_dim, latent_channels = 32, 4
    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tiny_qwen_tokenizer()
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * latent_channels,  # 2x2 packed latents
            out_channels=latent_channels,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_dim,
            guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(
            base_dim=16,
            z_dim=latent_channels,
            dim_mult=[1, 2, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True],  # vae_scale_factor = 2 ** 2
            latents_mean=[0.1, -0.2, 0.3, 0.0],
            latents_std=[1.5, 0.8, 1.2, 2.0],
        )
        torch.manual_seed(seed + 2)
        config = Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(tokenizer), "hidden_size": text_dim, "intermediate_size": 2 * text_dim,
                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                "max_position_embeddings": 2048, "rope_theta": 1_000_000.0,
                "rope_scaling": {"rope_type": "default", "mrope_section": [2, 2, 4]},  # sums to head_dim / 2
                "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                "pad_token_id": ids["<|endoftext|>"],
            },
            vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                           "out_hidden_size": text_dim, "fullatt_block_indexes": [0]},
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(config)
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=1.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=0.9,
            base_image_seq_len=256,
            max_image_seq_len=8192,
            shift_terminal=0.02,
            time_shift_type="exponential",
        )

    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.default_sample_size = _QWEN_LATENT_SIZE  # QwenImagePipeline hard-codes 128 (1024 px) otherwise
    _finalize(pipe, dtype)
    return pipe


def save_tiny_pipeline(pipe: DiffusionPipeline, path: str | Path) -> Path:
    """Saves a pipeline with ``save_pretrained`` in safetensors format.

    Args:
        pipe: Pipeline to save (typically from one of the tiny builders).
        path: Target folder; created if missing.

    Returns:
        The folder as a :class:`~pathlib.Path`, loadable with :func:`load_tiny_pipeline` (or with
        ``<PipelineClass>.from_pretrained``, passing ``None`` for absent required components).
    """
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    logger.debug("saved %s to %s", type(pipe).__name__, path)
    return path


def load_tiny_pipeline(
    path: str | Path, pipeline_cls: type[DiffusionPipeline] = DiffusionPipeline, **kwargs: Any
) -> DiffusionPipeline:
    """Loads a pipeline saved by :func:`save_tiny_pipeline` from its local folder, allowing absent parts.

    ``from_pretrained`` refuses folders whose ``model_index.json`` lists a required component as
    ``[null, null]`` (e.g. SD3 saved without T5: ``text_encoder_3``/``tokenizer_3`` are not optional
    components of ``StableDiffusion3Pipeline``) unless those are passed explicitly as ``None``; this
    helper does that. For FLUX pipelines it also restores ``default_sample_size`` from the VAE config.

    Args:
        path: Folder written by ``save_pretrained``.
        pipeline_cls: Class whose ``from_pretrained`` is used; the default dispatches on ``_class_name``.
        **kwargs: Extra ``from_pretrained`` arguments (e.g. ``torch_dtype``); they take precedence.

    Returns:
        The loaded pipeline with its progress bar disabled.
    """
    from alignkit.modalities.diffusers_common import absent_components

    path = Path(path)
    kwargs = {**absent_components(str(path)), **kwargs}
    pipe = pipeline_cls.from_pretrained(path, **kwargs)
    if isinstance(pipe, FluxPipeline) and pipe.vae is not None:
        pipe.default_sample_size = int(pipe.vae.config.sample_size) // int(pipe.vae_scale_factor)
    if isinstance(pipe, QwenImagePipeline):
        pipe.default_sample_size = _QWEN_LATENT_SIZE
    pipe.set_progress_bar_config(disable=True)
    return pipe
