"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

Layout of ``<output_dir>/checkpoints/step-<global step>/``:

* ``trainable/`` the sampler's own weights format (LoRA: diffusers ``pytorch_lora_weights.safetensors``);
* ``state.safetensors`` optimizer moments, EMA weights, RNG states;
* ``state.json`` epoch, global step, counters, optimizer hyper-parameters, LR scheduler, the Python and
  NumPy RNG states and a manifest (relative path -> size in bytes) of every other file.

A checkpoint is written into ``step-<N>.tmp``, every file and folder is fsynced, and the folder is renamed
into place (then its parent fsynced), so a crash at any moment leaves either the complete checkpoint or a
``.tmp`` folder that :func:`latest_checkpoint` never returns (and the next save removes). A folder whose
files do not match its manifest is skipped with a warning. Older checkpoints beyond ``keep`` are deleted
only after the new one is in place, and a failed write (a full disk) leaves every earlier one intact.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from alignkit.errors import CheckpointError

logger = logging.getLogger(__name__)

PREFIX = "step-"
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
_NAME = re.compile(r"^step-(\d+)$")
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"


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


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete ``step-N`` folders are skipped with a warning."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if not (m and p.is_dir()):
            continue
        reason = incomplete_reason(p)
        if reason is not None:
            logger.warning("ignoring incomplete checkpoint %s: %s", p, reason)
            continue
        found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


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
) -> Path:
    """Atomically write checkpoint ``step`` and rotate old ones (keeping the newest ``keep``).

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
        write_trainable(tmp / "trainable")
        rt, rm = rng_state()
        save_file({**tensors, **rt}, str(tmp / STATE_TENSORS))
        body = json.dumps({**meta, **rm, "files": _manifest(tmp)}, indent=1)
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
