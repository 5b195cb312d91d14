"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

Layout of ``<output_dir>/checkpoints/step-<global step>/``:

* ``trainable/`` the sampler's own weights format (LoRA: diffusers ``pytorch_lora_weights.safetensors``);
* ``state.safetensors`` optimizer moments, EMA weights, RNG states;
* ``state.json`` epoch, global step, optimizer hyper-parameters, LR scheduler, metric history pointer.

A checkpoint is written into a temporary folder and renamed into place, so a half-written one is never
found by :func:`latest_checkpoint`; older ones beyond ``keep`` are deleted after the new one exists.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

PREFIX = "step-"
TMP_SUFFIX = ".tmp"


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
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    return tensors, {"python_random": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
        if states:
            torch.cuda.set_rng_state_all(states)
    v, s, g = meta["python_random"]
    random.setstate((v, tuple(s), g))


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and not p.name.endswith(TMP_SUFFIX)
             and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix(PREFIX)))


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    write_trainable: Callable[[Path], None],
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Atomically write checkpoint ``step`` and rotate old ones (keeping ``keep``)."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{PREFIX}{step:08d}{TMP_SUFFIX}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_trainable(tmp / "trainable")
        rt, rm = rng_state()
        save_file({**tensors, **rt}, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**meta, **rm}, indent=1))
        with open(tmp / "state.json", "rb") as f:
            os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint written: %s", final)
    return final


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a checkpoint folder; restores the global RNG states."""
    state_file = path / "state.safetensors"
    if not state_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint: {state_file.name} is missing")
    try:
        tensors = load_file(str(state_file))
    except Exception as exc:
        raise ValueError(f"checkpoint {path} is corrupt ({exc}); delete it to resume from an older one") from exc
    meta = json.loads((path / "state.json").read_text())
    set_rng_state(tensors, meta)
    return tensors, meta
