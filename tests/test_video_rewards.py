"""Video rewards: per-frame adapters, temporal consistency (tiny random CLIP), whole-clip interface."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from alignkit.config import RewardTermConfig
from alignkit.reward_set import RewardSet, RewardTerm, resolve_reward
from alignkit.rewards.compression import JpegCompressibility
from alignkit.rewards.video import CLIP_MEAN, CLIP_STD, ClipFunction, ClipReward, PerFrame, TemporalConsistency

B, NF, H, W = 2, 4, 32, 32
CLIP_SIZE = 32  # the tiny CLIP's image_size: frames of this size need no resize


def videos(seed: int = 0, b: int = B, f: int = NF, h: int = H, w: int = W) -> torch.Tensor:
    """``[B, F, 3, H, W]`` in [0, 1]: per video, frames drifting from a flat colour towards noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 1, 3, 1, 1, generator=g).expand(b, f, 3, h, w)
    noise = torch.rand(b, f, 3, h, w, generator=g)
    mix = torch.linspace(0.0, 0.6, f).view(1, f, 1, 1, 1)
    return (1 - mix) * base + mix * noise


def args(n: int) -> tuple[list[str], list[dict[str, Any]]]:
    return [f"prompt {i}" for i in range(n)], [{"i": i} for i in range(n)]


# -- per frame ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", ["mean", "min"])
def test_per_frame_equals_direct_jpeg(reduce: str):
    v = videos()
    prompts, meta = args(B)
    jpeg = JpegCompressibility()
    direct = torch.tensor([jpeg(v[b], [prompts[b]] * NF, [meta[b]] * NF) for b in range(B)])  # [B, F]
    expected = direct.mean(dim=1) if reduce == "mean" else direct.min(dim=1).values
    for reward in (PerFrame(jpeg, reduce=reduce), PerFrame("jpeg_compressibility", reduce=reduce),
                   PerFrame({"fn": "jpeg_compressibility", "kwargs": {"quality": 95}}, reduce=reduce),
                   PerFrame(jpeg, reduce=reduce, max_images=3)):
        out = reward(v, prompts, meta)
        assert out == pytest.approx(expected.tolist(), rel=1e-6), reward.name
    # later frames are noisier, so compress worse: min picks the last frame
    assert direct[:, -1].tolist() == pytest.approx(direct.min(dim=1).values.tolist())


def test_per_frame_resolves_through_registry_and_kwargs():
    v = videos()
    prompts, meta = args(B)
    kwargs = {"reward": "jpeg_compressibility", "reward_kwargs": {"quality": 30}, "reduce": "min"}
    term = RewardTermConfig(fn="alignkit.rewards.video:PerFrame", kwargs=kwargs)
    reward = resolve_reward("video_jpeg", term)
    low_q = JpegCompressibility(quality=30)
    expected = [min(low_q(v[b], [prompts[b]] * NF, [meta[b]] * NF)) for b in range(B)]
    assert reward(v, prompts, meta) == pytest.approx(expected)
    table = RewardSet.from_config({"video_jpeg": term}, "sum_then_normalize").score(v, prompts, meta)
    assert table.raw["video_jpeg"].tolist() == pytest.approx(expected)


