"""Video rewards: image rewards applied per frame, temporal consistency, and whole-clip rewards.

Samples are videos ``[B, F, 3, H, W]`` float in [0, 1] (what video samplers decode to). Every reward here
follows the reward interface of :mod:`alignkit.reward_set`: one float per video, ``None`` when the video
cannot be scored (masked and counted by the reward set).

* :class:`PerFrame` adapts any image reward: the ``B*F`` frames are scored as images, then reduced per
  video (``mean`` or ``min`` over the frames the image reward could score).
* :class:`TemporalConsistency` is the mean cosine similarity of consecutive frames' CLIP image features
  (or raw pixel vectors, a cheap proxy).
* :class:`ClipReward` is the base class for rewards that look at a whole clip, given either its frames
  ``[F, 3, H, W]`` or the path of a temporary mp4 file; :class:`ClipFunction` wraps a plain function.
"""

from __future__ import annotations

import logging
import math
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alignkit.config import RewardTermConfig
from alignkit.registry import import_object
from alignkit.reward_set import Reward, resolve_reward, to_scores

logger = logging.getLogger(__name__)

REDUCTIONS = ("mean", "min")
CLIP_INPUTS = ("frames", "mp4")
# CLIPImageProcessor's normalisation for every OpenAI / open CLIP checkpoint in transformers
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_videos(samples: Any) -> torch.Tensor:
    """Validate video samples ``[B, F, 3, H, W]`` (float in [0, 1]); returns them detached, same device."""
    if not isinstance(samples, torch.Tensor) or samples.dim() != 5 or samples.shape[2] != 3:
        got = tuple(samples.shape) if isinstance(samples, torch.Tensor) else type(samples).__name__
        hint = ""
        if isinstance(samples, torch.Tensor) and samples.dim() == 4:
            hint = " (a batch of images [B, 3, H, W]? use an image reward, or add a frame axis)"
        raise ValueError(f"expected video samples of shape [B, F, 3, H, W] in [0, 1], got {got}{hint}")
    if not samples.is_floating_point():
        raise ValueError(f"expected float video samples [B, F, 3, H, W] in [0, 1], got dtype {samples.dtype}")
    if samples.shape[1] == 0:
        raise ValueError(f"video samples {tuple(samples.shape)} have F=0 frames")
    return samples.detach()


def _check_batch(n: int, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]) -> None:
    if len(prompts) != n or len(metadata) != n:
        raise ValueError(
            f"{n} videos but {len(prompts)} prompts and {len(metadata)} metadata entries; pass one of each per video"
        )


