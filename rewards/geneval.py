"""GenEval as a reward without mmdetection: a transformers Mask2Former for COCO instances, CLIP for colours and
GenEval's rules (:mod:`alignkit.rewards.geneval_rules`).

``reward=geneval`` scores images ``[B, 3, H, W]`` in [0, 1] against their prompts' GenEval metadata
(``prompts.source=geneval`` or a GenEval ``.jsonl`` prompt file) and returns, per image, by ``mode``:

* ``score`` (default): the flow_grpo reward server's partial credit, the value Flow-GRPO and TempFlow-GRPO train
  on (at most 1; it can be negative: ``1 - |c - n| / c`` is not clipped);
* ``correct``: GenEval's per-image correctness (1.0 / 0.0), the benchmark number;
* ``strict``: the server's strict verdict (exact counts), 1.0 / 0.0.

:meth:`GenEval.verdicts` returns all three with the partial-credit terms and GenEval's reasons, and
:func:`alignkit.rewards.geneval_rules.summarize` turns correctness into GenEval's per-task table and Overall.

Pipeline, per image (``geneval.md`` sections 2-4):

1. **Detector** (:class:`Mask2FormerDetector`, default ``facebook/mask2former-swin-small-coco-instance``: the
   architecture, data and task of GenEval's mmdetection Mask2Former Swin-S, with weights trained by the
   Mask2Former authors rather than mmdetection's checkpoint). The image is resized so that its short side is
   ``detector_size`` (800) and its long side at most ``detector_max_size`` (1333), as mmdetection tests it,
   whatever the checkpoint's preprocessor says. Post-processing follows mmdetection rather than transformers'
   ``post_process_instance_segmentation``: mask logits are resized bilinearly to the input, cropped to the
   image's valid region and resized bilinearly to the image size before thresholding at logit 0; the 100 best
   (query, class) pairs over the 80 classes are kept (a query may appear under two classes); score = class
   probability x mean mask probability over the binary mask; box = the mask's tight box
   ``[min x, min y, max x + 1, max y + 1]``. Labels are mapped to GenEval's names by COCO name (``mouse``,
   ``remote`` and ``keyboard`` renamed).
2. **Filter and rules** (:func:`~alignkit.rewards.geneval_rules.judge`): score above 0.3 (0.9 for every class of a
   ``counting`` row), 16 per class, no overlap suppression, GenEval's position rule with margin 0.1.
3. **Colour** (:class:`ColorClassifier`, default ``openai/clip-vit-large-patch14``, the weights of open_clip's
   ``ViT-L-14`` "openai"), only for the detections a colour clause reads: the image composited over flat
   ``#999999`` grey through the object's mask, cropped to its box; CLIP zero-shot over the 10 colours with three
   templates per colour for the object's class ("a photo of a {c} {X}", "a photo of a {c}-colored {X}",
   "a photo of a {c} object"), each text embedding L2-normalised, averaged per colour and re-normalised; the
   colour is the argmax of the cosine with the crop's embedding. Preprocessing is the CLIP processor's
   (224 px bicubic short-side resize, centre crop, OpenAI mean/std).

Known differences to GenEval's numbers: the detector weights and the resize kernels differ from mmdetection's,
so scores near the thresholds and duplicate counts can differ (counting is the most sensitive task); where the
resized image is not a multiple of 32 pixels, transformers' processor stretches it to one where mmdetection pads
(square 512 or 1024 px images resize to 800 x 800 either way). flow_grpo's
client JPEG-encodes images and its server hands the detector RGB as BGR; neither is reproduced here.

Images with a non-finite pixel score ``None``. A metadata row that is missing, malformed or names a class the
detector does not know raises :class:`~alignkit.rewards.geneval_rules.GenEvalMetadataError` naming the field,
before any model runs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from alignkit.errors import ModelLoadError
from alignkit.rewards.common import check_images, to_pil
from alignkit.rewards.geneval_rules import (
    COCO_NAMES,
    COCO_RENAMES,
    COLORS,
    OBJECT_NAMES,
    Detection,
    GenEvalConfig,
    Verdict,
    colors_needed,
    judge,
    parse_rows,
)
from alignkit.rewards.preference import CLIPReward, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"
MODES: tuple[str, ...] = ("score", "correct", "strict")
COLOR_TEMPLATES: tuple[str, ...] = ("a photo of a {color} {name}", "a photo of a {color}-colored {name}",
                                    "a photo of a {color} object")
"""GenEval's colour prompts (always "a", even before "orange")."""
BACKGROUND = "#999999"


