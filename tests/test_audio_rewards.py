"""Audio rewards: signal rewards against hand-computed levels, and CLAP on a tiny random model saved and loaded."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from alignkit.media.audio import resample
from alignkit.modalities.image.tiny import build_tiny_tokenizer
from alignkit.registry import REWARDS
from alignkit.rewards.audio import CLAPScore, LoudnessRange, SilenceRatio, check_audio, window_levels

RATE = 1000
DB_HALF = 20 * math.log10(0.5)  # level of a constant 0.5 signal: -6.02 dBFS


def _levels(*segments: tuple[float, int]) -> torch.Tensor:
    """A constant-amplitude mono clip ``[1, 1, T]``: ``(value, samples)`` per segment."""
    return torch.cat([torch.full((n,), v) for v, n in segments])[None, None]


def _score(reward, clip: torch.Tensor) -> float | None:
    return reward(clip, [""] * clip.shape[0], [{}] * clip.shape[0])[0]


# -- signal rewards --------------------------------------------------------------------------------------------


def test_window_levels_are_rms_dbfs_over_channels() -> None:
    stereo = torch.stack([torch.full((300,), 0.5), torch.zeros(300)])[None]  # [1, 2, 300]
    levels = window_levels(stereo, 100, 50)  # mean square 0.125 over both channels
    assert levels.shape == (1, 5)
    torch.testing.assert_close(levels, torch.full((1, 5), 10 * math.log10(0.125)))
    sine = torch.sin(2 * math.pi * torch.arange(1000) / 100)[None, None]  # full scale, whole periods
    torch.testing.assert_close(window_levels(sine, 100, 100), torch.full((1, 10), 10 * math.log10(0.5)), atol=1e-4,
                               rtol=0)
    assert window_levels(stereo, 301, 1).shape == (1, 0)  # shorter than a window
    assert torch.isneginf(window_levels(torch.zeros(1, 1, 10), 5, 5)).all()


def test_loudness_range_of_two_levels_is_their_difference() -> None:
    """Five 0.1 s windows at 0.5 (-6.02 dB) then five at 0.05 (-26.02 dB): the 10th percentile is -26.02 and the
    95th -6.02 (linear interpolation between equal neighbours), so the range is 20 log10(10) = 20 dB."""
    reward = LoudnessRange(RATE, window_s=0.1, hop_s=0.1)
    clip = _levels((0.5, 500), (0.05, 500))
    assert _score(reward, clip) == pytest.approx(20.0, abs=1e-6)
    assert _score(reward, _levels((0.3, 1000))) == pytest.approx(0.0, abs=1e-9)  # steady level
    # interpolation: 9 windows at -6.02 and one at -26.02 -> q10 at position 0.9 = -26.02 + 0.9 * 20
    nine_one = _levels((0.05, 100), (0.5, 900))
    assert _score(reward, nine_one) == pytest.approx(20.0 - 0.9 * 20.0, abs=1e-6)


def test_loudness_range_gates_silence_and_quiet_windows() -> None:
    reward = LoudnessRange(RATE, window_s=0.1, hop_s=0.1)
    # digital silence is below the absolute gate: only the five equal loud windows remain
    assert _score(reward, _levels((0.0, 500), (0.5, 500))) == pytest.approx(0.0, abs=1e-9)
    # 0.005 (-46.02 dB) is above -70 dB but more than 20 dB below the power mean of the windows (-9.0 dB)
    quiet = _levels((0.005, 500), (0.5, 500))
    mean_db = 10 * math.log10((0.5**2 + 0.005**2) / 2)
    assert mean_db - 20 > 20 * math.log10(0.005)
    assert _score(reward, quiet) == pytest.approx(0.0, abs=1e-9)
    no_relative = LoudnessRange(RATE, window_s=0.1, hop_s=0.1, relative_gate_db=None)
    assert _score(no_relative, quiet) == pytest.approx(40.0, abs=1e-6)


def test_loudness_range_cannot_score_short_silent_or_broken_clips() -> None:
    reward = LoudnessRange(RATE, window_s=0.1, hop_s=0.1)
    broken = _levels((0.5, 1000))
    broken[0, 0, 10] = math.nan
    two_levels = _levels((0.5, 500), (0.05, 500))
    clips = torch.cat([_levels((0.5, 100), (0.0, 900)), torch.zeros(1, 1, 1000), broken, two_levels])
    assert reward(clips, ["a"] * 4, [{}] * 4)[:3] == [None, None, None]  # 1 window passes the gate, none, NaN
    assert reward(clips, ["a"] * 4, [{}] * 4)[3] == pytest.approx(20.0, abs=1e-6)
    with pytest.raises(ValueError, match="low=95"):
        LoudnessRange(RATE, low=95, high=10)
    with pytest.raises(ValueError, match="relative_gate_db=3"):
        LoudnessRange(RATE, relative_gate_db=3)
    with pytest.raises(ValueError, match=r"window_s=0\.0001"):
        LoudnessRange(RATE, window_s=1e-4)


def test_silence_ratio_counts_quiet_windows() -> None:
    """1 s at 1 kHz in 50 ms windows: 0.3 s of zeros, 0.2 s at 1e-4 (-80 dB, below -60) and 0.5 s of a 0.1 tone."""
    reward = SilenceRatio(RATE, window_s=0.05, threshold_db=-60.0)
    tone = 0.1 * torch.sin(2 * math.pi * torch.arange(500) / 50)
    clip = torch.cat([torch.zeros(300), torch.full((200,), 1e-4), tone])[None, None]
    assert _score(reward, clip) == pytest.approx(0.5)
    assert _score(reward, torch.zeros(1, 2, 1000)) == 1.0
    assert _score(reward, torch.full((1, 1, 1025), 0.2)) == 0.0  # the 25-sample tail is left out
    assert _score(reward, torch.zeros(1, 1, 49)) is None  # shorter than a window
    nan = torch.zeros(1, 1, 1000)
    nan[0, 0, 0] = math.nan
    assert _score(reward, nan) is None


def test_audio_rewards_check_their_inputs() -> None:
    with pytest.raises(ValueError, match=r"\[B, C, T\].*add a channel axis"):
        check_audio(torch.zeros(2, 100))
    with pytest.raises(ValueError, match=r"sample_rate=44100\.0"):
        SilenceRatio(44100.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 clips but 1 prompts"):
        SilenceRatio(RATE)(torch.zeros(2, 1, 100), ["a"], [{}])


def test_audio_rewards_are_registered() -> None:
    assert REWARDS.get("clap") is CLAPScore
    assert REWARDS.get("loudness_range") is LoudnessRange
    assert REWARDS.get("silence_ratio") is SilenceRatio


# -- CLAP ------------------------------------------------------------------------------------------------------

CLAP_RATE, CLAP_SECONDS = 16000, 1


@pytest.fixture(scope="module")
def clap_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ``ClapModel`` + ``ClapProcessor`` (16 kHz, 1 s, 16 mel bins) saved with ``save_pretrained``."""
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    folder = tmp_path_factory.mktemp("clap")
    tokenizer = build_tiny_tokenizer(model_max_length=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        audio = dict(spec_size=64, num_mel_bins=16, window_size=4, patch_size=4, patch_stride=(4, 4), depths=[1, 1],
                     num_attention_heads=[2, 2], patch_embeds_hidden_size=16, hidden_size=32, projection_dim=16,
                     num_hidden_layers=2)
        text = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=40, projection_dim=16,
                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id)
        model = ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16))
    extractor = ClapFeatureExtractor(feature_size=16, sampling_rate=CLAP_RATE, hop_length=160, fft_window_size=400,
                                     max_length_s=CLAP_SECONDS, frequency_max=8000, truncation="rand_trunc",
                                     padding="repeatpad")
    model.save_pretrained(folder)
    ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clips() -> torch.Tensor:
    """Four stereo 0.5 s clips at 8 kHz: tones and noise ``[4, 2, 4000]``."""
    t = torch.arange(4000) / 8000
    g = torch.Generator().manual_seed(0)
    tone = lambda f: 0.5 * torch.sin(2 * math.pi * f * t)  # noqa: E731
    return torch.stack([torch.stack([tone(440), tone(440)]), torch.stack([tone(1000), tone(1500)]),
                        0.3 * torch.randn(2, 4000, generator=g), torch.stack([tone(220), 0.1 * tone(3000)])])


