"""CPU thread settings chosen deliberately: how many intra-op threads, and how idle OpenMP threads wait.

**Why this module exists.** torch's CPU kernels run on an OpenMP team (GNU libgomp in the PyPI wheels). At the end
of every parallel region a team's threads wait for each other; by default libgomp lets a waiting thread *spin*
for about 300,000 iterations before it sleeps. The tiny models of alignkit's CPU worlds run many thousands of
short parallel regions per epoch, so a default team of two threads on two cores keeps both cores busy even in
the Python code between kernels (process CPU time is about twice the wall time). On an idle machine that costs
nothing. When other processes want the cores (a second run, a reward server, a build, a laptop's browser) the
spinning thread burns the time slices that the thread it waits for needs: the operating system cannot tell a
spin from work. Measured on 2 cores beside two single-threaded busy processes (``bench/contention.py``), the
default epoch took 5-10x its idle time and lost to a single thread.

**What alignkit does.** Before torch is imported, the ``alignkit`` command calls :func:`prepare_openmp`:

* if you set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` yourself, they are kept;
* otherwise it looks at how busy the CPUs it may use are (``/proc/stat`` over a short window, other processes
  only) and sets ``OMP_WAIT_POLICY=PASSIVE`` when others keep at least half a CPU busy (waiting threads sleep at
  once and give their core away), else ``GOMP_SPINCOUNT=1000`` (a short spin: as fast as the default when the
  machine is idle, and a thread whose partner was descheduled stops spinning within microseconds).

The choice only changes how threads wait, never a result. It must be made before libgomp is loaded, so a
program that imports torch itself and then builds a :class:`~alignkit.trainer.Trainer` keeps libgomp's default;
set the variables in its environment instead.

The intra-op thread count (:func:`configure_threads`) is ``train.cpu_threads`` when set, else ``OMP_NUM_THREADS``
when set, else the CPUs this process may use (its CPU affinity, capped by a cgroup CPU quota: containers, CI
runners), divided among the training processes on this machine. It does not shrink when other processes are busy:
beside two busy processes on 2 cores, two passive threads got the process half the machine and beat one thread,
and leaving out the busy CPUs (tried) made the default epoch 2.5x its idle time instead of about 2x
(bench/contention.py). The count is fixed by the machine and settings, never by the load, so a run repeats.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["ThreadSettings", "busy_cpus", "configure_threads", "prepare_openmp", "thread_settings", "usable_cpus"]

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
"""Environment variables that decide how idle OpenMP threads wait (read once, when libgomp loads)."""
CHOICE_VARIABLE = "ALIGNKIT_OPENMP_CHOICE"
"""Where :func:`prepare_openmp` leaves the reason for its choice, for the run's start line."""
BUSY_VARIABLE = "ALIGNKIT_CPUS_BUSY"
"""Where :func:`prepare_openmp` leaves the CPUs it saw busy with other processes (recorded, for the reader)."""
SHORT_SPIN = "1000"
BUSY_THRESHOLD = 0.5


def _cgroup_quota() -> float | None:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``); None when unlimited."""
    v2 = Path("/sys/fs/cgroup/cpu.max")
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
        if v1.is_file():
            quota_us = int(v1.read_text())
            period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
            return None if quota_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
    return None


def usable_cpus() -> tuple[int, str]:
    """How many CPUs this process may use: its affinity mask, capped by a cgroup quota; and how that was found."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None and math.ceil(quota) < affinity:
        return max(1, math.ceil(quota)), f"cgroup quota {quota:g} CPUs (affinity {affinity})"
    return affinity, f"CPU affinity {affinity}" + ("" if quota is None else f" (cgroup quota {quota:g})")


def _cpu_jiffies(cpus: set[int] | None) -> tuple[int, int]:
    """(busy, total) jiffies over ``cpus`` (all when None) from ``/proc/stat``."""
    busy = total = 0
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        values = [int(v) for v in fields[:8]]
        idle = values[3] + values[4]  # idle + iowait
        busy += sum(values) - idle
        total += sum(values)
    return busy, total


