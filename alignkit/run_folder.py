"""A run folder belongs to one run: a lock while a process uses it, and a configuration check on resume.

* **Lock.** ``<output_dir>/alignkit.lock`` holds the pid, host and command of the process using the folder
  and is ``flock``-ed while it does (the kernel releases the lock when that process dies, however it dies).
  A second run on the folder is refused with the holder's pid; a lock file left by a process that no longer
  holds it (a killed run) is taken over with a warning.
* **Resume** (``train.resume``). ``true``: continue from the latest intact checkpoint, refusing a
  configuration that would train differently from the one the checkpoint was written with (every changed
  field listed, old and new value, with the fixes); the fields of :data:`RESUMABLE` may change freely.
  ``force``: continue with the new configuration (changes logged; new optimizer settings are applied to the
  restored optimizer). ``false``: a new run, refused when the folder already holds checkpoints (nothing is
  ever deleted or overwritten).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignkit.checkpoint import checkpoint_folders
from alignkit.config import RunConfig, to_dict
from alignkit.errors import RunFolderError
from alignkit.metrics import METRICS_FILE

logger = logging.getLogger(__name__)

LOCK_FILE = "alignkit.lock"

RESUMABLE: dict[str, str] = {
    "train.epochs": "how long the run goes on",
    "train.resume": "this setting",
    "output_dir": "the folder itself",
    "recipe": "the recipe's name (its settings are compared field by field)",
    "train.checkpoint_every": "checkpointing",
    "train.keep_checkpoints": "checkpointing",
    "train.sample_every": "previews",
    "train.log_with": "logging",
    "eval": "held-out evaluation",
    "train.max_nonfinite_steps": "a stop limit",
    "train.max_masked_epochs": "a stop limit",
    "device": "where it runs",
    "train.sharding": "how the model is laid out over the processes (the same update)",
    "train.rollout_batch_size": "memory (a sample's noise does not depend on its batch)",
    "train.overlap_rewards": "timing (the same scores)",
    "backbone.gradient_checkpointing": "memory",
    "backbone.vae_tiling": "memory",
    "backbone.vae_slicing": "memory",
}
"""Settings (and sections: ``eval`` is every ``eval.*`` field) that a resumed run may change without
``train.resume=force``, with why each leaves the training trajectory as it is. Every other field trains
differently when changed."""


def resumable(path: str) -> bool:
    """Whether the setting at dotted ``path`` may change on resume without force (:data:`RESUMABLE`, and each
    reward's ``timeout``: a stop limit, like ``train.max_nonfinite_steps``)."""
    parts = path.split(".")
    if len(parts) == 3 and parts[0] == "reward" and parts[2] == "timeout":
        return True
    return any(path == p or path.startswith(p + ".") for p in RESUMABLE)


# --- the lock ---------------------------------------------------------------------------------------------


class RunLock:
    """The exclusive lock of a run folder (:func:`lock_run_folder`); :meth:`release` it when the run ends.

    Attributes:
        path: the lock file.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Remove the lock file and unlock (idempotent)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:  # still ours (not replaced by hand)
                self.path.unlink()
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _holder(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process whose pid the lock file does not record"
    started = holder.get("started")
    since = f", since {started}" if started else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{since} ({holder.get('command', '?')})"


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def lock_run_folder(output_dir: Path) -> RunLock:
    """Take the lock of ``output_dir`` (created if missing) for this process.

    Raises:
        RunFolderError: another process holds it; the message names its pid and the fixes.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    collected = False
    for _ in range(10):  # a lock file removed by its holder between our open and our flock: open it again
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            locked = _flock(fd)
            previous = _holder(path)
            if locked is None:  # no flock on this file system: the recorded pid decides
                mine = previous.get("pid") == os.getpid()
                locked = not (previous and not mine and previous.get("host") == socket.gethostname()
                              and _alive(previous.get("pid")))
            if not locked and previous.get("pid") == os.getpid() and not collected:
                # held in this process: perhaps by a trainer nobody references any more (its finalizer releases)
                os.close(fd)
                gc.collect()
                collected = True
                continue
            if not locked and previous.get("pid") == os.getpid():
                raise RunFolderError(
                    f"output_dir={out} is in use by another run in this process (pid {os.getpid()}): a Trainer on it "
                    "is still open; let its train() finish or call its close(), or choose another output_dir"
                )
            if not locked:
                raise RunFolderError(
                    f"output_dir={out} is in use by another run: {_describe(previous)} holds {path}. Wait for that "
                    "run to end (or stop it), or choose another output_dir; if no run uses the folder (e.g. a "
                    "copy from another machine), delete the lock file"
                )
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                os.close(fd)
                continue
        except FileNotFoundError:
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if previous:
            if previous.get("host") != socket.gethostname():
                how = "on another host, not holding it"
            else:
                how = "no longer running" if not _alive(previous.get("pid")) else "running but not holding it"
            logger.warning("taking over the stale lock of %s: %s (%s, a run that ended without releasing it)",
                           out, _describe(previous), how)
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)})
        os.ftruncate(fd, 0)
        os.pwrite(fd, body.encode(), 0)
        os.fsync(fd)
        return RunLock(path, fd)
    raise RunFolderError(f"could not take the lock {path}: it kept being replaced; is another run starting on "
                         f"output_dir={out}?")


