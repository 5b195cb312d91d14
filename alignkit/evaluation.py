"""Held-out evaluation: deterministic sampling of evaluation prompts, their reward table, previews and the
paper-style summary.

:func:`evaluate` samples and scores on one process (``alignkit eval``, pretraining scripts, tests);
:func:`evaluate_heldout` splits the evaluation prompts over the launched processes and gathers the tables
(the trainer's before / during / after evaluations). Both sample with the evaluation settings
(``eval.num_steps``, ``eval.guidance``, ``eval.resolution``; :class:`alignkit.interfaces.EvalSettings`) through
:meth:`alignkit.interfaces.Sampler.eval_settings`. :func:`evaluation_prompts` resolves ``eval.prompts``;
:func:`summarize` and :func:`write_report` give ``alignkit eval``'s table: each reward's mean and its mean per
category (a prompt's metadata ``tag`` or ``category``, e.g. GenEval's six tasks).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from alignkit.config import EvalConfig, PromptsConfig, is_prompt_file
from alignkit.distributed import Shard, on_every_process
from alignkit.ema import EMA
from alignkit.interfaces import EvalSettings, Sampler
from alignkit.plans import Deterministic
from alignkit.prompts import PromptSet, read_prompt_file
from alignkit.registry import PROMPT_SOURCES
from alignkit.reward_set import RewardSet, RewardTable
from alignkit.rollout import RolloutEngine, RolloutRequest
from alignkit.run_dir import record_samples, write_records
from alignkit.types import Rollout

__all__ = ["CATEGORY_KEYS", "EvalSummary", "evaluate", "evaluate_heldout", "evaluation_prompts", "sample_category",
           "save_preview", "summarize", "write_report"]

CATEGORY_KEYS = ("tag", "category")
"""Metadata keys whose value is a prompt's category in the summary table (the first one present wins)."""


def evaluation_prompts(e: EvalConfig, heldout: PromptSet) -> PromptSet:
    """The fixed evaluation prompt set: ``eval.prompts`` (a prompt file, or a prompt source's held-out split with
    ``eval.prompt_options``), else ``heldout`` (the held-out split of the recipe's prompts).

    Raises:
        ValueError / FileNotFoundError: the file or source cannot give prompts (naming ``eval.prompts``).
    """
    if e.prompts is None:
        return heldout
    if is_prompt_file(e.prompts):
        return read_prompt_file(e.prompts, "eval.prompts")
    source = PROMPT_SOURCES.get(e.prompts)
    try:
        _, prompts = source(PromptsConfig(source=e.prompts, options=dict(e.prompt_options)))
    except ValueError as exc:
        raise ValueError(f"eval.prompts={e.prompts!r} (its options are eval.prompt_options, written prompts.options "
                         f"below): {exc}") from None
    if len(prompts) == 0:
        raise ValueError(f"eval.prompts={e.prompts!r}: the source's held-out split is empty; check eval.prompt_options")
    return prompts


def evaluate(
    sampler: Sampler, reward_set: RewardSet, prompts: PromptSet, *, seed: int, seeds_per_prompt: int,
    batch_size: int, limit: int | None = None, prompt_ids: Sequence[int] | None = None,
    settings: EvalSettings | None = None,
) -> tuple[Rollout, RewardTable]:
    """Deterministic (ODE / argmax) sampling of held-out prompts and their reward table.

    Args:
        limit: the first ``limit`` prompts (all when None).
        prompt_ids: these prompts instead (indices into ``prompts``; a sample's noise depends on its id, so a
            prompt gives the same samples in any selection).
        settings: evaluation sampling settings (steps, guidance, size); None or unset fields: the training ones.

    Raises:
        ConfigError: ``settings`` the sampler cannot sample with.
    """
    if prompt_ids is None:
        prompt_ids = range(len(prompts) if limit is None else min(limit, len(prompts)))
    ids = list(prompt_ids)
    engine = RolloutEngine(sampler, batch_size=batch_size)
    request = RolloutRequest(prompts=[prompts.prompts[i] for i in ids], prompt_ids=ids,
                             metadata=[prompts.metadata[i] for i in ids], num_seeds=seeds_per_prompt, seed=seed,
                             iteration=0)
    with sampler.eval_settings(**(settings or EvalSettings()).given()):
        rollout = engine.run(request, Deterministic().schedule(sampler.num_steps, 0, torch.Generator()))
    table = reward_set.score(rollout.samples, rollout.sample_prompts, rollout.sample_metadata)
    return rollout, table