def geneval_label_names(id2label: Mapping[Any, str]) -> dict[int, str]:
    """Detector label id -> GenEval object name, matched by COCO name (case, ``_`` and spaces ignored; ``mouse``,
    ``remote`` and ``keyboard`` take GenEval's names; GenEval's own names are accepted too). Labels outside COCO's
    80 (e.g. unused ids) are left out.

    Raises:
        ValueError: two labels map to one name.
    """
    known = {name: name for name in OBJECT_NAMES} | COCO_RENAMES
    out: dict[int, str] = {}
    for key, label in id2label.items():
        name = known.get(" ".join(str(label).replace("_", " ").lower().split()))
        if name is None:
            continue
        if name in out.values():
            raise ValueError(f"the detector's labels map two ids to {name!r} ({dict(id2label)}); "
                             "use a COCO detector with one label per class")
        out[int(key)] = name
    return out


@dataclass
class Instances:
    """Instance-segmentation results of one image (``k`` instances, image of ``H x W`` pixels).

    Attributes:
        labels: ``[k]`` detector label ids.
        scores: ``[k]`` class probability x mean mask probability over the binary mask.
        masks: ``[k, H, W]`` bool binary masks.
        boxes: ``[k, 4]`` tight boxes of the masks ``(min x, min y, max x + 1, max y + 1)``; zeros for empty masks.
    """

    labels: torch.Tensor
    scores: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """``[k, H, W]`` bool masks -> ``[k, 4]`` float boxes ``(min x, min y, max x + 1, max y + 1)`` (mmdetection's
    ``mask2bbox``; zeros for an empty mask)."""
    _, h, w = masks.shape
    cols = masks.any(dim=1)  # [k, W]
    rows = masks.any(dim=2)  # [k, H]
    xs = torch.arange(w, device=masks.device)
    ys = torch.arange(h, device=masks.device)
    x1 = torch.where(cols, xs, w).amin(dim=1)
    x2 = torch.where(cols, xs, -1).amax(dim=1) + 1
    y1 = torch.where(rows, ys, h).amin(dim=1)
    y2 = torch.where(rows, ys, -1).amax(dim=1) + 1
    boxes = torch.stack([x1, y1, x2, y2], dim=1).float()  # [k, 4]
    return torch.where(cols.any(dim=1, keepdim=True), boxes, torch.zeros_like(boxes))


def mask2former_instances(class_logits: torch.Tensor, mask_logits: torch.Tensor, input_size: tuple[int, int],
                          valid_size: tuple[int, int], image_size: tuple[int, int], top_k: int = 100) -> Instances:
    """mmdetection's Mask2Former instance post-processing of one image.

    Args:
        class_logits: ``[Q, K + 1]`` class logits (the last class is "no object").
        mask_logits: ``[Q, h, w]`` mask logits (a quarter of the input resolution).
        input_size: ``(H_in, W_in)`` of the padded model input.
        valid_size: the image's ``(h, w)`` inside the input (the rest is padding).
        image_size: ``(H, W)`` of the original image.
        top_k: (query, class) pairs kept (mmdetection: 100).
    """
    probs = class_logits.float().softmax(dim=-1)[:, :-1]  # [Q, K]
    num_classes = probs.shape[1]
    class_scores, flat = probs.flatten().topk(min(top_k, probs.numel()))  # [k], best first
    queries, labels = flat // num_classes, flat % num_classes
    used, inverse = queries.unique(return_inverse=True)
    logits = F.interpolate(mask_logits[used].float()[None], size=input_size, mode="bilinear", align_corners=False)
    logits = logits[:, :, : valid_size[0], : valid_size[1]]
    logits = F.interpolate(logits, size=image_size, mode="bilinear", align_corners=False)[0][inverse]  # [k, H, W]
    masks = logits > 0
    mask_scores = (logits.sigmoid() * masks).flatten(1).sum(1) / (masks.flatten(1).sum(1) + 1e-6)  # [k]
    return Instances(labels, class_scores * mask_scores, masks, mask_boxes(masks))