def reduce_frames(scores: torch.Tensor, reduce: str = "mean") -> list[float | None]:
    """Reduce per-frame scores ``[B, F]`` (NaN = frame not scored) to one score per video.

    ``mean`` averages the valid frames, ``min`` takes their minimum; a video with no valid frame gets
    ``None``.
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce={reduce!r}: use one of {', '.join(REDUCTIONS)}")
    valid = torch.isfinite(scores)  # [B, F]
    count = valid.sum(dim=1)  # [B]
    if reduce == "mean":
        out = torch.where(valid, scores, 0.0).sum(dim=1) / count.clamp(min=1)  # [B]
    else:
        out = torch.where(valid, scores, math.inf).min(dim=1).values  # [B]
    return [float(v) if c > 0 else None for v, c in zip(out.tolist(), count.tolist())]


def _resolve_image_reward(reward: Reward | str | Mapping[str, Any], kwargs: Mapping[str, Any] | None) -> Reward:
    """An image reward from an object, a registry name / import path, or a spec ``{fn, kwargs}``."""
    if isinstance(reward, Mapping):
        unknown = set(reward) - {"fn", "kwargs"}
        if unknown or "fn" not in reward:
            raise ValueError(
                f"reward spec {dict(reward)!r}: give {{'fn': name, 'kwargs': {{...}}}} "
                f"(unknown keys: {sorted(unknown)})"
            )
        if kwargs:
            raise ValueError(
                "give the image reward's kwargs either in the spec's 'kwargs' or in reward_kwargs, not both"
            )
        reward, kwargs = reward["fn"], reward.get("kwargs")
    if isinstance(reward, str):
        term = RewardTermConfig(fn=reward, kwargs=dict(kwargs or {}))
        return resolve_reward(f"per_frame({reward})", term)
    if kwargs:
        raise ValueError(f"reward_kwargs={dict(kwargs)} only apply to a reward given by name; got an object {reward!r}")
    if not callable(reward):
        raise ValueError(f"reward={reward!r} is not callable; give an image reward, a registry name or {{fn, kwargs}}")
    return reward


class PerFrame:
    """Scores every frame with an image reward and reduces per video.

    The frames ``[B, F, 3, H, W]`` are flattened to ``B*F`` images ``[B*F, 3, H, W]`` and scored in one call
    (or in chunks of ``max_images``), each frame with its video's prompt and metadata (the same dict
    object, repeated). Frames the image reward cannot score (None / NaN) are left out of the reduction
    and counted in :attr:`last_invalid_frames`; a video with no scorable frame scores ``None``.

    Args:
        reward: an image reward object, a registry name or import path (``"jpeg_compressibility"``), or a
            spec ``{"fn": name, "kwargs": {...}}``.
        reward_kwargs: constructor kwargs for a reward given by name.
        reduce: ``"mean"`` or ``"min"`` over frames.
        max_images: score at most this many frames per call (None: all ``B*F`` at once).
    """

    def __init__(
        self,
        reward: Reward | str | Mapping[str, Any],
        reward_kwargs: Mapping[str, Any] | None = None,
        reduce: str = "mean",
        max_images: int | None = None,
    ) -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce={reduce!r}: use one of {', '.join(REDUCTIONS)}")
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images={max_images}: must be >= 1, or None to score all frames at once")
        self.reward = _resolve_image_reward(reward, reward_kwargs)
        self.reduce = reduce
        self.max_images = max_images
        self.name = f"per_frame({reward if isinstance(reward, str) else type(self.reward).__name__})"
        self.last_invalid_frames = 0

    def frame_scores(
        self, samples: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> torch.Tensor:
        """Per-frame scores ``[B, F]`` float32, NaN where the image reward could not score."""
        videos = check_videos(samples)
        b, f = videos.shape[:2]
        _check_batch(b, prompts, metadata)
        images = videos.reshape(b * f, *videos.shape[2:])  # [B*F, 3, H, W]
        frame_prompts = [p for p in prompts for _ in range(f)]
        frame_meta = [m for m in metadata for _ in range(f)]
        step = self.max_images or b * f
        chunks = []
        for s in range(0, b * f, step):
            out = self.reward(images[s : s + step], frame_prompts[s : s + step], frame_meta[s : s + step])
            chunks.append(to_scores(self.name, out, min(step, b * f - s))[0])
        return torch.cat(chunks).view(b, f)  # [B, F]

    def __call__(
        self, samples: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[float | None]:
        scores = self.frame_scores(samples, prompts, metadata)  # [B, F]
        self.last_invalid_frames = int((~torch.isfinite(scores)).sum())
        if self.last_invalid_frames:
            logger.warning("%s could not score %d of %d frames (left out of the %s)", self.name,
                           self.last_invalid_frames, scores.numel(), self.reduce)
        return reduce_frames(scores, self.reduce)


def consecutive_cosine(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of consecutive frames, ``[B, F, D] -> [B, F-1]``.

    Two all-zero feature vectors count as identical (1); one all-zero vector against a non-zero one as 0.
    """
    norms = features.norm(dim=-1)  # [B, F]
    unit = F.normalize(features, dim=-1)
    sims = (unit[:, 1:] * unit[:, :-1]).sum(dim=-1)  # [B, F-1]
    both_zero = (norms[:, 1:] == 0) & (norms[:, :-1] == 0)
    return torch.where(both_zero, torch.ones_like(sims), sims)


