"""OCR reward: hand-computed edit distances and scores, quote extraction, and rapidocr's shipped PP-OCR models
reading text rendered with a real TrueType font."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from alignkit.rewards.ocr import OCRReward, edit_distance, normalize_text, ocr_score, quoted_text, upscale_min_side

pytest.importorskip("rapidocr")
pytest.importorskip("onnxruntime")


@pytest.mark.parametrize(
    ("a", "b", "dist"),
    [
        ("", "", 0),
        ("", "abc", 3),
        ("abc", "", 3),
        ("same", "same", 0),
        ("kitten", "sitting", 3),  # k->s, e->i, +g
        ("flaw", "lawn", 2),  # -f, +n
        ("ab", "ba", 2),  # no transpositions in Levenshtein
        ("openlate", "opnlate", 1),
        ("sunday", "saturday", 3),  # +a, +t, n->r
    ],
)
def test_edit_distance_hand_values(a: str, b: str, dist: int):
    assert edit_distance(a, b) == dist
    assert edit_distance(b, a) == dist


def test_edit_distance_matches_full_table():
    def full(a: str, b: str) -> int:  # textbook (len(a)+1) x (len(b)+1) table
        t = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
        for i in range(1, len(a) + 1):
            for j in range(1, len(b) + 1):
                t[i][j] = min(t[i - 1][j] + 1, t[i][j - 1] + 1, t[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
        return t[-1][-1]

    rng = np.random.default_rng(0)
    for _ in range(50):
        a = "".join(rng.choice(list("abc"), size=rng.integers(0, 8)))
        b = "".join(rng.choice(list("abc"), size=rng.integers(0, 8)))
        assert edit_distance(a, b) == full(a, b)


@pytest.mark.parametrize(
    ("prompt", "text"),
    [
        ('a sign that says "open late"', "open late"),
        ("a sign that says 'open late'", "open late"),
        ("a sign that says “open late”", "open late"),
        ("a dog's sign that says \"woof\"", "woof"),  # apostrophe is not a quote
        ("don't write 'stop' on it", "stop"),
        ("'it's fine' on a mug", "it's fine"),
        ('first "one" then \'two\'', "one"),
        ("first 'one' then \"two\"", "one"),
        ("a plain photo of a cat", None),
        ('an unclosed "quote', None),
    ],
)
def test_quoted_text(prompt: str, text: str | None):
    assert quoted_text(prompt) == text


def test_normalize_text_modes():
    assert normalize_text("  Open\tLate ") == "openlate"
    assert normalize_text("  Open\tLate ", whitespace="collapse") == "open late"
    assert normalize_text("  Open\tLate ", lowercase=False, whitespace="keep") == "  Open\tLate "
    with pytest.raises(ValueError, match="whitespace='strip'"):
        normalize_text("x", whitespace="strip")


def test_ocr_score_hand_values():
    # flow_grpo: substring -> exact; distance capped at len(target)
    assert ocr_score("bigopenlatesign", "openlate", "flow_grpo") == 1.0
    assert ocr_score("opnlate", "openlate", "flow_grpo") == pytest.approx(1 - 1 / 8)
    assert ocr_score("", "openlate", "flow_grpo") == 0.0
    assert ocr_score("x" * 50, "openlate", "flow_grpo") == 0.0
    # normalized: 1 - lev / max(len)
    assert ocr_score("bigopenlatesign", "openlate", "normalized") == pytest.approx(1 - 7 / 15)
    assert ocr_score("opnlate", "openlate", "normalized") == pytest.approx(1 - 1 / 8)
    assert ocr_score("", "openlate", "normalized") == 0.0
    with pytest.raises(ValueError, match="target is empty"):
        ocr_score("abc", "")
    with pytest.raises(ValueError, match="scoring='cer'"):
        ocr_score("abc", "abc", "cer")


def test_upscale_min_side():
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    assert upscale_min_side(img, 64).shape == (64, 128, 3)
    assert upscale_min_side(img, 16) is img


def _font(size: int) -> ImageFont.FreeTypeFont:
    spec = importlib.util.find_spec("matplotlib")
    if spec is not None and spec.origin is not None:
        ttf = Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
        if ttf.is_file():
            return ImageFont.truetype(str(ttf), size)
    return ImageFont.load_default(size=size)


def render(text: str, size: int) -> torch.Tensor:
    """``[3, size, size]`` in [0, 1]: black ``text`` centred on white, about 85 % of the width."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    if text:
        font_size = size
        while True:
            font = _font(font_size)
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            if right - left <= 0.85 * size or font_size <= 6:
                break
            font_size -= 1
        xy = ((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top)
        draw.text(xy, text, font=font, fill="black")
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255.0


@pytest.fixture(scope="module")
def ocr() -> OCRReward:
    return OCRReward()


def test_ocr_reward_reads_rendered_text(ocr: OCRReward):
    prompt = 'a shop sign that says "open late"'
    images = torch.stack([
        render("open late", 256),  # correct
        render("closed", 256),  # wrong text
        render("", 256),  # blank
        render("Open Late", 256),  # case and spacing are normalised away
        render("open late", 256),  # no quote in the prompt: masked
        render("free wifi", 256),  # target from metadata
    ])
    prompts = [prompt] * 4 + ["a shop sign at night", "a shop sign"]
    metadata = [{}] * 5 + [{"text": "free wifi"}]
    good, wrong, blank, cased, unquoted, from_meta = ocr(images, prompts, metadata)
    assert good == pytest.approx(1.0, abs=0.15)
    assert cased == pytest.approx(1.0, abs=0.15)
    assert from_meta == pytest.approx(1.0, abs=0.15)
    assert wrong < good - 0.4
    assert blank == 0.0
    assert unquoted is None


def test_ocr_reward_upscales_tiny_images(ocr: OCRReward):
    images = torch.stack([render("open late", 64), render("closed", 64)])
    good, wrong = ocr(images, ['"open late"'] * 2, [{}, {}])
    assert good == pytest.approx(1.0, abs=0.15)
    assert wrong < good - 0.4


def test_ocr_reward_masks_without_running_ocr(ocr: OCRReward):
    images = torch.zeros(2, 3, 8, 8)
    assert ocr(images, ["no quotes here", 'empty ""'], [{}, {}]) == [None, None]


def test_ocr_reward_rejects_bad_settings_and_inputs(ocr: OCRReward):
    with pytest.raises(ValueError, match="scoring='cer'"):
        OCRReward(scoring="cer")
    with pytest.raises(ValueError, match="min_side=0"):
        OCRReward(min_side=0)
    with pytest.raises(FileNotFoundError, match=r"det_model_path='/nonexistent\.onnx'"):
        OCRReward(det_model_path="/nonexistent.onnx")
    with pytest.raises(ValueError, match=r"metadata\['text'\]=3"):
        ocr(torch.zeros(1, 3, 8, 8), ["x"], [{"text": 3}])
    with pytest.raises(ValueError, match="2 images, 1 prompts"):
        ocr(torch.zeros(2, 3, 8, 8), ['"a"'], [{}])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ocr(torch.zeros(1, 8, 8), ['"a"'], [{}])