def test_clap_scores_are_cosines_independent_of_batch_position_and_chunking(clap_folder: Path,
                                                                             clips: torch.Tensor) -> None:
    reward = CLAPScore(8000, model=str(clap_folder), device="cpu", batch_size=4)
    prompts = ["a dog barking", "rain on a roof", "a piano melody", "a dog barking"]
    scores = reward(clips, prompts, [{}] * 4)
    assert len(scores) == 4 and all(isinstance(s, float) and -1 <= s <= 1 for s in scores)
    assert len({round(s, 6) for s in scores}) == 4  # a random model still tells the pairs apart
    # the same clip and prompt at another batch position, and in chunks of one, score the same
    order = [3, 1, 0, 2]
    shuffled = reward(clips[order], [prompts[i] for i in order], [{}] * 4)
    chunked = CLAPScore(8000, model=str(clap_folder), device="cpu", batch_size=1)(clips, prompts, [{}] * 4)
    for i, j in enumerate(order):
        assert shuffled[i] == pytest.approx(scores[j], abs=1e-5)
    assert chunked == pytest.approx(scores, abs=1e-5)
    # the text matters: the same clip under another prompt scores differently
    assert reward(clips[:1], ["a piano melody"], [{}])[0] != pytest.approx(scores[0], abs=1e-4)


