"""Held-out evaluation: deterministic sampling of evaluation prompts, their reward table and previews.

:func:`evaluate` samples and scores on one process (``alignkit eval``, pretraining scripts, tests);
:func:`evaluate_heldout` splits the evaluation prompts over the launched processes and gathers the tables
(the trainer's before / during / after evaluations).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch

from alignkit.config import EvalConfig
from alignkit.distributed import Shard, on_every_process
from alignkit.ema import EMA
from alignkit.interfaces import Sampler
from alignkit.plans import Deterministic
from alignkit.prompts import PromptSet
from alignkit.reward_set import RewardSet, RewardTable
from alignkit.rollout import RolloutEngine, RolloutRequest
from alignkit.run_dir import record_samples, write_records
from alignkit.types import Rollout

__all__ = ["evaluate", "evaluate_heldout", "save_preview"]


def evaluate(
    sampler: Sampler, reward_set: RewardSet, prompts: PromptSet, *, seed: int, seeds_per_prompt: int,
    batch_size: int, limit: int | None = None, prompt_ids: Sequence[int] | None = None,
) -> tuple[Rollout, RewardTable]:
    """Deterministic (ODE / argmax) sampling of held-out prompts and their reward table.

    Args:
        limit: the first ``limit`` prompts (all when None).
        prompt_ids: these prompts instead (indices into ``prompts``; a sample's noise depends on its id, so a
            prompt gives the same samples in any selection).
    """
    if prompt_ids is None:
        prompt_ids = range(len(prompts) if limit is None else min(limit, len(prompts)))
    ids = list(prompt_ids)
    engine = RolloutEngine(sampler, batch_size=batch_size)
    request = RolloutRequest(prompts=[prompts.prompts[i] for i in ids], prompt_ids=ids,
                             metadata=[prompts.metadata[i] for i in ids], num_seeds=seeds_per_prompt, seed=seed,
                             iteration=0)
    rollout = engine.run(request, Deterministic().schedule(sampler.num_steps, 0, torch.Generator()))
    table = reward_set.score(rollout.samples, rollout.sample_prompts, rollout.sample_metadata)
    return rollout, table


def evaluate_heldout(sampler: Sampler, reward_set: RewardSet, prompts: PromptSet, e: EvalConfig, shard: Shard, *,
                     ema: EMA | None = None, preview: Path | None = None, record: Path | None = None,
                     epoch: int = 0) -> dict[str, float]:
    """Deterministic sampling of the evaluation prompts (EMA weights when ``ema`` is given).

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
            batch_size=e.batch_size, prompt_ids=ids))
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
