"""Learned image-text preference rewards: PickScore, CLIPScore, HPSv2, LAION aesthetic, ImageReward.

Every reward here is a callable ``reward(samples, prompts, metadata) -> list[float | None]`` on images
``[B, 3, H, W]`` in [0, 1]. Shared behaviour (:class:`PreferenceReward`):

* Images are quantised to uint8 PIL images (:func:`rewards.common.to_pil`) and handed to the model's own
  preprocessing, so a score equals what the reference implementation gives for the saved image file.
  The rewards are not differentiated, so the quantisation costs nothing.
* An image with a non-finite pixel scores ``None`` (masked by the reward set) and is never fed to the model.
* Scoring runs in chunks of ``batch_size`` under ``torch.no_grad``; scores do not depend on the chunking.
* ``device`` defaults to CUDA when available; ``dtype`` (a ``torch.dtype`` or its name, e.g. ``"bfloat16"``)
  is the backbone's dtype, float32 by default. Small MLP heads always run in float32.
* ``model`` / checkpoint arguments accept a Hugging Face hub id or a local folder (or file, for single
  checkpoints); nothing runs remote code.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from alignkit.rewards.common import check_images, to_pil

logger = logging.getLogger(__name__)

ModuleT = TypeVar("ModuleT", bound=nn.Module)

HPS_FILES: dict[str, str] = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
"""HPS version -> checkpoint file in the ``xswu/HPSv2`` hub repository."""

IMAGEREWARD_MEAN, IMAGEREWARD_STD = 0.16717362830052426, 1.0333394966054072
"""Standardisation of the ImageReward head output, from the reference implementation."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``None`` -> float32; a name such as ``"bfloat16"`` or ``"torch.float16"`` -> that floating dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not a torch floating dtype; use float32, float16 or bfloat16")
    return resolved


def resolve_file(source: str | Path, filename: str) -> Path:
    """A checkpoint file from ``source``: the file itself, ``filename`` inside a local folder, or
    ``filename`` downloaded from the hub repository ``source``."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if not (path / filename).is_file():
            raise FileNotFoundError(f"{path} has no {filename!r}; put the checkpoint there or pass the file's path")
        return path / filename
    if path.is_absolute() or str(source).startswith((".", "~")) or str(source).count("/") > 1:
        raise FileNotFoundError(f"{source} does not exist; pass an existing file or folder, or a hub repo id "
                                "'owner/name'")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=str(source), filename=filename))


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save`` checkpoint (loaded with ``weights_only=True``;
    a ``{"state_dict": ...}`` wrapper is unwrapped)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict of tensors")
    return state


def load_strict(module: ModuleT, state: dict[str, torch.Tensor], source: str | Path, fix: str = "") -> ModuleT:
    """Load every weight of ``module`` from ``state`` (strict); returns it in eval mode without gradients."""
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{source} does not fit {type(module).__name__}{fix}: {exc}") from exc
    return module.eval().requires_grad_(False)


def pooled(output: Any) -> torch.Tensor:
    """Projected CLIP features: transformers 4.x returns a tensor, 5.x an output object (``pooler_output``)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ScoreHead(nn.Module):
    """The MLP of the LAION improved aesthetic predictor, reused by ImageReward.

    ``layers``: Linear(d, 1024), Dropout(0.2), Linear(1024, 128), Dropout(0.2), Linear(128, 64), Dropout(0.1),
    Linear(64, 16), Linear(16, 1), no activations, so state-dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``.
    """

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_features, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)  # [B]

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str | Path) -> ScoreHead:
        if "layers.0.weight" not in state:
            raise ValueError(f"{source} is not a score-head checkpoint: it has no 'layers.0.weight' "
                             f"(keys: {sorted(state)[:8]})")
        return load_strict(cls(state["layers.0.weight"].shape[1]), state, source)


