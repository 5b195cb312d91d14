"""Where a run ran: commit, package versions, threads, device; one row per training session in
``<output_dir>/environment.jsonl`` (a resumed run adds a row), shown by ``alignkit report``."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from alignkit.cpu_threads import thread_settings

__all__ = ["ENVIRONMENT_FILE", "append_environment", "environment", "read_environment"]

ENVIRONMENT_FILE = "environment.jsonl"
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "numpy", "alignkit")


def _git(*args: str) -> str | None:
    import alignkit

    try:
        out = subprocess.run(["git", "-C", str(Path(alignkit.__file__).parent), *args], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: torch.device | str | None = None, processes: int = 1) -> dict[str, Any]:
    """The commit of alignkit's checkout (``git rev-parse HEAD`` and whether tracked files changed; else
    ``$ALIGNKIT_COMMIT``, else unknown), package versions, torch threads and
    the thread settings (:mod:`alignkit.cpu_threads`), load average, CPU count, device, processes, platform,
    UTC date and the command line."""
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no")) if commit is not None else None
    if commit is None:
        commit = os.environ.get("ALIGNKIT_COMMIT") or "unknown (not a git checkout; ALIGNKIT_COMMIT unset)"
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    dev = torch.device(device) if device is not None else torch.device("cpu")
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" and torch.cuda.is_available() else dev.type
    return {"commit": commit, "dirty": dirty, "versions": versions, "torch_threads": torch.get_num_threads(),
            "threads": thread_settings().to_dict(), "load_average": list(os.getloadavg()),
            "cpu_count": os.cpu_count(), "device": str(dev), "device_name": name, "processes": processes,
            "platform": platform.platform(), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "argv": list(sys.argv)}


def append_environment(output_dir: Path | str, row: dict[str, Any]) -> None:
    """Append one session's environment to ``<output_dir>/environment.jsonl``."""
    path = Path(output_dir) / ENVIRONMENT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_environment(output_dir: Path | str) -> list[dict[str, Any]]:
    """The sessions' rows (a torn last row dropped); [] when the file is absent."""
    path = Path(output_dir) / ENVIRONMENT_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict)]