def busy_cpus(window: float = 0.25) -> float | None:
    """CPUs (of this process's affinity) kept busy by *other* processes over ``window`` seconds; None where
    ``/proc/stat`` cannot be read."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    try:
        b0, t0 = _cpu_jiffies(cpus)
        own0 = time.process_time()
        time.sleep(window)
        b1, t1 = _cpu_jiffies(cpus)
        own = time.process_time() - own0
    except (OSError, ValueError):
        return None
    n = len(cpus) if cpus else (os.cpu_count() or 1)
    if t1 <= t0:
        return None
    busy_fraction = (b1 - b0) / (t1 - t0)  # of all n CPUs
    return max(0.0, busy_fraction * n - own / window)


def prepare_openmp(environ: dict[str, str] | Any = os.environ, window: float = 0.25) -> str:
    """Choose how idle OpenMP threads wait, before torch (libgomp) is loaded; see the module docstring.

    Keeps a user's ``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT``. Returns the reason, also left in
    ``$ALIGNKIT_OPENMP_CHOICE`` for the run's start line.
    """
    if CHOICE_VARIABLE in environ:  # chosen by a parent alignkit process (accelerate launch, spawned workers)
        return environ[CHOICE_VARIABLE]
    set_by_user = [f"{k}={environ[k]}" for k in WAIT_VARIABLES if k in environ]
    if set_by_user:
        reason = f"{', '.join(set_by_user)} (yours)"
    else:
        busy = busy_cpus(window)
        if busy is not None:
            environ[BUSY_VARIABLE] = f"{busy:.2f}"
        if busy is not None and busy >= BUSY_THRESHOLD:
            environ["OMP_WAIT_POLICY"] = "PASSIVE"
            reason = (f"OMP_WAIT_POLICY=PASSIVE (other processes kept {busy:.1f} CPUs busy at start: idle threads "
                      "sleep instead of spinning)")
        else:
            environ["GOMP_SPINCOUNT"] = SHORT_SPIN
            seen = "unknown" if busy is None else f"{busy:.1f}"
            reason = f"GOMP_SPINCOUNT={SHORT_SPIN} (CPUs busy with other processes at start: {seen}; short spin)"
    environ[CHOICE_VARIABLE] = reason
    return reason


@dataclass(frozen=True)
class ThreadSettings:
    """The CPU thread settings of this process, read back from torch and the environment.

    Attributes:
        intra_op: ``torch.get_num_threads()``.
        inter_op: ``torch.get_num_interop_threads()``.
        source: where ``intra_op`` came from (``train.cpu_threads``, ``OMP_NUM_THREADS``, or the CPUs found).
        wait: how idle OpenMP threads wait (``OMP_WAIT_POLICY`` / ``GOMP_SPINCOUNT`` as set, or libgomp's default).
        usable_cpus: CPUs this process may use (affinity, cgroup quota).
    """

    intra_op: int
    inter_op: int
    source: str
    wait: str
    usable_cpus: int

    def describe(self) -> str:
        return (f"CPU threads {self.intra_op} ({self.source}; inter-op {self.inter_op}); OpenMP waiting: {self.wait}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_SOURCE = "torch default"


def _wait_description() -> str:
    choice = os.environ.get(CHOICE_VARIABLE)
    if choice:
        return choice
    found = [f"{k}={os.environ[k]}" for k in WAIT_VARIABLES if k in os.environ]
    return ", ".join(found) if found else "libgomp default (spin, then sleep)"


def thread_settings() -> ThreadSettings:
    """The settings in force now (read back, not assumed)."""
    import torch

    return ThreadSettings(intra_op=torch.get_num_threads(), inter_op=torch.get_num_interop_threads(),
                          source=_SOURCE, wait=_wait_description(), usable_cpus=usable_cpus()[0])


def configure_threads(requested: int = 0, local_processes: int = 1) -> ThreadSettings:
    """Set torch's intra-op thread count: ``requested`` (``train.cpu_threads``) when > 0, else ``$OMP_NUM_THREADS``
    when set, else the usable CPUs divided among ``local_processes`` training processes on this machine, unless the
    program already lowered torch's count itself (``torch.set_num_threads``), which is kept."""
    import torch

    global _SOURCE
    cpus, found = usable_cpus()
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if requested > 0:
        threads, _SOURCE = requested, f"train.cpu_threads={requested}"
    elif env.isdigit() and int(env) > 0:
        threads, _SOURCE = int(env), f"OMP_NUM_THREADS={env}"
    else:
        share = max(1, cpus // max(1, local_processes))
        current = torch.get_num_threads()
        if current < share:  # a program's own torch.set_num_threads (torch's default is never below the CPUs)
            threads, _SOURCE = current, f"torch.set_num_threads({current}) kept ({found})"
        else:
            threads = share
            _SOURCE = f"{found}" + (f" / {local_processes} processes" if local_processes > 1 else "")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return thread_settings()