def offline_clip_tokenizer(folder: Path) -> Any:
    """A transformers ``CLIPTokenizer`` written to ``folder`` from open_clip's copy of the real CLIP BPE merges
    (the released CLIP vocabulary, offline): for building CLIP-family models in tests and benchmarks."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder)


class PreferenceReward:
    """Base of the rewards in this module: input checks, NaN masking, PIL conversion and batching.

    Subclasses implement :meth:`score_batch` on at most ``batch_size`` PIL images and their prompts.
    """

    def __init__(self, device: str | torch.device | None, dtype: str | torch.dtype | None, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.batch_size = batch_size

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """``[b]`` scores of ``images`` for ``prompts``."""
        raise NotImplementedError

    def __call__(
        self, samples: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]] | None = None
    ) -> list[float | None]:
        images = check_images(samples)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{type(self).__name__}: got {images.shape[0]} images but {len(prompts)} prompts; "
                             "pass one prompt per image")
        finite = torch.isfinite(images).flatten(1).all(dim=1)  # [B]
        keep = finite.nonzero().flatten().tolist()
        if len(keep) < len(prompts):
            logger.warning("%s: %d of %d images have non-finite pixels; they score None",
                           type(self).__name__, len(prompts) - len(keep), len(prompts))
        scores: list[float | None] = [None] * len(prompts)
        with torch.no_grad():
            for start in range(0, len(keep), self.batch_size):
                index = keep[start : start + self.batch_size]
                out = self.score_batch(to_pil(images[index]), [prompts[i] for i in index])
                for i, v in zip(index, out.float().cpu().tolist(), strict=True):
                    scores[i] = v
        return scores


class CLIPReward(PreferenceReward):
    """A transformers ``CLIPModel`` with its ``CLIPProcessor``, giving L2-normalised embeddings.

    Preprocessing is the processor's: resize (shortest edge), centre crop and normalisation from its config;
    prompts are tokenised with padding and truncated to the text model's ``max_position_embeddings``.
    """

    def __init__(
        self,
        model: str,
        processor: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
    ) -> None:
        from transformers import CLIPModel, CLIPProcessor

        super().__init__(device, dtype, batch_size)
        self.model = CLIPModel.from_pretrained(model).to(self.device, self.dtype).eval().requires_grad_(False)
        self.processor = CLIPProcessor.from_pretrained(processor or model)
        self.max_length = self.model.config.text_config.max_position_embeddings

    def image_embeds(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return F.normalize(pooled(out).float(), dim=-1)  # [b, D]

    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.processor(text=prompts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        out = self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                           attention_mask=tokens["attention_mask"].to(self.device))
        return F.normalize(pooled(out).float(), dim=-1)  # [b, D]


class PickScore(CLIPReward):
    """PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos(image, prompt)`` of a CLIP-H fine-tuned on
    Pick-a-Pic preferences.

    Preprocessing: the CLIP-ViT-H-14 processor (224 px shortest-edge resize, centre crop, OpenAI CLIP
    normalisation). Output scale: about 17-24 for real images (logit scale 100 times a cosine near 0.2).
    """

    def __init__(
        self,
        model: str = "yuvalkirstain/PickScore_v1",
        processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
    ) -> None:
        super().__init__(model, processor, device, dtype, batch_size)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(-1)  # [b]
        return self.model.logit_scale.float().exp() * cos


class CLIPScore(CLIPReward):
    """CLIPScore (Hessel et al. 2021): ``w * max(cos(image, prefix + prompt), 0)``.

    Preprocessing: the model's own CLIP processor. ``prefix`` is the paper's "A photo depicts " caption
    prefix (set ``""`` to score the bare prompt). Output scale: [0, w]; about 0.5-1.0 with w = 2.5 for
    matching image-caption pairs.
    """

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        w: float = 2.5,
        prefix: str = "A photo depicts ",
        processor: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
    ) -> None:
        super().__init__(model, processor, device, dtype, batch_size)
        self.w, self.prefix = float(w), prefix

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        texts = [self.prefix + p for p in prompts]
        cos = (self.image_embeds(images) * self.text_embeds(texts)).sum(-1)  # [b]
        return self.w * cos.clamp(min=0)


class Aesthetic(CLIPReward):
    """LAION improved aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE``); prompts are ignored.

    The L2-normalised CLIP ViT-L/14 image embedding goes through :class:`ScoreHead` (float32). ``head`` is a
    hub repo, a local folder holding ``head_file``, or the checkpoint file itself (``.pth`` state dict or
    ``.safetensors``). Preprocessing: the CLIP processor (224 px resize, centre crop, CLIP normalisation).
    Output scale: the predicted mean rating on the 1-10 scale of AVA (typically 4-7).
    """

    def __init__(
        self,
        model: str = "openai/clip-vit-large-patch14",
        head: str = "camenduru/improved-aesthetic-predictor",
        head_file: str = "sac+logos+ava1-l14-linearMSE.pth",
        processor: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
    ) -> None:
        super().__init__(model, processor, device, dtype, batch_size)
        path = resolve_file(head, head_file)
        self.head = ScoreHead.from_state_dict(load_state_dict_file(path), path).to(self.device)
        if self.head.layers[0].in_features != self.model.config.projection_dim:
            raise ValueError(f"head {path} takes {self.head.layers[0].in_features}-d embeddings but {model} gives "
                             f"{self.model.config.projection_dim}-d; pair the head with its CLIP model")

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return self.head(self.image_embeds(images))


class HPSv2(PreferenceReward):
    """Human Preference Score v2 / v2.1 (Wu et al. 2023): ``cos(image, prompt)`` of an open_clip ViT-H-14
    fine-tuned on HPD v2.

    ``checkpoint`` is a hub repo (default ``xswu/HPSv2``), a local folder holding the version's file
    (:data:`HPS_FILES`), or the checkpoint file; its state dict replaces every weight of the ``arch`` model
    (so no base CLIP weights are downloaded). Preprocessing: open_clip's validation transform for ``arch``
    (bicubic shortest-edge resize to 224, centre crop, OpenAI CLIP normalisation); prompts are tokenised by
    open_clip's tokenizer (77 tokens). Output scale: a cosine, about 0.2-0.35 for real images. Needs the
    ``open-clip-torch`` package.
    """

    def __init__(
        self,
        version: str = "v2.1",
        checkpoint: str = "xswu/HPSv2",
        arch: str = "ViT-H-14",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
    ) -> None:
        if version not in HPS_FILES:
            raise ValueError(f"version={version!r}: use one of {sorted(HPS_FILES)}")
        try:
            import open_clip
        except ImportError as exc:
            raise ImportError("HPSv2 needs open_clip: pip install open-clip-torch") from exc
        super().__init__(device, dtype, batch_size)
        model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, output_dict=True)
        path = resolve_file(checkpoint, HPS_FILES[version])
        fix = f" (open_clip {arch!r}; pass the arch the checkpoint was trained with)"
        self.model = load_strict(model, load_state_dict_file(path), path, fix).to(self.device, self.dtype)
        self.tokenizer = open_clip.get_tokenizer(arch)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device, self.dtype)
        tokens = self.tokenizer(prompts).to(self.device)
        image = self.model.encode_image(pixels, normalize=True).float()  # [b, D]
        text = self.model.encode_text(tokens, normalize=True).float()  # [b, D]
        return (image * text).sum(-1)


def _blip_vision_key(key: str) -> str | None:
    """BLIP ``visual_encoder`` (timm ViT) parameter name -> transformers ``BlipVisionModel`` name; ``None`` when
    the name has no counterpart."""
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    if key in fixed:
        return fixed[key]
    parts = key.split(".", 2)
    if len(parts) < 3 or parts[0] != "blocks":
        return None
    for old, new in (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
                     ("attn.proj.", "self_attn.projection."), ("mlp.fc", "mlp.fc")):
        if parts[2].startswith(old):
            return f"encoder.layers.{parts[1]}.{new}{parts[2][len(old):]}"
    return None


def split_imagereward_state(
    state: dict[str, torch.Tensor], source: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An ImageReward checkpoint -> (``BlipVisionModel``, ``BlipTextModel``, :class:`ScoreHead`) state dicts.

    Other entries (BLIP's unused ``vision_proj`` / ``text_proj``, the ``position_ids`` buffer) are dropped.
    """
    vision_keys = {k: _blip_vision_key(k.removeprefix("blip.visual_encoder.")) for k in state
                   if k.startswith("blip.visual_encoder.")}
    if unknown := sorted(k for k, new in vision_keys.items() if new is None):
        raise ValueError(f"{source}: no BlipVisionModel counterpart for {unknown[:5]}; only plain BLIP ViT "
                         "checkpoints (no adapters) are supported")
    vision = {new: state[k] for k, new in vision_keys.items() if new is not None}
    text = {k.removeprefix("blip.text_encoder."): v for k, v in state.items()
            if k.startswith("blip.text_encoder.") and not k.endswith("position_ids")}
    head = {k.removeprefix("mlp."): v for k, v in state.items() if k.startswith("mlp.")}
    if not vision or not text:
        raise ValueError(f"{source} has no blip.visual_encoder.* or blip.text_encoder.* weights; "
                         "pass an ImageReward checkpoint")
    return vision, text, head


