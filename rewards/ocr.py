"""OCR reward: does the image show the text quoted in the prompt? (Flow-GRPO's text-rendering reward.)

Target text: ``metadata["text"]`` when present, otherwise the first quoted span of the prompt
(``a sign that says "open late"`` -> ``open late``; ``"..."``, ``'...'``, ``“...”`` and ``‘...’`` are
recognised, whichever opens first). A prompt with no quoted span, or a target that is empty after
normalisation, cannot be scored: the reward returns ``None`` for that sample (masked, never a sentinel).

Preprocessing: images ``[B, 3, H, W]`` in [0, 1] are quantised to uint8; an image whose shorter side is
below ``min_side`` pixels is upscaled (bicubic, aspect ratio kept) so that side is ``min_side``, because
the detector cannot find text a few pixels high. OCR is rapidocr (PP-OCR ONNX models shipped inside the
``rapidocr`` wheel, run with onnxruntime; nothing is downloaded). Recognised lines, in rapidocr's reading
order (top to bottom, left to right), are joined with a space.

Text normalisation (both recognised and target text): ``lowercase`` casefolds; ``whitespace`` is
``"remove"`` (drop all whitespace, as Flow-GRPO does), ``"collapse"`` (runs of whitespace -> one space,
stripped) or ``"keep"``.

Output scale: [0, 1], 1 = the target was read exactly. ``scoring="normalized"`` (default) is one minus
the normalised edit distance, ``1 - lev(recognised, target) / max(len(target), len(recognised))``, which
also penalises extra text. ``scoring="flow_grpo"`` follows Flow-GRPO's ``flow_grpo/ocr.py``: ``d = 0`` if
the target is a substring of the recognised text, else ``d = min(lev(recognised, target), len(target))``;
score ``1 - d / len(target)``, so extra text around a correct rendering is not penalised. An image with
no readable text scores 0 under both.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from alignkit.rewards.common import to_uint8

logger = logging.getLogger(__name__)

SCORINGS = ("flow_grpo", "normalized")
WHITESPACE_MODES = ("remove", "collapse", "keep")

# The models rapidocr 3.10's default config uses and its wheel ships under rapidocr/models/.
_SHIPPED_MODELS = {
    "det": "PP-OCRv6_det_small.onnx",
    "rec": "PP-OCRv6_rec_small.onnx",
    "cls": "ch_ppocr_mobile_v2.0_cls_mobile.onnx",
}

# The first quoted span. A single quote opens/closes only at a word boundary, so apostrophes
# ("dog's", "don't") are not taken for quotes.
_QUOTE_PATTERNS = (
    re.compile(r'"(.*?)"', re.DOTALL),
    re.compile(r"“(.*?)”", re.DOTALL),
    re.compile(r"‘(.*?)’", re.DOTALL),
    re.compile(r"(?<!\w)'(.+?)'(?!\w)", re.DOTALL),
)


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance: the fewest single-character insertions, deletions and substitutions."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def quoted_text(prompt: str) -> str | None:
    """The first quoted span of ``prompt`` (without the quotes), or None when there is none."""
    best: re.Match[str] | None = None
    for pattern in _QUOTE_PATTERNS:
        m = pattern.search(prompt)
        if m is not None and (best is None or m.start() < best.start()):
            best = m
    return None if best is None else best.group(1)


def normalize_text(text: str, *, lowercase: bool = True, whitespace: str = "remove") -> str:
    """Casefold (``lowercase``) and treat whitespace per ``whitespace`` (remove / collapse / keep)."""
    if whitespace == "remove":
        text = re.sub(r"\s+", "", text)
    elif whitespace == "collapse":
        text = " ".join(text.split())
    elif whitespace != "keep":
        raise ValueError(f"whitespace={whitespace!r}; use one of {WHITESPACE_MODES}")
    return text.casefold() if lowercase else text


def ocr_score(recognized: str, target: str, scoring: str = "normalized") -> float:
    """Score in [0, 1] of already-normalised ``recognized`` text against a non-empty ``target``."""
    if not target:
        raise ValueError("target is empty; an empty target cannot be scored (the reward returns None for it)")
    if scoring == "flow_grpo":
        dist = 0 if target in recognized else min(edit_distance(recognized, target), len(target))
        return 1.0 - dist / len(target)
    if scoring == "normalized":
        return 1.0 - edit_distance(recognized, target) / max(len(target), len(recognized))
    raise ValueError(f"scoring={scoring!r}; use one of {SCORINGS}")


def upscale_min_side(image: np.ndarray, min_side: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 upscaled (bicubic) so that ``min(H, W) >= min_side``; larger images unchanged."""
    h, w = image.shape[:2]
    if min(h, w) >= min_side:
        return image
    scale = min_side / min(h, w)
    size = (max(min_side, round(w * scale)), max(min_side, round(h * scale)))  # PIL wants (W, H)
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


