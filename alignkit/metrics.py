"""A run's metrics: ``metrics.jsonl`` (always written) and accelerate's experiment trackers (``train.log_with``).

Every epoch's metrics are one JSON row of ``<output_dir>/metrics.jsonl`` (``step`` = the epoch) and, for each
tracker named in ``train.log_with`` (``tensorboard`` by default, ``wandb`` and the others accelerate knows,
each imported only when named), the same numeric values logged at that step through
``Accelerator.log``. TensorBoard event files go to ``<output_dir>/tensorboard/alignkit/``; a resumed run
supersedes the events of the epochs it trains again (TensorBoard's ``purge_step``), as it drops their
``metrics.jsonl`` rows.
"""

from __future__ import annotations

import json
import logging
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TRACKER_PROJECT = "alignkit"
"""The project name given to the trackers (TensorBoard's sub-folder of ``<output_dir>/tensorboard``)."""


class MetricsWriter:
    """Appends one JSON object per epoch to ``metrics.jsonl`` and logs its numbers to the accelerator's trackers.

    Args:
        directory: the run folder.
        accelerator: the run's ``Accelerator`` built with ``log_with`` and ``logging_dir=<directory>/tensorboard``
            (:func:`tracker_settings`), or None for ``metrics.jsonl`` only. Call on the main process.
        first_step: the first step this writer logs; tracker events of this step and later written by an
            earlier process are superseded (epochs about to be trained again).
        config: the run configuration, flattened to ``section.field`` keys, stored by the trackers as
            hyper-parameters.
    """

    def __init__(self, directory: Path, accelerator: Any | None = None, *, first_step: int = 0,
                 config: dict[str, Any] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / METRICS_FILE
        self._accelerator = accelerator if accelerator is not None and accelerator.log_with else None
        if self._accelerator is not None:
            self._accelerator.init_trackers(
                TRACKER_PROJECT, config=config,
                init_kwargs={"tensorboard": {"purge_step": first_step}, "wandb": {"name": directory.name}},
            )

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Append ``{"step": step, **metrics}`` to ``metrics.jsonl`` and log the numeric values (NaN included)
        at ``step`` to every tracker."""
        row = {"step": step, **metrics}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        if self._accelerator is not None:
            numeric = {k: float(v) for k, v in metrics.items()
                       if isinstance(v, numbers.Real) and not isinstance(v, bool)}
            self._accelerator.log(numeric, step=step)

    def close(self) -> None:
        """Finish the trackers (flush and close TensorBoard's writer, end a wandb run); the process group is
        left alone (``Accelerator.end_training`` would destroy it)."""
        if self._accelerator is not None:
            for tracker in self._accelerator.trackers:
                tracker.finish()
            self._accelerator.trackers.clear()
            self._accelerator = None


def tracker_settings(directory: Path, log_with: list[str]) -> dict[str, Any]:
    """Keyword arguments of ``Accelerator`` for the trackers ``log_with`` writing under ``directory``."""
    from accelerate.utils import ProjectConfiguration

    if not log_with:
        return {}
    project = ProjectConfiguration(project_dir=str(directory), logging_dir=str(directory / "tensorboard"))
    return {"log_with": list(log_with), "project_config": project}


def flat_config(data: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str | None]:
    """``data`` (nested dicts) as ``a.b.c`` keys with scalar values; lists and other values as their JSON text
    (what trackers accept as hyper-parameters)."""
    out: dict[str, bool | int | float | str | None] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = json.dumps(value, default=str)
    return out


@dataclass
class MetricsFile:
    """What ``metrics.jsonl`` holds.

    Attributes:
        rows: the parsed rows, in file order.
        torn: the last line when it is not a complete JSON row (a write cut short by a crash), else None.
    """

    rows: list[dict[str, Any]]
    torn: str | None = None


def load_metrics(path: Path) -> MetricsFile:
    """Parse ``metrics.jsonl``; an unreadable last line is returned as ``torn``.

    Raises:
        ValueError: a line before the last one is not JSON (the file was damaged or edited), naming it.
    """
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines) - 1:
                return MetricsFile(rows, torn=line)
            raise ValueError(f"{path} line {i + 1} is not a JSON row ({exc}); the file was damaged or edited: "
                             "repair or delete that line") from None
        rows.append(row)
    return MetricsFile(rows)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``, without a torn last line (a run writing it, or one that crashed mid-write).

    Raises:
        ValueError: a line before the last one is not JSON.
    """
    return load_metrics(path).rows