def test_clap_preprocessing_resamples_mono_and_crops_deterministically(clap_folder: Path, clips: torch.Tensor) -> None:
    reward = CLAPScore(8000, model=str(clap_folder), device="cpu")
    assert (reward.model_rate, reward.max_samples) == (CLAP_RATE, CLAP_RATE * CLAP_SECONDS)
    mono = reward.preprocess(clips)
    assert len(mono) == 4 and mono[0].shape == (8000,)  # 0.5 s at 16 kHz
    t = torch.arange(8000) / CLAP_RATE
    interior = slice(400, -400)
    torch.testing.assert_close(mono[0][interior], (0.5 * torch.sin(2 * math.pi * 440 * t))[interior], atol=5e-3,
                               rtol=0)  # a 440 Hz tone at 8 kHz is the 440 Hz tone at 16 kHz
    opposite = torch.stack([clips[0, 0], -clips[0, 0]])[None]  # channels cancel in the mono mix
    assert float(reward.preprocess(opposite)[0].abs().max()) == 0.0
    # giving the model-rate clip directly skips resampling and scores the same
    at_model_rate = CLAPScore(CLAP_RATE, model=str(clap_folder), device="cpu")
    upsampled = resample(clips, 8000, CLAP_RATE)
    assert at_model_rate(upsampled, ["x"] * 4, [{}] * 4) == pytest.approx(reward(clips, ["x"] * 4, [{}] * 4), abs=1e-5)
    # a 3 s clip is scored on its first second (the extractor alone would crop at random)
    long = torch.randn(1, 2, 3 * 8000, generator=torch.Generator().manual_seed(1)) * 0.2
    first = [reward(long, ["x"], [{}])[0] for _ in range(3)]
    assert first[0] == first[1] == first[2]
    assert first[0] == reward(long[..., :8000], ["x"], [{}])[0]


def test_clap_masks_clips_it_cannot_score(clap_folder: Path, clips: torch.Tensor) -> None:
    reward = CLAPScore(8000, model=str(clap_folder), device="cpu")
    broken = clips.clone()
    broken[1, 0, 5] = math.inf
    scores = reward(broken, ["a"] * 4, [{}] * 4)
    assert scores[1] is None and all(isinstance(s, float) for i, s in enumerate(scores) if i != 1)
    assert scores[0] == pytest.approx(reward(clips[:1], ["a"], [{}])[0], abs=1e-5)
