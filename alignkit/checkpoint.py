"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

Layout of ``<output_dir>/checkpoints/step-<global step>/``:

* ``trainable/`` the weights to use, in the sampler's own format (LoRA: diffusers
  ``pytorch_lora_weights.safetensors``, what a stock pipeline's ``load_lora_weights`` reads): with
  ``train.ema.enabled`` the EMA weights (what the run's held-out evaluation sampled with), else the trained ones;
* ``trainable_raw/`` (EMA runs only) the trained (raw) weights, same format: what the optimizer updates and
  a resumed run continues from;
* ``state.safetensors`` optimizer moments, EMA weights (float32, exact), RNG states;
* ``state.json`` epoch, global step, counters, optimizer hyper-parameters, LR scheduler, loss scaler, the
  training prompts' fingerprint, the composed config, the Python and NumPy RNG states and a manifest
  (relative path -> size in bytes, and -> sha256) of every other file.

A run's checkpoint is written by :func:`save_training_checkpoint` and read back by
:func:`open_checkpoint` (once, before the trainable module is sharded or wrapped: it loads the raw trainable
weights; a latest checkpoint that cannot be read gives way to the previous intact one, with a warning naming
both) and :func:`restore_checkpoint` (optimizer, scheduler, scaler, EMA, counters, RNG; it also drops rows of
``metrics.jsonl`` written after the checkpoint, and a torn last row).

A checkpoint is written into ``step-<N>.tmp``, every file and folder is fsynced, and the folder is renamed
into place (then its parent fsynced), so a crash at any moment leaves either the complete checkpoint or a
``.tmp`` folder that :func:`latest_checkpoint` never returns (and the next save removes). A folder whose
files do not match its manifest's sizes is skipped with a warning; one whose files no longer match their
sha256 (checked when a run resumes from it) gives way to the previous checkpoint. Older checkpoints beyond
``keep`` are deleted only after the new one is in place, and a failed write (a full disk) leaves every earlier
one intact.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit.config import RunConfig, TrainConfig, to_dict
from alignkit.distributed import Shard
from alignkit.ema import EMA
from alignkit.errors import CheckpointError, RunFolderError
from alignkit.fsdp import gather_full, shard_optimizer_state, trainable_state
from alignkit.interfaces import Sampler
from alignkit.metrics import METRICS_FILE, MetricsFile, load_metrics
from alignkit.plans import ExplorationPlan
from alignkit.prompts import PromptSet

logger = logging.getLogger(__name__)

PREFIX = "step-"
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
_NAME = re.compile(r"^step-(\d+)$")
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
TRAINABLE = "trainable"
TRAINABLE_RAW = "trainable_raw"


def optimizer_to_flat(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors and JSON-able data."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in opt_state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optim."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, entries in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global RNG states (torch CPU and CUDA, Python ``random``, NumPy) as tensors and JSON data.

    alignkit itself draws every random number from generators seeded by ``(seed, epoch, ...)``; the global
    states are saved for code outside it (a reward or a sampler that uses the global RNG, dropout).
    """
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    return tensors, {"python_random": [py[0], list(py[1]), py[2]],
                     "numpy_random": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                                      "cached_gaussian": float(cached)}}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, s, g = meta["python_random"]
    random.setstate((v, tuple(s), g))
    npm = meta.get("numpy_random")
    if npm is not None and "rng.numpy" in tensors:
        keys = tensors["rng.numpy"].numpy().astype(np.uint32)
        np.random.set_state((npm["kind"], keys, npm["pos"], npm["has_gauss"], npm["cached_gaussian"]))


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _manifest(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``folder`` except ``state.json``."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != STATE_JSON}


def _digests(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` except ``state.json``."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != STATE_JSON:
            with open(p, "rb") as f:
                out[p.relative_to(folder).as_posix()] = hashlib.file_digest(f, "sha256").hexdigest()
    return out


def corrupt_reason(folder: Path, meta: dict[str, Any]) -> str | None:
    """Which file of complete checkpoint ``folder`` no longer has the content it was written with (its sha256
    differs from ``state.json``'s), or None; checkpoints written without digests are not checked."""
    expected = meta.get("sha256")
    if not isinstance(expected, dict):
        return None
    found = _digests(folder)
    for name, digest in expected.items():
        if found.get(name) != digest:
            what = f"{name} is corrupt (its sha256 differs from the one recorded when it was written)"
            return f"the trainable weights cannot be loaded: {what}" if name.startswith(TRAINABLE) else what
    return None


def incomplete_reason(folder: Path) -> str | None:
    """Why ``folder`` is not a complete checkpoint, or None when it is."""
    meta_file = folder / STATE_JSON
    if not meta_file.is_file():
        return f"{STATE_JSON} is missing"
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"{STATE_JSON} is not valid JSON ({exc})"
    expected = meta.get("files")
    if expected is None:  # written before manifests existed: the state tensors must at least be there
        return None if (folder / STATE_TENSORS).is_file() else f"{STATE_TENSORS} is missing"
    if not isinstance(expected, dict):
        return f"{STATE_JSON} has a malformed file manifest"
    found = _manifest(folder)
    for name, size in expected.items():
        if name not in found:
            return f"{name} is missing"
        if found[name] != size:
            return f"{name} has {found[name]} bytes, the manifest says {size}"
    return None


def checkpoint_folders(output_dir: Path) -> list[tuple[Path, str | None]]:
    """Every ``step-N`` folder (not the ``.tmp`` / ``.old`` leftovers of a save), oldest first, with why it is
    incomplete (None when it is complete)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [(p, incomplete_reason(p)) for _, p in sorted(found)]


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete ``step-N`` folders are skipped with a warning."""
    found = []
    for p, reason in checkpoint_folders(output_dir):
        if reason is not None:
            logger.warning("ignoring incomplete checkpoint %s: %s", p, reason)
            continue
        found.append(p)
    return found


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def kept_checkpoint_phrase(output_dir: Path) -> str:
    """The clause a stopping run's message gives about what it leaves behind: the latest checkpoint, or none."""
    last = latest_checkpoint(output_dir)
    return f"the last checkpoint, {last}, is kept" if last else "no checkpoint had been written yet"


def _fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (and ``folder`` itself)."""
    for p in sorted(folder.rglob("*"), key=lambda q: len(q.parts), reverse=True):
        _fsync(p)
    _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale(root: Path) -> None:
    """Delete leftovers of interrupted saves (``*.tmp``, ``*.old``); they are never complete checkpoints."""
    for p in root.iterdir():
        if p.name.startswith(PREFIX) and p.name.endswith((TMP_SUFFIX, OLD_SUFFIX)):
            logger.info("removing the leftover of an interrupted checkpoint save: %s", p)
            shutil.rmtree(p, ignore_errors=True)


def _write_failed(exc: OSError, tmp: Path, previous: Path | None) -> CheckpointError:
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint existed"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free disk space or set output_dir to a larger disk, then rerun the same command to resume"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make output_dir writable or choose another output_dir"
    else:
        fix = "check the disk holding output_dir"
    return CheckpointError(f"could not write checkpoint {tmp.name.removesuffix(TMP_SUFFIX)} in {tmp.parent}: "
                           f"{exc.strerror or exc} (errno {exc.errno}); {kept}; {fix}")


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    write_trainable: Callable[[Path], None],
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    keep: int,
    write_raw: Callable[[Path], None] | None = None,
) -> Path:
    """Atomically write checkpoint ``step`` and rotate old ones (keeping the newest ``keep``).

    ``write_trainable`` writes the weights to use into ``trainable/``; ``write_raw``, when given, the trained
    (raw) weights into ``trainable_raw/`` (EMA runs).

    Raises:
        CheckpointError: the write failed (e.g. the disk is full); the partial folder is removed and every
            earlier checkpoint is left as it was.
    """
    if keep < 1:
        raise ValueError(f"train.keep_checkpoints={keep}: must be >= 1")
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    previous = latest_checkpoint(output_dir)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{PREFIX}{step:08d}{TMP_SUFFIX}"
    tmp.mkdir()
    try:
        write_trainable(tmp / TRAINABLE)
        if write_raw is not None:
            write_raw(tmp / TRAINABLE_RAW)
        rt, rm = rng_state()
        save_file({**tensors, **rt}, str(tmp / STATE_TENSORS))
        body = json.dumps({**meta, **rm, "files": _manifest(tmp), "sha256": _digests(tmp)}, indent=1)
        with open(tmp / STATE_JSON, "w", encoding="utf-8") as f:
            f.write(body)
        _fsync_tree(tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(exc, tmp, previous) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside = None
    if final.exists():  # same step written again (e.g. an epoch whose updates were all skipped)
        aside = final.with_name(final.name + OLD_SUFFIX)
        final.rename(aside)
    tmp.rename(final)
    _fsync(root)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint written: %s", final)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a checkpoint folder; restores the global RNG states.

    Raises:
        CheckpointError: naming the folder, what is wrong with it and how to proceed.
    """
    path = Path(path)
    reason = incomplete_reason(path)
    if reason is not None:
        raise CheckpointError(f"{path} is not a complete checkpoint ({reason}); delete it to resume from an "
                              "older one, or set train.resume=false to start afresh")
    try:
        tensors = load_file(str(path / STATE_TENSORS))
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: {STATE_TENSORS} cannot be read ({exc}); delete "
                              "the folder to resume from an older checkpoint") from exc
    meta = json.loads((path / STATE_JSON).read_text())
    set_rng_state(tensors, meta)
    return tensors, meta


# --- a run's training state ---------------------------------------------------------------------------


@dataclass
class TrainState:
    """Progress counters, saved in every checkpoint (``history`` is not: it is re-read from metrics.jsonl).

    Attributes:
        epoch: completed epochs; also the position in the prompt source (epoch ``e`` draws its prompts
            from a generator seeded by ``(seed, e)``).
        global_step: optimizer steps taken.
        nonfinite_skipped: optimizer steps skipped because a loss or the gradient was NaN / inf.
        scale_overflows: fp16 steps skipped by the loss scaler (gradients overflowed; it lowered its scale);
            not counted as non-finite.
        consecutive_nonfinite: skipped steps since the last good one (``train.max_nonfinite_steps`` bounds it).
        masked_skipped: epochs not trained because every sample was masked (``train/masked_skipped``).
        consecutive_masked: such epochs since the last one that trained (``train.max_masked_epochs`` bounds it).
        nfe_total: model evaluations of all processes so far.
        seconds_total: training wall time so far (rollout to update; evaluation excluded).
        cpu_seconds_total: process CPU seconds of the same (this process).
        cost_totals: running totals of the ``cost/*`` metrics (:data:`alignkit.cost.COST_METRICS`).
        history: this process's per-epoch metrics.
    """

    epoch: int = 0
    global_step: int = 0
    nonfinite_skipped: int = 0
    scale_overflows: int = 0
    consecutive_nonfinite: int = 0
    masked_skipped: int = 0
    consecutive_masked: int = 0
    nfe_total: int = 0
    seconds_total: float = 0.0
    cpu_seconds_total: float = 0.0
    cost_totals: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class CheckpointParts:
    """The objects whose state a run's checkpoint holds besides :class:`TrainState`.

    Attributes:
        sampler: writes and loads the trainable weights.
        optimizer: the (accelerate-prepared) optimizer.
        lr_scheduler: its learning-rate schedule.
        scaler: the fp16 loss scaler, or None.
        ema: the EMA of the trainable weights, or None.
        fsdp: whether the trainable module and optimizer state are sharded over the processes.
        plan: the exploration plan, whose learned state (:meth:`ExplorationPlan.state_dict`) is saved; or None.
    """

    sampler: Sampler
    optimizer: Any
    lr_scheduler: Any
    scaler: Any | None
    ema: EMA | None
    fsdp: bool
    plan: ExplorationPlan | None = None


@dataclass
class OpenedCheckpoint:
    """A checkpoint read by :func:`open_checkpoint`, its trainable weights already loaded.

    Attributes:
        path: the ``step-<N>`` folder (the newest one that could be read).
        tensors: ``state.safetensors`` (optimizer moments ``optim.*``, EMA ``ema.*``, RNG ``rng.*``).
        meta: ``state.json``.
    """

    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def prompt_fingerprint(prompts: PromptSet) -> str:
    """sha256 of the training prompts and their metadata (a resumed run must draw from the same source)."""
    body = json.dumps([prompts.prompts, prompts.metadata], sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def save_training_checkpoint(output_dir: Path, state: TrainState, parts: CheckpointParts, *, prompts: PromptSet,
                             cfg: RunConfig, shard: Shard, is_main: bool) -> Path | None:
    """Write a checkpoint of everything the next epoch depends on. Call it on every process: sharded state
    (``train.sharding=fsdp``) is gathered from all of them; the main process writes and returns the folder
    (None elsewhere).

    Raises:
        CheckpointError: on every process, when the write failed; earlier checkpoints are intact.
    """
    failure, written = None, None
    try:
        written = _write_training_checkpoint(output_dir, state, parts, prompts=prompts, cfg=cfg, shard=shard,
                                             is_main=is_main)
    except CheckpointError as exc:
        failure = str(exc)
    failures = [f for f in shard.gather(failure) if f]
    if failures:
        raise CheckpointError(failures[0])
    return written


def ema_weights(parts: CheckpointParts, ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The EMA weights as the sampler's trainable parameters by name (every name of a tied parameter), in each
    parameter's dtype: what the parameters hold while :meth:`EMA.swapped` is on.

    Args:
        ema: full ``ema.<i>`` tensors (:meth:`EMA.state_dict`, gathered under FSDP).
    """
    assert parts.ema is not None
    index = {id(p): i for i, p in enumerate(parts.ema.params)}
    out = {}
    for name, p in parts.sampler.trainable_module().named_parameters(remove_duplicate=False):
        if p.requires_grad:
            out[name] = ema[f"ema.{index[id(p)]}"].detach().to(dtype=p.dtype)
    return out


def _write_training_checkpoint(output_dir: Path, state: TrainState, parts: CheckpointParts, *,
                               prompts: PromptSet, cfg: RunConfig, shard: Shard, is_main: bool) -> Path | None:
    opt_state = parts.optimizer.state_dict()
    ema = parts.ema.state_dict() if parts.ema is not None else {}
    params = None
    if parts.fsdp:
        opt_state, ema = gather_full(opt_state), gather_full(ema)
        params = trainable_state(parts.sampler.trainable_module())
    if not is_main:
        return None
    save = functools.partial(parts.sampler.save_trainable, params=params)
    write_trainable, write_raw = save, None
    if parts.ema is not None:  # trainable/ is what the run evaluated with; the raw weights go beside it
        write_trainable = functools.partial(parts.sampler.save_trainable, params=ema_weights(parts, ema))
        write_raw = save
    opt_tensors, opt_meta = optimizer_to_flat(opt_state)
    tensors = {**opt_tensors, **ema}
    s = state
    meta = {
        "epoch": s.epoch, "global_step": s.global_step, "nonfinite_skipped": s.nonfinite_skipped,
        "scale_overflows": s.scale_overflows,
        "grad_scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "consecutive_nonfinite": s.consecutive_nonfinite, "masked_skipped": s.masked_skipped,
        "consecutive_masked": s.consecutive_masked, "nfe_total": s.nfe_total,
        "seconds_total": s.seconds_total, "cpu_seconds_total": s.cpu_seconds_total,
        "optimizer": opt_meta, "lr_scheduler": parts.lr_scheduler.state_dict(),
        "prompts": {"fingerprint": prompt_fingerprint(prompts), "count": len(prompts),
                    "drawn": s.epoch * cfg.train.prompts_per_epoch},
        "world_size": shard.world_size, "config": to_dict(cfg), "cost_totals": s.cost_totals,
        "plan": parts.plan.state_dict() if parts.plan is not None else {},
    }
    return save_checkpoint(output_dir, s.global_step, write_trainable=write_trainable, write_raw=write_raw,
                           tensors=tensors, meta=meta, keep=cfg.train.keep_checkpoints)


def open_checkpoint(output_dir: Path, prompts: PromptSet, sampler: Sampler, *,
                    force: bool = False) -> OpenedCheckpoint | None:
    """Read the latest intact checkpoint of ``output_dir`` (None when the folder holds no checkpoint) and load its
    raw trainable weights (``trainable_raw/`` when present, else ``trainable/``) into ``sampler``: call it before
    the trainable module is sharded or wrapped; the rest is restored by :func:`restore_checkpoint` once the
    optimizer exists.

    A checkpoint that cannot be read (an incomplete folder, a corrupt state or weights file) gives way to the
    previous one, with a warning naming both; when none can be read the run is refused, never restarted.

    Args:
        force: ``train.resume=force``: continue even when the checkpoint was written for other training prompts.

    Raises:
        CheckpointError: no checkpoint folder can be read (each one listed with its fault), or the newest
            readable one was written for other training prompts (without ``force``).
    """
    folders = checkpoint_folders(output_dir)
    if not folders:
        return None
    faults: list[tuple[Path, str]] = []
    for path, reason in reversed(folders):
        if reason is None:
            try:
                opened = _open(path, prompts, sampler, force=force)
            except _Unreadable as exc:
                reason = str(exc)
            else:
                if faults:
                    logger.warning("resuming from %s, the newest intact checkpoint: %s", path,
                                   "; ".join(f"{p} cannot be used ({why})" for p, why in faults))
                return opened
        faults.append((path, reason))
    listed = "; ".join(f"{p}: {why}" for p, why in faults)
    raise CheckpointError(
        f"no checkpoint in {checkpoint_root(output_dir)} can be resumed from ({listed}); starting again from epoch 0 "
        "would discard that run. Delete the folder(s) listed to start it afresh here, or choose a new output_dir"
    )


class _Unreadable(Exception):
    """A checkpoint folder whose files cannot be read back (the message says which and why)."""


def _open(path: Path, prompts: PromptSet, sampler: Sampler, *, force: bool) -> OpenedCheckpoint:
    try:
        tensors, meta = load_checkpoint(path)
    except CheckpointError as exc:
        raise _Unreadable(str(exc)) from exc
    except (OSError, ValueError) as exc:  # state.json vanished or does not parse
        raise _Unreadable(f"{STATE_JSON} cannot be read ({exc})") from exc
    corrupt = corrupt_reason(path, meta)
    if corrupt is not None:
        raise _Unreadable(f"{corrupt}; delete the folder to resume from an older checkpoint")
    saved = meta.get("prompts", {}).get("fingerprint")
    if saved is not None and saved != prompt_fingerprint(prompts):
        message = (f"checkpoint {path} was written for other training prompts (fingerprint {saved}, now "
                   f"{prompt_fingerprint(prompts)})")
        if not force:
            raise CheckpointError(f"{message}; resuming would not continue that run. Use a new output_dir, or set "
                                  "train.resume=force to continue its weights on the new prompts")
        logger.warning("train.resume=force: %s; continuing on the new prompts", message)
    weights = path / TRAINABLE_RAW if (path / TRAINABLE_RAW).is_dir() else path / TRAINABLE
    try:
        sampler.load_trainable(weights)
    except Exception as exc:  # safetensors, peft and the adapter each raise their own types
        raise _Unreadable(f"the trainable weights cannot be loaded from {weights.name}/ ({exc}); delete the folder to "
                          "resume from an older checkpoint") from exc
    return OpenedCheckpoint(path, tensors, meta)


def restore_checkpoint(opened: OpenedCheckpoint, parts: CheckpointParts, *, output_dir: Path, is_main: bool,
                       barrier: Callable[[], None], settings: TrainConfig | None = None) -> TrainState:
    """Restore the optimizer, LR scheduler, loss scaler, EMA and global RNG states from ``opened`` and return
    its counters; the rows of ``metrics.jsonl`` written after the checkpoint (epochs that will be trained
    again) are dropped (:func:`truncate_metrics`). Call it on every process.

    Args:
        settings: ``train.resume=force``: the run's optimizer settings (learning rate, Adam betas and eps,
            weight decay, warm-up), applied over the checkpoint's (:func:`apply_optimizer_settings`); None keeps
            the checkpoint's (a plain resume, whose settings were checked to be equal).
    """
    tensors, meta = opened.tensors, opened.meta
    set_rng_state(tensors, meta)  # again: whatever was drawn since the checkpoint was opened is undone
    parts.optimizer.load_state_dict(optimizer_from_flat(tensors, meta["optimizer"]))
    if parts.fsdp:
        shard_optimizer_state(parts.optimizer.optimizer)
    parts.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    if settings is not None:
        saved_train = (meta.get("config") or {}).get("train", {})
        apply_optimizer_settings(parts.optimizer, parts.lr_scheduler, settings, saved_train.get("warmup_steps"))
    ema = {k: v for k, v in tensors.items() if k.startswith("ema.")}
    if parts.ema is not None:
        if ema:
            parts.ema.load_state_dict(ema)
        else:  # EMA switched on by a forced resume: it starts from the restored weights
            logger.warning("checkpoint %s has no EMA weights (EMA was off): the EMA starts from its trained weights",
                           opened.path)
    if parts.scaler is not None and meta.get("grad_scaler"):
        parts.scaler.load_state_dict(meta["grad_scaler"])
    state = TrainState(
        epoch=meta["epoch"], global_step=meta["global_step"], nonfinite_skipped=meta.get("nonfinite_skipped", 0),
        scale_overflows=meta.get("scale_overflows", 0), consecutive_nonfinite=meta.get("consecutive_nonfinite", 0),
        masked_skipped=meta.get("masked_skipped", 0), consecutive_masked=meta.get("consecutive_masked", 0),
        nfe_total=meta.get("nfe_total", 0), seconds_total=meta.get("seconds_total", 0.0),
        cpu_seconds_total=meta.get("cpu_seconds_total", 0.0),
        cost_totals=dict(meta.get("cost_totals", {})),
    )
    if parts.plan is not None:
        parts.plan.load_state_dict(meta.get("plan", {}))
    state.history = truncate_metrics(output_dir, state.epoch, is_main=is_main, barrier=barrier)
    logger.info("resumed from %s (epoch %d, step %d)", opened.path, state.epoch, state.global_step)
    return state


def apply_optimizer_settings(optimizer: Any, lr_scheduler: Any, t: TrainConfig,
                             saved_warmup: int | None = None) -> list[str]:
    """Put the settings ``t`` into a restored optimizer and schedule (``train.resume=force``): a new learning rate
    becomes the schedule's base (the current rate is recomputed at the schedule's step), new Adam betas / eps and
    weight decay go into every parameter group. Returns what changed (also logged as warnings).

    Args:
        saved_warmup: the checkpoint's ``train.warmup_steps`` (the schedule's lambda is not saved: it is always
            the new configuration's, so a change only shows in the recomputed rate).
    """
    changed = []
    groups = optimizer.param_groups
    if any(b != t.learning_rate for b in lr_scheduler.base_lrs):
        changed.append(f"train.learning_rate {lr_scheduler.base_lrs[0]} -> {t.learning_rate}")
        lr_scheduler.base_lrs = [t.learning_rate] * len(lr_scheduler.base_lrs)
        for g in groups:
            g["initial_lr"] = t.learning_rate
    if saved_warmup is not None and saved_warmup != t.warmup_steps:
        changed.append(f"train.warmup_steps {saved_warmup} -> {t.warmup_steps}")
    if changed:  # the rate at the schedule's current step, as LambdaLR computes it
        step = lr_scheduler.last_epoch
        for g, base, fn in zip(groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas, strict=True):
            g["lr"] = base * fn(step)
        lr_scheduler._last_lr = [g["lr"] for g in groups]
    for key, value in (("betas", list(t.adam_betas)), ("eps", t.adam_eps), ("weight_decay", t.weight_decay)):
        for g in groups:
            current = list(g[key]) if key == "betas" else g[key]
            if current != value:
                changed.append(f"train.{'adam_' if key != 'weight_decay' else ''}{key} {current} -> {value}")
                g[key] = tuple(value) if key == "betas" else value
    for c in dict.fromkeys(changed):
        logger.warning("train.resume=force: the optimizer continues with %s", c)
    return changed


def truncate_metrics(output_dir: Path, epoch: int | None, *, is_main: bool,
                     barrier: Callable[[], None]) -> list[dict[str, float]]:
    """Keep the ``metrics.jsonl`` rows of epochs ``<= epoch`` (every row is dropped when ``epoch`` is None: a
    run that starts afresh) and drop a torn last row (a write cut short by a crash), with a warning; the main
    process rewrites the file atomically, then every process waits at ``barrier``. Returns the kept rows of
    trained epochs.

    Raises:
        RunFolderError: a row before the last one is not JSON (naming the line).
    """
    path = Path(output_dir) / METRICS_FILE
    try:
        found = load_metrics(path) if path.is_file() else MetricsFile([])
    except ValueError as exc:
        raise RunFolderError(str(exc)) from None
    rows = found.rows
    kept = [] if epoch is None else [r for r in rows if r.get("epoch", 0) <= epoch]
    if found.torn is not None:
        logger.warning("%s: dropping its last row, cut short by a crash: %.80r", path, found.torn)
    if is_main and (len(kept) < len(rows) or found.torn is not None):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))
        os.replace(tmp, path)
        if len(kept) < len(rows):
            after = "written after the checkpoint" if epoch is not None else \
                "of an earlier start that wrote no checkpoint"
            logger.info("%s: dropped %d rows %s", METRICS_FILE, len(rows) - len(kept), after)
    barrier()
    return [r for r in kept if r.get("epoch", 0) >= 1 and "reward/score_mean" in r]