def _load(what: str, source: str, load: Any, fix: str) -> Any:
    try:
        return load()
    except OSError as exc:
        raise ModelLoadError(f"GenEval {what}={source!r} cannot be loaded: {str(exc).strip()} {fix}") from exc


class Mask2FormerDetector:
    """COCO instance segmentation with a transformers Mask2Former, post-processed as mmdetection does (see the
    module docstring). Call it on PIL images; it returns each image's :class:`Detection` list with GenEval names.

    Attributes:
        classes: the GenEval object names the detector knows.
    """

    def __init__(self, model: str = DEFAULT_DETECTOR, *, size: int = 800, max_size: int = 1333, top_k: int = 100,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 revision: str | None = None) -> None:
        from transformers import AutoConfig, AutoImageProcessor, Mask2FormerForUniversalSegmentation

        if size < 32 or max_size < size:
            raise ValueError(f"detector_size={size}, detector_max_size={max_size}: need 32 <= size <= max size "
                             "(GenEval: 800 and 1333)")
        if top_k < 1:
            raise ValueError(f"top_k={top_k}: keep at least one (query, class) pair (mmdetection: 100)")
        fix = ("Give a Mask2Former COCO instance-segmentation folder (save_pretrained) or hub id, e.g. "
               f"{DEFAULT_DETECTOR}.")
        config = _load("detector", model, lambda: AutoConfig.from_pretrained(model, revision=revision), fix)
        if config.model_type != "mask2former":
            raise ValueError(f"GenEval detector={model!r} is a {config.model_type!r} model; {fix}")
        self.label_names = geneval_label_names(config.id2label)
        if not self.label_names:
            raise ValueError(f"GenEval detector={model!r} has no COCO labels (id2label starts "
                             f"{dict(list(config.id2label.items())[:3])}); {fix}")
        self.classes = frozenset(self.label_names.values())
        if missing := [n for n in OBJECT_NAMES if n not in self.classes]:
            logger.warning("GenEval detector %s lacks %d of GenEval's classes (%s); prompts naming them are refused",
                           model, len(missing), ", ".join(missing[:5]))
        self.device, self.dtype, self.top_k = resolve_device(device), resolve_dtype(dtype), top_k
        self.processor = _load("detector", model, lambda: AutoImageProcessor.from_pretrained(
            model, revision=revision, size={"shortest_edge": size, "longest_edge": max_size}), fix)
        self.model = _load("detector", model, lambda: Mask2FormerForUniversalSegmentation.from_pretrained(
            model, revision=revision), fix).to(self.device, self.dtype).eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], min_score: float = 0.0) -> list[list[Detection]]:
        """Detections with a score above ``min_score`` (a pre-filter: GenEval's own filter runs later), per image."""
        inputs = self.processor(images=list(images), return_tensors="pt")
        pixel_mask = inputs["pixel_mask"]  # [B, H_in, W_in]
        out = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
                         pixel_mask=pixel_mask.to(self.device))
        input_size = tuple(pixel_mask.shape[-2:])
        results = []
        for i, image in enumerate(images):
            valid = (int(pixel_mask[i].any(dim=1).sum()), int(pixel_mask[i].any(dim=0).sum()))
            inst = mask2former_instances(out.class_queries_logits[i], out.masks_queries_logits[i], input_size,
                                         valid, (image.height, image.width), self.top_k)
            dets = []
            for j in torch.nonzero(inst.scores > min_score).flatten().tolist():
                name = self.label_names.get(int(inst.labels[j]))
                if name is not None:
                    dets.append(Detection(name, float(inst.scores[j]), tuple(inst.boxes[j].tolist()),
                                          inst.masks[j].cpu().numpy()))
            results.append(dets)
        return results