class TemporalConsistency:
    """Mean cosine similarity of consecutive frames' image features.

    ``features="clip"``: CLIP image embeddings (the projected features, as ``CLIPModel.get_image_features``)
    of ``model``, a hub id or a local folder holding a ``CLIPModel`` or ``CLIPVisionModelWithProjection``.
    Preprocessing, in torch on the model's device: bicubic resize (antialiased) of the shorter side to the
    model's ``image_size``, centre crop, CLIP mean/std normalisation (as ``CLIPImageProcessor``, up to
    resampling differences with PIL). Output in [-1, 1]; real videos typically score 0.8-1, a static clip
    1.0, unrelated frames much lower.

    ``features="pixels"``: no model; each frame's raw pixel vector in [0, 1] (``3*H*W`` values). A cheap
    proxy, sensitive to brightness and insensitive to content: output in [0, 1], a static clip 1.0, two
    independent uniform-noise frames about 0.75.

    A video needs at least 2 frames; a video with any non-finite pixel scores ``None``.

    Args:
        model: CLIP checkpoint (ignored for ``features="pixels"``).
        features: ``"clip"`` or ``"pixels"``.
        device: where the CLIP model runs; default ``"cuda"`` when available, else ``"cpu"``.
        dtype: the model's dtype, ``"float32"``, ``"float16"`` or ``"bfloat16"``.
        batch_size: frames per CLIP forward.
    """

    def __init__(
        self,
        model: str = "openai/clip-vit-base-patch32",
        features: str = "clip",
        device: str | None = None,
        dtype: str = "float32",
        batch_size: int = 64,
    ) -> None:
        if features not in ("clip", "pixels"):
            raise ValueError(f"features={features!r}: use 'clip' (CLIP image features) or 'pixels' (no model)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        self.features = features
        self.batch_size = batch_size
        self.model_name = model
        self.model: torch.nn.Module | None = None
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        if dtype not in dtypes:
            raise ValueError(f"dtype={dtype!r}: use one of {', '.join(dtypes)}")
        self.dtype = dtypes[dtype]
        self.image_size = 0  # set by the CLIP model
        if features == "clip":
            self.model, self.image_size = _load_clip_vision(model)
            self.model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 3, H, W]`` in [0, 1] to CLIP pixel values ``[N, 3, S, S]`` (S = the model's image size)."""
        s = self.image_size
        h, w = images.shape[-2:]
        scale = s / min(h, w)
        size = (max(s, round(h * scale)), max(s, round(w * scale)))
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (size[0] - s) // 2, (size[1] - s) // 2
        x = x[:, :, top : top + s, left : left + s].clamp(0, 1)
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``[N, D]`` float32 of images ``[N, 3, H, W]`` in [0, 1] (pixels: ``D = 3*H*W``)."""
        if self.features == "pixels":
            return images.float().flatten(1)
        assert self.model is not None
        feats = []
        for s in range(0, images.shape[0], self.batch_size):
            x = self.preprocess(images[s : s + self.batch_size].to(self.device)).to(self.dtype)
            feats.append(_clip_image_embeds(self.model, x).float())
        return torch.cat(feats)

    def __call__(
        self, samples: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[float | None]:
        videos = check_videos(samples)
        b, f = videos.shape[:2]
        _check_batch(b, prompts, metadata)
        if f < 2:
            raise ValueError(
                f"temporal consistency needs videos of at least 2 frames, got F={f} ({tuple(videos.shape)})"
            )
        finite = torch.isfinite(videos.flatten(1)).all(dim=1).cpu()  # [B]
        clean = torch.nan_to_num(videos, nan=0.0, posinf=1.0, neginf=0.0)
        feats = self.image_features(clean.reshape(b * f, *videos.shape[2:]))  # [B*F, D]
        sims = consecutive_cosine(feats.view(b, f, -1)).mean(dim=1).cpu()  # [B]
        return [float(v) if ok else None for v, ok in zip(sims.tolist(), finite.tolist())]


def _load_clip_vision(model: str) -> tuple[torch.nn.Module, int]:
    """Load a CLIP checkpoint's image tower; returns the module and its input size."""
    from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection

    try:
        config = AutoConfig.from_pretrained(model)
        if config.model_type == "clip":
            # the full model: loading only its vision tower would report every text weight as unexpected
            return CLIPModel.from_pretrained(model), int(config.vision_config.image_size)
        if config.model_type == "clip_vision_model":
            return CLIPVisionModelWithProjection.from_pretrained(model), int(config.image_size)
    except OSError as exc:
        raise OSError(
            f"cannot load CLIP model {model!r}: {exc}. Pass a local folder written by save_pretrained, allow hub "
            "access, or use features='pixels' (no model)"
        ) from exc
    raise ValueError(
        f"model={model!r} is a {config.model_type!r} checkpoint; TemporalConsistency needs a CLIP checkpoint "
        "(model_type 'clip' or 'clip_vision_model'), or features='pixels'"
    )


def _clip_image_embeds(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings ``[N, D]``; handles transformers 4.x (tensor) and 5.x (output object)."""
    if hasattr(model, "get_image_features"):
        out = model.get_image_features(pixel_values=pixel_values)
        return out if isinstance(out, torch.Tensor) else out.pooler_output
    return model(pixel_values=pixel_values).image_embeds


class ClipReward(ABC):
    """Base class of rewards that score a whole clip.

    Subclasses implement :meth:`score_clips`, which receives, per video, either its frames ``[F, 3, H, W]``
    float in [0, 1] (``input="frames"``, on the samples' device) or the path of an mp4 file holding it
    (``input="mp4"``; written with :func:`alignkit.media.video.write_mp4` at ``fps`` into a temporary folder
    that is deleted when the call returns or raises, so do not keep the paths).
    """

    def __init__(self, input: str = "frames", fps: float = 16) -> None:
        if input not in CLIP_INPUTS:
            raise ValueError(f"input={input!r}: use 'frames' ([F, 3, H, W] tensors) or 'mp4' (file paths)")
        if fps <= 0:
            raise ValueError(f"fps={fps}: must be > 0")
        self.input = input
        self.fps = fps

    @abstractmethod
    def score_clips(
        self, clips: list[torch.Tensor] | list[Path], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> Sequence[float | None]:
        """One score per clip (``None`` when a clip cannot be scored)."""

    def __call__(
        self, samples: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[float | None]:
        videos = check_videos(samples)
        _check_batch(videos.shape[0], prompts, metadata)
        if self.input == "frames":
            return self._checked(self.score_clips(list(videos), prompts, metadata), len(prompts))
        from alignkit.media.video import write_mp4  # lazy: PyAV is only needed for mp4 input

        with tempfile.TemporaryDirectory(prefix="alignkit_clips_") as tmp:
            paths = [write_mp4(v, Path(tmp) / f"clip_{i:05d}.mp4", fps=self.fps) for i, v in enumerate(videos)]
            return self._checked(self.score_clips(paths, prompts, metadata), len(prompts))

    def _checked(self, out: Sequence[float | None], n: int) -> list[float | None]:
        out = list(out)
        if len(out) != n:
            raise ValueError(f"{type(self).__name__}.score_clips returned {len(out)} scores for {n} clips; "
                             "return one per clip")
        return out


class ClipFunction(ClipReward):
    """A whole-clip reward from a function ``fn(clip, prompt, metadata, **kwargs) -> float | None``.

    ``clip`` is a frames tensor ``[F, 3, H, W]`` or an mp4 path, as chosen by ``input`` (see
    :class:`ClipReward`).

    Args:
        fn: the function, or its import path ``"package.module:function"``.
        input: ``"mp4"`` (default) or ``"frames"``.
        fps: frame rate of the mp4 files.
        kwargs: extra keyword arguments passed to every call of ``fn``.
    """

    def __init__(
        self,
        fn: Callable[..., float | None] | str,
        input: str = "mp4",
        fps: float = 16,
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(input=input, fps=fps)
        self.fn = import_object(fn) if isinstance(fn, str) else fn
        if not callable(self.fn):
            raise ValueError(f"fn={fn!r} is not callable; give a function fn(clip, prompt, metadata) -> float | None")
        self.kwargs = dict(kwargs or {})

    def score_clips(
        self, clips: list[torch.Tensor] | list[Path], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[float | None]:
        return [self.fn(c, p, m, **self.kwargs) for c, p, m in zip(clips, prompts, metadata)]