def evaluate_heldout(sampler: Sampler, reward_set: RewardSet, prompts: PromptSet, e: EvalConfig, shard: Shard, *,
                     ema: EMA | None = None, preview: Path | None = None, record: Path | None = None,
                     epoch: int = 0) -> dict[str, float]:
    """Deterministic sampling of the evaluation prompts (EMA weights when ``ema`` is given) with the evaluation
    settings of ``e`` (``eval.num_steps``, ``eval.guidance``, ``eval.resolution``).

    Every process samples and scores an equal, contiguous block of the ``eval.num_prompts`` prompts (the
    last blocks padded with repeats of the last prompt, dropped before the means: under FSDP every process
    must run as many forwards); the reward tables are gathered, so the means are those of all the prompts,
    on every process. With ``preview`` (pass it on the main process), a captioned preview of this process's
    block is written there. With ``record`` (pass it on every process), every sample's scores are written to
    ``<record>.jsonl`` and its media file into the folder ``<record>`` (:func:`alignkit.run_dir.record_samples`),
    tagged with ``epoch``.

    Returns:
        ``eval/<reward>`` means (NaN-masked) for the training and evaluation-only rewards, the first
        training reward first.

    Raises:
        RewardError: a reward raised on any process (raised on every process).
    """
    n = min(e.num_prompts, len(prompts))
    share = -(-n // shard.world_size)
    start = shard.rank * share
    ids = [min(i, n - 1) for i in range(start, start + share)]
    real = max(0, min(n, start + share) - start)  # prompts of this block that are not padding
    ctx = ema.swapped() if ema is not None else contextlib.nullcontext()
    with ctx:
        rollout, table = on_every_process(shard, lambda: evaluate(
            sampler, reward_set, prompts, seed=e.seed, seeds_per_prompt=e.seeds_per_prompt,
            batch_size=e.batch_size, prompt_ids=ids, settings=EvalSettings.from_config(e)))
    keep = rollout.keys.prompt_index < real  # [S_p]
    raw = {k: v[keep] for k, v in table.raw.items()}
    parts = shard.gather(raw)
    merged = {k: torch.cat([p[k] for p in parts]) for k in raw}
    out = {f"eval/{k}": float(torch.nanmean(v)) for k, v in merged.items()}
    if record is not None:
        rows = shard.gather(record_samples(sampler, rollout, raw, keep, ids, record, epoch))  # writes its files
        if shard.rank == 0:
            write_records(record, [row for part in rows for row in part])
    if preview is not None:
        first = next(iter(merged))  # the first training reward
        save_preview(sampler, rollout, raw[first], preview, limit=min(32, int(keep.sum())))
    return out


def save_preview(sampler: Sampler, rollout: Rollout, score: torch.Tensor, path: Path, limit: int = 16) -> Path | None:
    """A captioned preview of the first ``limit`` samples through the sampler's :meth:`Sampler.save_samples`
    (a PNG grid or frame strips at ``path``; adapters may add media files, e.g. wav for audio, mp4 for video).
    None when the samples are not a tensor (nothing to draw).

    Args:
        score: ``[S]`` the score written in each caption.
    """
    samples = rollout.samples
    if not isinstance(samples, torch.Tensor):
        return None
    n = min(limit, samples.shape[0])
    prompts = rollout.sample_prompts
    captions = [f"{prompts[i]} | r={float(score[i]):.3g}" for i in range(n)]
    return sampler.save_samples(samples[:n], captions, path)


# --- the summary table ------------------------------------------------------------------------------------


def sample_category(metadata: dict[str, Any]) -> str | None:
    """A sample's category: its prompt's metadata ``tag`` or ``category`` (:data:`CATEGORY_KEYS`), else None."""
    for key in CATEGORY_KEYS:
        value = metadata.get(key)
        if value is not None and str(value).strip():
            return str(value)
    return None


UNCATEGORISED = "(none)"
"""The category of samples without one, when other samples have one."""


@dataclass
class EvalSummary:
    """Each reward's mean over the evaluation samples, overall and per category.

    Attributes:
        rewards: reward names, training rewards first.
        samples: ``S``, the samples scored; ``prompts``: the distinct prompts they came from.
        mean: reward -> mean over its scored samples (NaN-masked; NaN when none could be scored).
        invalid: reward -> samples it could not score.
        categories: category names in order of first appearance (empty when no prompt has one).
        counts: category -> samples.
        by_category: category -> reward -> mean over the category's scored samples.
        overall: reward -> unweighted mean of the category means (GenEval's "Overall": each task weighs the same);
            the sample mean when there are no categories.
        info: what was evaluated (recipe, checkpoint, sampling settings, seeds), written with the table.
    """

    rewards: list[str]
    samples: int
    prompts: int
    mean: dict[str, float]
    invalid: dict[str, int]
    categories: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    by_category: dict[str, dict[str, float]] = field(default_factory=dict)
    overall: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The ``eval/summary.json`` object: ``mean`` / ``overall`` (reward -> value), ``categories`` (category ->
        reward -> mean), ``counts`` (samples, prompts, samples per category), ``invalid``, ``info``; NaN as null."""
        def clean(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            return value

        return clean({"mean": self.mean, "overall": self.overall, "categories": self.by_category,
                      "counts": {"samples": self.samples, "prompts": self.prompts, "categories": self.counts},
                      "invalid": self.invalid, "info": self.info})

    def markdown(self) -> str:
        """The paper-style table: one row per reward; overall (the category mean), the sample mean, then one
        column per category (``n`` samples in the header)."""
        def num(v: float) -> str:
            return f"{v:.4f}" if math.isfinite(v) else "n/a"

        head = ["reward"]
        if self.categories:
            head += ["overall"]
        head += [f"mean (n={self.samples})"] + [f"{c} (n={self.counts[c]})" for c in self.categories]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in self.rewards:
            row = [f"`{name}`"] + ([num(self.overall[name])] if self.categories else []) + [num(self.mean[name])]
            row += [num(self.by_category[c][name]) for c in self.categories]
            lines.append("| " + " | ".join(row) + " |")
        notes = []
        if self.categories:
            notes.append("overall: the unweighted mean of the category means (each category weighs the same); mean: "
                         "over all samples")
        bad = {k: v for k, v in self.invalid.items() if v}
        if bad:
            notes.append("not scored (excluded from the means): " + ", ".join(f"{k} {v}" for k, v in bad.items()))
        settings = self.info.get("settings")
        if settings:
            notes.append("sampling: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        return "\n".join(lines) + "\n" + "".join(f"\n{n}" for n in notes) + ("\n" if notes else "")


def summarize(table: RewardTable, metadata: Sequence[dict[str, Any]], prompts: Sequence[str] | None = None,
              info: dict[str, Any] | None = None) -> EvalSummary:
    """Means of ``table`` overall and per category of the samples' ``metadata`` (:func:`sample_category`).

    Args:
        table: ``[S]`` scores per reward.
        metadata: the ``S`` samples' prompt metadata.
        prompts: the ``S`` samples' prompts (to count distinct prompts).
    """
    names = list(table.raw)
    n = len(metadata)
    cats = [sample_category(m) for m in metadata]
    if all(c is None for c in cats):
        cats = []
    else:
        cats = [c if c is not None else UNCATEGORISED for c in cats]
    order = list(dict.fromkeys(cats))
    summary = EvalSummary(
        rewards=names, samples=n, prompts=len(set(prompts)) if prompts is not None else n,
        mean={k: float(torch.nanmean(v)) for k, v in table.raw.items()}, invalid=dict(table.invalid), categories=order,
        info=dict(info or {}))
    for c in order:
        rows = torch.tensor([i for i, x in enumerate(cats) if x == c], dtype=torch.long)  # [S_c]
        summary.counts[c] = len(rows)
        summary.by_category[c] = {k: float(torch.nanmean(v[rows])) for k, v in table.raw.items()}
    for k in names:
        per = [summary.by_category[c][k] for c in order if math.isfinite(summary.by_category[c][k])]
        summary.overall[k] = (sum(per) / len(per) if per else math.nan) if order else summary.mean[k]
    return summary


def write_report(out: Path, rollout: Rollout, table: RewardTable, summary: EvalSummary) -> None:
    """``out/rewards.jsonl`` (one row per sample: prompt, category when there is one, seed, every reward),
    ``out/summary.json`` (:meth:`EvalSummary.to_json`) and ``out/table.md`` (:meth:`EvalSummary.markdown`)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    seeds = rollout.keys.seed_index.tolist()
    for i, (prompt, meta) in enumerate(zip(rollout.sample_prompts, rollout.sample_metadata, strict=True)):
        row: dict[str, Any] = {"prompt": prompt}
        category = sample_category(meta)
        if category is not None:
            row["category"] = category
        row["seed"] = seeds[i]
        row.update({k: (None if math.isnan(float(v[i])) else float(v[i])) for k, v in table.raw.items()})
        rows.append(row)
    (out / "rewards.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=1) + "\n", encoding="utf-8")
    (out / "table.md").write_text(summary.markdown(), encoding="utf-8")