class FrameBrightness:
    """Image reward: mean brightness, None for frames whose metadata lists them as unscorable."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, samples: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> list[float | None]:
        self.calls.append(samples.shape[0])
        assert samples.dim() == 4 and samples.shape[1] == 3
        out: list[float | None] = []
        for j, (img, m) in enumerate(zip(samples, metadata)):
            out.append(None if j in m["bad"] else float(img.mean()))
        return out


def test_per_frame_masks_nan_frames():
    v = videos()
    # flat indices b*F + f: video 0 loses frames 1 and 3, video 1 loses all of its frames
    bad = {1, 3, 4, 5, 6, 7}
    meta = [{"bad": bad}, {"bad": bad}]
    inner = FrameBrightness()
    means = v.mean(dim=(2, 3, 4))  # [B, F]
    out = PerFrame(inner)(v, ["a", "b"], meta)
    assert inner.calls == [B * NF]  # one batched call
    assert out[0] == pytest.approx(float(means[0, [0, 2]].mean()))
    assert out[1] is None
    reward = PerFrame(inner, reduce="min")
    assert reward(v, ["a", "b"], meta)[0] == pytest.approx(float(means[0, [0, 2]].min()))
    assert reward.last_invalid_frames == 6
    # the reward set masks and counts the video with no scorable frame
    table = RewardSet([RewardTerm("bright", PerFrame(inner), 1.0)]).score(v, ["a", "b"], meta)
    assert table.invalid == {"bright": 1}
    assert math.isnan(table.raw["bright"][1]) and table.raw["bright"][0] == pytest.approx(out[0])


def test_per_frame_errors():
    jpeg = JpegCompressibility()
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\].*got \(2, 3, 32, 32\).*add a frame axis"):
        PerFrame(jpeg)(torch.rand(2, 3, 32, 32), ["a", "b"], [{}, {}])
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        PerFrame(jpeg)(torch.rand(1, 2, 1, 8, 8), ["a"], [{}])
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        PerFrame(jpeg)(videos(), ["a"], [{}])
    with pytest.raises(ValueError, match="reduce='median'"):
        PerFrame(jpeg, reduce="median")
    with pytest.raises(ValueError, match="reward_kwargs"):
        PerFrame(jpeg, reward_kwargs={"quality": 50})
    with pytest.raises(KeyError, match="Valid names"):
        PerFrame("jpeg_compresibility")
    with pytest.raises(ValueError, match="returned 1 scores for 8 samples"):
        PerFrame(lambda s, p, m: [0.0])(videos(), ["a", "b"], [{}, {}])


# -- temporal consistency ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              image_size=CLIP_SIZE, patch_size=8, projection_dim=16)
    text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                          vocab_size=99, projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    root = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)) \
        .save_pretrained(root / "clip")
    CLIPVisionModelWithProjection(vision).save_pretrained(root / "vision")
    return {"clip": root / "clip", "vision": root / "vision"}


def direct_consistency(folder: Path, kind: str, v: torch.Tensor) -> list[float]:
    """Independent reference for ``CLIP_SIZE`` frames: normalise, embed, cosine of neighbours, mean."""
    from transformers import CLIPModel, CLIPVisionModelWithProjection

    b, f = v.shape[:2]
    x = v.reshape(b * f, 3, CLIP_SIZE, CLIP_SIZE)
    x = (x - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        if kind == "clip":
            emb = CLIPModel.from_pretrained(folder).eval().get_image_features(pixel_values=x).pooler_output
        else:
            emb = CLIPVisionModelWithProjection.from_pretrained(folder).eval()(pixel_values=x).image_embeds
    emb = emb.view(b, f, -1)
    sims = [[float(F.cosine_similarity(emb[i, j], emb[i, j + 1], dim=0)) for j in range(f - 1)] for i in range(b)]
    return [sum(s) / len(s) for s in sims]


@pytest.mark.parametrize("kind", ["clip", "vision"])
def test_temporal_consistency_clip_equals_direct(tiny_clip_dirs: dict[str, Path], kind: str):
    v = videos(h=CLIP_SIZE, w=CLIP_SIZE)
    reward = TemporalConsistency(model=str(tiny_clip_dirs[kind]), device="cpu", batch_size=3)
    out = reward(v, *args(B))
    assert out == pytest.approx(direct_consistency(tiny_clip_dirs[kind], kind, v), abs=1e-5)
    assert all(-1.0 <= s <= 1.0 for s in out)


def test_temporal_consistency_static_beats_random(tiny_clip_dirs: dict[str, Path]):
    g = torch.Generator().manual_seed(1)
    frame = torch.rand(1, 1, 3, 48, 40, generator=g)
    static = frame.expand(1, 5, 3, 48, 40)
    random = torch.rand(1, 5, 3, 48, 40, generator=g)  # non-square, resized and cropped to CLIP_SIZE
    samples = torch.cat([static, random])
    for reward in (TemporalConsistency(model=str(tiny_clip_dirs["clip"]), device="cpu"),
                   TemporalConsistency(features="pixels")):
        s_static, s_random = reward(samples, *args(2))
        assert s_static == pytest.approx(1.0, abs=1e-5)
        assert s_static > s_random + 1e-4, reward.features


def test_temporal_consistency_pixels():
    reward = TemporalConsistency(features="pixels")
    constant = torch.full((1, 3, 3, 8, 8), 0.3)
    black = torch.zeros(1, 3, 3, 8, 8)
    noise = torch.rand(1, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    nan = noise.clone()
    nan[0, 1, 0, 0, 0] = math.nan
    out = reward(torch.cat([constant, black, noise, nan]), *args(4))
    assert out[0] == pytest.approx(1.0) and out[1] == pytest.approx(1.0)
    flat = noise[0].flatten(1)
    direct = F.cosine_similarity(flat[1:], flat[:-1], dim=1).mean()
    assert out[2] == pytest.approx(float(direct), abs=1e-6) and out[2] < 0.9
    assert out[3] is None
    with pytest.raises(ValueError, match="at least 2 frames, got F=1"):
        reward(noise[:, :1], *args(1))
    with pytest.raises(ValueError, match="features='dino'"):
        TemporalConsistency(features="dino")
    term = RewardTermConfig(fn="alignkit.rewards.video:TemporalConsistency", kwargs={"features": "pixels"})
    assert resolve_reward("tc", term)(constant, *args(1)) == pytest.approx([1.0])


def test_temporal_consistency_bad_model(tmp_path: Path):
    with pytest.raises(OSError, match="features='pixels'"):
        TemporalConsistency(model=str(tmp_path / "nowhere"), device="cpu")


# -- whole clip --------------------------------------------------------------------------------------------


def test_clip_function_mp4_receives_readable_file():
    from alignkit.media.video import frames_to_uint8, read_video

    v = videos(f=5, h=32, w=48)
    seen: list[Path] = []

    def score(clip: Path, prompt: str, metadata: dict[str, Any], offset: float = 0.0) -> float:
        assert isinstance(clip, Path) and clip.suffix == ".mp4" and clip.is_file()
        seen.append(clip)
        frames = read_video(clip)  # [F, H, W, 3]
        ref = torch.from_numpy(frames_to_uint8(v[metadata["i"]])).float()
        assert tuple(frames.shape) == (5, 32, 48, 3)
        # noisy frames compress badly, so the tolerance is loose; wrong video or layout is ~50+
        assert (frames.float() - ref).abs().mean() < 20
        return float(frames.float().mean()) + offset

    reward = ClipFunction(score, input="mp4", fps=8, kwargs={"offset": 1.0})
    out = reward(v, *args(B))
    assert len(seen) == B and len(set(seen)) == B
    assert not any(p.exists() for p in seen)  # temporary files are cleaned up
    assert out == pytest.approx([float(v[b].mean()) * 255 + 1.0 for b in range(B)], abs=10)


def test_clip_function_frames_and_errors():
    v = videos()
    reward = ClipFunction(lambda clip, prompt, metadata: float(clip.shape[0]), input="frames")
    assert reward(v, *args(B)) == [float(NF)] * B

    class Broken(ClipReward):
        def score_clips(self, clips, prompts, metadata):
            return [0.0]

    with pytest.raises(ValueError, match="returned 1 scores for 2 clips"):
        Broken()(v, *args(B))
    with pytest.raises(ValueError, match="input='gif'"):
        ClipFunction(lambda c, p, m: 0.0, input="gif")
    with pytest.raises(ValueError, match=r"\[B, F, 3, H, W\]"):
        reward(v[0], *args(NF))
    seen: list[Path] = []

    def failing(clip: Path, prompt: str, metadata: dict[str, Any]) -> float:
        seen.append(clip)
        raise RuntimeError("scorer down")

    with pytest.raises(RuntimeError, match="scorer down"):
        ClipFunction(failing)(v, *args(B))
    assert seen and not seen[0].exists()  # cleaned up on errors too