class OCRReward:
    """Reward = how closely rapidocr's reading of the image matches the prompt's quoted text.

    Args:
        scoring: ``"normalized"`` (``1 - lev / max(len)``, the default) or ``"flow_grpo"`` (a substring
            counts as exact, distance capped at the target length); see the module docstring.
        lowercase: casefold both texts before comparing.
        whitespace: ``"remove"``, ``"collapse"`` or ``"keep"`` whitespace before comparing.
        min_side: images whose shorter side is smaller are upscaled to it before OCR (pixels).
        min_confidence: recognised lines with a lower recognition score are ignored (0 keeps all, as
            Flow-GRPO does).
        use_angle_cls: run the 0/180 degree text-direction classifier (off in Flow-GRPO).
        num_threads: onnxruntime intra-op threads; None lets onnxruntime decide.
        text_key: metadata key whose string value overrides the quoted text.
        det_model_path, rec_model_path, cls_model_path: ONNX models; None uses those shipped in the
            rapidocr wheel.
    """

    def __init__(
        self,
        scoring: str = "normalized",
        lowercase: bool = True,
        whitespace: str = "remove",
        min_side: int = 256,
        min_confidence: float = 0.0,
        use_angle_cls: bool = False,
        num_threads: int | None = None,
        text_key: str = "text",
        det_model_path: str | None = None,
        rec_model_path: str | None = None,
        cls_model_path: str | None = None,
    ) -> None:
        if scoring not in SCORINGS:
            raise ValueError(f"scoring={scoring!r}; use one of {SCORINGS}")
        if whitespace not in WHITESPACE_MODES:
            raise ValueError(f"whitespace={whitespace!r}; use one of {WHITESPACE_MODES}")
        if min_side < 1:
            raise ValueError(f"min_side={min_side}: must be a positive number of pixels")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence={min_confidence}: must be in [0, 1]")
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads={num_threads}: use a positive count, or None for onnxruntime's default")
        self.scoring = scoring
        self.lowercase = lowercase
        self.whitespace = whitespace
        self.min_side = min_side
        self.text_key = text_key

        try:
            import rapidocr
            from rapidocr import RapidOCR
        except ImportError as exc:
            raise ImportError(
                f"OCRReward needs rapidocr and onnxruntime: pip install rapidocr onnxruntime ({exc})"
            ) from exc

        shipped = Path(rapidocr.__file__).resolve().parent / "models"
        paths = {}
        for task, given in (("det", det_model_path), ("rec", rec_model_path), ("cls", cls_model_path)):
            path = Path(given) if given is not None else shipped / _SHIPPED_MODELS[task]
            if not path.is_file():
                source = f"{task}_model_path={given!r}" if given is not None else f"rapidocr's shipped {task} model"
                raise FileNotFoundError(
                    f"{source} not found at {path}; pass {task}_model_path= an existing ONNX file "
                    "(nothing is downloaded at run time)"
                )
            paths[task] = str(path)

        params: dict[str, Any] = {
            "Global.use_cls": use_angle_cls,
            "Global.text_score": min_confidence,
            "Global.log_level": "error",  # rapidocr warns on every image without text
            # detect at native size once the short side is >= min_side (the images were upscaled to it);
            # rapidocr's default enlarges every image to a 736 px short side: detection ~5x slower on CPU
            "Det.limit_type": "min",
            "Det.limit_side_len": min_side,
            # an explicit model_path skips rapidocr's download-and-verify step entirely
            "Det.model_path": paths["det"],
            "Rec.model_path": paths["rec"],
            "Cls.model_path": paths["cls"],
        }
        if num_threads is not None:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = num_threads
        self.engine = RapidOCR(params=params)

    def target(self, prompt: str, meta: dict[str, Any]) -> str | None:
        """Normalised target text for one sample, or None when there is none to score against."""
        if self.text_key in meta and meta[self.text_key] is not None:
            raw = meta[self.text_key]
            if not isinstance(raw, str):
                raise ValueError(
                    f"metadata[{self.text_key!r}]={raw!r} ({type(raw).__name__}); give the target text as a string"
                )
        else:
            raw = quoted_text(prompt)
            if raw is None:
                return None
        text = normalize_text(raw, lowercase=self.lowercase, whitespace=self.whitespace)
        return text or None

    def read(self, images: torch.Tensor) -> list[str]:
        """Raw recognised text of each image (lines joined by a space, empty when nothing is read)."""
        texts = []
        for rgb in to_uint8(images):
            bgr = np.ascontiguousarray(upscale_min_side(rgb, self.min_side)[:, :, ::-1])  # rapidocr: ndarray = BGR
            out = self.engine(bgr)
            texts.append(" ".join(out.txts) if getattr(out, "txts", None) else "")
        return texts

    def __call__(
        self, samples: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[float | None]:
        if len(samples) != len(prompts) or len(metadata) != len(prompts):
            raise ValueError(
                f"got {len(samples)} images, {len(prompts)} prompts and {len(metadata)} metadata dicts; "
                "give one of each per sample"
            )
        targets = [self.target(p, m) for p, m in zip(prompts, metadata)]
        scores: list[float | None] = [None] * len(targets)
        todo = [i for i, t in enumerate(targets) if t is not None]
        if not todo:
            return scores
        texts = self.read(samples[todo])
        for i, text in zip(todo, texts):
            recognized = normalize_text(text, lowercase=self.lowercase, whitespace=self.whitespace)
            scores[i] = ocr_score(recognized, targets[i], self.scoring)
        return scores