def blip_vision_from_state(state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """A ``BlipVisionModel`` whose architecture is read from ``state``'s shapes (64-dim heads, as in BLIP's
    ViT-B/16 and ViT-L/16; LayerNorm eps 1e-6, as in BLIP's ViT)."""
    from transformers import BlipVisionConfig, BlipVisionModel

    width = state["embeddings.class_embedding"].shape[-1]
    patch = state["embeddings.patch_embedding.weight"].shape[-1]
    grid = round((state["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
    config = BlipVisionConfig(
        hidden_size=width, num_attention_heads=max(width // 64, 1), patch_size=patch, image_size=grid * patch,
        num_hidden_layers=1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")),
        intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0], layer_norm_eps=1e-6,
    )
    return load_strict(BlipVisionModel(config), state, f"{source} blip.visual_encoder.*")


def blip_text_from_state(
    state: dict[str, torch.Tensor], med_config: dict[str, Any], encoder_width: int, source: str
) -> nn.Module:
    """BLIP's BERT text encoder with cross-attention to ``encoder_width``-d image tokens, from its
    ``med_config.json`` (a ``BertConfig``)."""
    from transformers import BlipTextConfig, BlipTextModel

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "layer_norm_eps", "hidden_act")
    if missing := [k for k in keys if k not in med_config]:
        raise ValueError(f"med_config.json of {source} lacks {missing}; pass ImageReward's BERT config")
    config = BlipTextConfig(
        **{k: med_config[k] for k in keys}, pad_token_id=med_config.get("pad_token_id", 0),
        encoder_hidden_size=encoder_width,  # BLIP sets the cross-attention width to the ViT's
        is_decoder=True,  # builds the cross-attention layers; forward() still runs bidirectionally by default
    )
    return load_strict(BlipTextModel(config, add_pooling_layer=False), state, f"{source} blip.text_encoder.*")


class ImageReward(PreferenceReward):
    """ImageReward v1.0 (Xu et al. 2023) on transformers' BLIP modules, without the ``image-reward`` package.

    The BLIP ViT encodes the image; the BERT text encoder reads the prompt with cross-attention to the image
    tokens; :class:`ScoreHead` maps the first ([CLS]) token to a score, standardised as
    ``(head - 0.167) / 1.033``. ``model`` is a hub repo (default ``THUDM/ImageReward``) or a local folder with
    ``ImageReward.pt`` (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``) and
    ``med_config.json`` (the BERT config). The vision architecture is read from the checkpoint's shapes
    (64-dim attention heads, as in BLIP's ViT-B/L); ``tokenizer`` is BLIP's BERT tokenizer (the two tokens
    BLIP adds never occur in prompts). Preprocessing: bicubic shortest-edge resize to the ViT's size, centre
    crop, OpenAI CLIP normalisation; prompts padded to 35 tokens and truncated. Output scale: standardised,
    about -2 to 2 (0 is the training mean).
    """

    def __init__(
        self,
        model: str = "THUDM/ImageReward",
        tokenizer: str = "google-bert/bert-base-uncased",
        checkpoint_file: str = "ImageReward.pt",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 16,
        max_length: int = 35,
    ) -> None:
        from transformers import BertTokenizer, CLIPImageProcessor

        super().__init__(device, dtype, batch_size)
        source = f"{model}/{checkpoint_file}"
        vision_state, text_state, head_state = split_imagereward_state(
            load_state_dict_file(resolve_file(model, checkpoint_file)), source
        )
        med_config = json.loads(resolve_file(model, "med_config.json").read_text())
        self.vision = blip_vision_from_state(vision_state, source).to(self.device, self.dtype)
        self.text = blip_text_from_state(text_state, med_config, self.vision.config.hidden_size, source)
        self.text = self.text.to(self.device, self.dtype)
        self.head = ScoreHead.from_state_dict(head_state, f"{source} (mlp.*)").to(self.device)
        self.tokenizer = BertTokenizer.from_pretrained(tokenizer)
        self.max_length = max_length
        size = self.vision.config.image_size
        self.image_processor = CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )  # defaults: bicubic resize, centre crop, OpenAI CLIP mean/std

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        image_tokens = self.vision(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state  # [b, N, D]
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt")
        out = self.text(
            input_ids=text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=self.device),
        )
        return (self.head(out.last_hidden_state[:, 0].float()) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