def _flock(fd: int) -> bool | None:
    """Try an exclusive, non-blocking flock: True taken, False held elsewhere, None not supported here."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


# --- resuming ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One setting that differs between a checkpoint's configuration and the new one.

    Attributes:
        path: the dotted setting, e.g. ``train.learning_rate``.
        old: the checkpoint's value (:data:`ABSENT` when it had none).
        new: the new value (:data:`ABSENT` when the new configuration has none).
    """

    path: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.path}: {_show(self.old)} -> {_show(self.new)}"


ABSENT = "(absent)"


def _show(value: Any) -> str:
    return value if value is ABSENT else json.dumps(value, default=str)


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _schema() -> tuple[dict[str, Any], set[str]]:
    """``(default value of every setting of RunConfig by dotted path, the paths that are sections)``."""
    defaults: dict[str, Any] = {}
    sections: set[str] = {""}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            path = f"{prefix}.{f.name}" if prefix else f.name
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                sections.add(path)
                walk(value, path)
            else:
                defaults[path] = value

    walk(RunConfig(), "")
    return defaults, sections


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Every setting that differs between configuration dicts ``old`` (a checkpoint's) and ``new``, dotted.

    A setting the old configuration lacks because it predates that setting counts as its default; a setting
    the new one lacks because it no longer exists is ignored; entries of free-form maps (``reward``,
    ``backbone.options``, ...) added or removed are changes.
    """
    defaults, sections = _schema()
    a, b = _flatten(old), _flatten(new)
    changes = []
    for path in sorted(set(a) | set(b)):
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        if path not in b and parent in sections and path not in defaults:
            continue  # a setting that no longer exists
        if path in a:
            before = a[path]
        else:  # a setting the checkpoint predates had its default; an entry of a map was absent
            before = defaults.get(path, ABSENT)
        after = b.get(path, ABSENT)
        if before != after:
            changes.append(Change(path, before, after))
    return changes


@dataclass(frozen=True)
class ResumeCheck:
    """What :func:`check_resume` found.

    Attributes:
        checkpoint: the checkpoint compared (the newest complete one), None for a fresh start.
        changes: the settings that differ, resumable ones included.
    """

    checkpoint: Path | None
    changes: list[Change]


def check_resume(cfg: RunConfig, saved: dict[str, Any] | None, checkpoint: Path) -> list[Change]:
    """The changes between ``saved`` (the configuration stored in ``checkpoint``) and ``cfg``.

    Raises:
        RunFolderError: a change outside :data:`RESUMABLE` without ``train.resume=force``, listing each
            changed field with its old and new value, and the fixes.
    """
    if saved is None:
        logger.warning("checkpoint %s records no configuration (written by an older alignkit): resuming without "
                       "comparing it", checkpoint)
        return []
    changes = config_changes(saved, to_dict(cfg))
    training = [c for c in changes if not resumable(c.path)]
    if training and cfg.train.resume != "force":
        lines = "\n".join(f"  - {c}" for c in training)
        free = ", ".join(RESUMABLE)
        raise RunFolderError(
            f"cannot resume output_dir={cfg.output_dir}: its checkpoint {checkpoint.name} was trained with another "
            f"configuration; {len(training)} setting{'s' * (len(training) > 1)} would change how it trains:\n{lines}\n"
            "Fixes: set output_dir to a new folder to start a separate run with these settings, or add "
            "train.resume=force to continue this run with them deliberately (the new optimizer settings are then "
            f"applied to the restored optimizer). These may change without force: {free}"
        )
    for c in training:
        logger.warning("train.resume=force: continuing %s with %s", checkpoint, c)
    for c in changes:
        if c not in training:
            logger.info("resuming %s with %s", checkpoint, c)
    return changes


def check_run_folder(cfg: RunConfig) -> ResumeCheck:
    """Check ``output_dir`` against ``train.resume`` before any model loads (read-only).

    Returns:
        the newest complete checkpoint (None when the run starts afresh) and the configuration changes.

    Raises:
        RunFolderError: ``train.resume=false`` on a folder with checkpoints; checkpoint folders but none complete;
            a configuration change that needs ``train.resume=force`` (:func:`check_resume`).
    """
    out = Path(cfg.output_dir)
    folders = checkpoint_folders(out)
    if cfg.train.resume is False:
        metrics = out / METRICS_FILE
        if folders or (metrics.is_file() and metrics.stat().st_size):
            held = f"checkpoints of an earlier run ({', '.join(p.name for p, _ in folders[-3:])})" if folders else \
                f"an earlier run's {METRICS_FILE}"
            raise RunFolderError(
                f"train.resume=false but output_dir={out} holds {held}; a new run never overwrites them. Choose "
                "another output_dir for the new run, or drop train.resume=false to continue that one"
            )
        return ResumeCheck(None, [])
    complete = [p for p, reason in folders if reason is None]
    if not complete:
        if folders:
            broken = "; ".join(f"{p}: {reason}" for p, reason in folders)
            raise RunFolderError(
                f"output_dir={out} holds no intact checkpoint to resume from ({broken}); starting again from epoch "
                "0 would discard that run. Delete the broken folders listed to start it afresh, or choose a new "
                "output_dir"
            )
        return ResumeCheck(None, [])
    newest = complete[-1]
    try:
        meta = json.loads((newest / "state.json").read_text())
    except (OSError, ValueError):  # a checkpoint whose state.json vanished or broke: opening it reports it
        return ResumeCheck(newest, [])
    return ResumeCheck(newest, check_resume(cfg, meta.get("config"), newest))