def color_crop(image: Image.Image, detection: Detection, background: str = BACKGROUND) -> Image.Image:
    """GenEval's colour input: ``image`` composited over flat ``background`` through the detection's mask (when it
    has one), cropped to its box (PIL rounds the box to whole pixels)."""
    if detection.mask is not None:
        if detection.mask.shape != (image.height, image.width):
            raise ValueError(f"mask of shape {detection.mask.shape} for an image of {image.height}x{image.width}; "
                             "masks cover the whole image")
        blank = Image.new("RGB", image.size, background)
        image = Image.composite(image.convert("RGB"), blank, Image.fromarray(detection.mask))
    return image.crop(detection.box)


def check_background(background: str) -> str:
    """``background`` if PIL reads it as a colour.

    Raises:
        ValueError: naming the setting and GenEval's value.
    """
    from PIL import ImageColor

    try:
        ImageColor.getrgb(background)
    except (ValueError, AttributeError):
        raise ValueError(f"background={background!r} is not a colour; GenEval uses '#999999'") from None
    return background


class ColorClassifier:
    """CLIP zero-shot colour of object crops, GenEval's way (module docstring); class embeddings are cached."""

    def __init__(self, model: str = DEFAULT_CLIP, processor: str | None = None, *, background: str = BACKGROUND,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 batch_size: int = 16) -> None:
        self.background = check_background(background)
        self.clip = _load("clip", model, lambda: CLIPReward(model, processor, device, dtype, batch_size),
                          f"Give a CLIP folder or hub id, e.g. {DEFAULT_CLIP}.")
        self._classes: dict[str, torch.Tensor] = {}

    def class_embeddings(self, name: str) -> torch.Tensor:
        """``[10, D]`` normalised colour embeddings of the object name, in :data:`COLORS` order."""
        if name not in self._classes:
            texts = [t.format(color=c, name=name) for c in COLORS for t in COLOR_TEMPLATES]
            emb = self.clip.text_embeds(texts).view(len(COLORS), len(COLOR_TEMPLATES), -1)  # [10, 3, D]
            self._classes[name] = F.normalize(emb.mean(dim=1), dim=-1)
        return self._classes[name]

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image], requests: Sequence[tuple[int, Detection]]) -> list[str]:
        """The colour of each ``(image index, detection)``."""
        crops = [color_crop(images[i], d, self.background) for i, d in requests]
        step = self.clip.batch_size
        embeds = [self.clip.image_embeds(crops[s : s + step]) for s in range(0, len(crops), step)]
        out = []
        for e, (_, d) in zip(torch.cat(embeds) if embeds else [], requests):
            out.append(COLORS[int((self.class_embeddings(d.label) @ e).argmax())])
        return out


