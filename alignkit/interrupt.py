"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM.

The first signal asks the run to stop at its next safe point, between phases of the epoch loop (the trainer
checks :attr:`StopRequest.signum`); the run then writes a checkpoint if an epoch finished since the last one
and ends with :class:`alignkit.errors.Interrupted`. A second signal raises :class:`alignkit.errors.Aborted`
at once, wherever the run is: checkpoints are written atomically, so the last complete one stays intact.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from alignkit.errors import Aborted

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A context that installs SIGINT / SIGTERM handlers for its duration (main thread only: Python delivers
    signals there; elsewhere it installs nothing and :attr:`signum` stays None) and restores the previous ones.

    Attributes:
        signum: the first signal received, None while none has been.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            raise Aborted(signum)
        self.signum = signum
        logger.warning("%s received: stopping at the next safe point (send it again to abort at once)",
                       signal.Signals(signum).name)