class GenEval:
    """GenEval reward (module docstring): ``reward(samples, prompts, metadata) -> list[float | None]``.

    Args:
        detector: Mask2Former COCO instance-segmentation checkpoint (hub id or folder).
        clip: CLIP checkpoint for colours; ``clip_processor`` when its processor lives elsewhere.
        mode: ``score`` (partial credit, Flow-GRPO's training reward), ``correct`` or ``strict``.
        threshold, counting_threshold, max_per_class, max_overlap, position_threshold: GenEval's filter and
            position settings (:class:`~alignkit.rewards.geneval_rules.GenEvalConfig`).
        detector_size, detector_max_size: the detector's input short side and long-side cap.
        background: the flat colour behind masked objects for the colour classifier.
        device, dtype: where and in which dtype the models run (CUDA when available; float32).
        batch_size: images per detector forward and crops per CLIP forward.
    """

    def __init__(self, detector: str = DEFAULT_DETECTOR, clip: str = DEFAULT_CLIP, mode: str = "score", *,
                 threshold: float = 0.3, counting_threshold: float = 0.9, max_per_class: int = 16,
                 max_overlap: float = 1.0, position_threshold: float = 0.1, detector_size: int = 800,
                 detector_max_size: int = 1333, background: str = BACKGROUND, clip_processor: str | None = None,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 batch_size: int = 8) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: use score (the partial credit Flow-GRPO trains on), correct "
                             "(GenEval's per-image verdict) or strict (exact counts)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        self.config = GenEvalConfig(threshold, counting_threshold, max_per_class, max_overlap, position_threshold)
        check_background(background)
        self.mode, self.batch_size = mode, batch_size
        self.detector = Mask2FormerDetector(detector, size=detector_size, max_size=detector_max_size, device=device,
                                            dtype=dtype)
        self.colors = ColorClassifier(clip, clip_processor, background=background, device=device, dtype=dtype,
                                      batch_size=batch_size)

    def verdicts(self, samples: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]] | None
                 ) -> list[Verdict | None]:
        """Every image's :class:`~alignkit.rewards.geneval_rules.Verdict` (``None`` for non-finite images)."""
        images = check_images(samples)
        if len(prompts) != images.shape[0]:
            raise ValueError(f"GenEval: got {images.shape[0]} images but {len(prompts)} prompts; pass one per image")
        rows = parse_rows(metadata, len(prompts), self.detector.classes)
        finite = torch.isfinite(images).flatten(1).all(dim=1).nonzero().flatten().tolist()
        if len(finite) < len(prompts):
            logger.warning("GenEval: %d of %d images have non-finite pixels; they score None",
                           len(prompts) - len(finite), len(prompts))
        pil = to_pil(images[finite]) if finite else []
        min_score = min(self.config.threshold, self.config.counting_threshold)
        detections: list[list[Detection]] = []
        for s in range(0, len(pil), self.batch_size):
            detections += self.detector(pil[s : s + self.batch_size], min_score)
        kept_rows = [rows[i] for i in finite]
        requests = [(j, k) for j, (dets, row) in enumerate(zip(detections, kept_rows))
                    for k in colors_needed(dets, row, self.config)]
        colors = self.colors(pil, [(j, detections[j][k]) for j, k in requests])
        for (j, k), color in zip(requests, colors):
            detections[j][k] = replace(detections[j][k], color=color)
        out: list[Verdict | None] = [None] * len(prompts)
        for i, dets, row in zip(finite, detections, kept_rows):
            out[i] = judge(dets, row, self.config)
        return out

    def __call__(self, samples: torch.Tensor, prompts: Sequence[str],
                 metadata: Sequence[Mapping[str, Any]] | None = None) -> list[float | None]:
        out: list[float | None] = []
        for v in self.verdicts(samples, prompts, metadata):
            if v is None:
                out.append(None)
            elif self.mode == "score":
                out.append(v.score)
            else:
                out.append(float(v.correct if self.mode == "correct" else v.strict))
        return out


def save_tiny_detector(folder: str | Path, *, seed: int = 0, num_queries: int = 10, size: int = 64) -> Path:
    """A tiny random Mask2Former (Swin backbone) with COCO's 80 labels and its image processor, saved with
    ``save_pretrained`` (tests and demos; nothing is downloaded)."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    folder = Path(folder)
    swin = SwinConfig(image_size=size, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=32,
        encoder_layers=1, decoder_layers=2, num_attention_heads=2, dim_feedforward=32, num_queries=num_queries,
        id2label=dict(enumerate(COCO_NAMES)),
    )
    torch.manual_seed(seed)
    Mask2FormerForUniversalSegmentation(config).eval().save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": size, "longest_edge": 2 * size}).save_pretrained(folder)
    return folder


def save_tiny_clip(folder: str | Path, *, seed: int = 0, size: int = 32) -> Path:
    """A tiny random CLIP (projection 32, ``size`` px) with a CLIP processor whose tokenizer is the real CLIP BPE
    vocabulary shipped by open_clip, saved with ``save_pretrained`` (tests and demos; needs ``open-clip-torch``)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from alignkit.rewards.preference import offline_clip_tokenizer

    folder = Path(folder)
    tokenizer = offline_clip_tokenizer(folder / "bpe")
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=size, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
