"""Errors that stop a run with a message saying what went wrong and how to fix it.

The CLI reports an :class:`AlignkitError` as one log line (exit status 2), without a traceback: the message
is the diagnosis. Configuration problems are :class:`alignkit.config.ConfigError` (a ``ValueError``).
"""

from __future__ import annotations


class AlignkitError(RuntimeError):
    """A run-time failure whose message names the cause and the fix."""


class RewardError(AlignkitError):
    """A reward raised while scoring; the message names the reward and its exception."""


class CheckpointError(AlignkitError):
    """A checkpoint could not be written or read; earlier checkpoints are left intact."""


class NonFiniteError(AlignkitError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient."""


class DistributedError(AlignkitError):
    """The run cannot be split over the launched processes as configured."""


class ModelLoadError(AlignkitError):
    """The backbone named by ``backbone.pretrained`` exists but cannot be loaded (incomplete or corrupt)."""


class RunFolderError(AlignkitError):
    """A run folder cannot be used as asked: another run holds it, or resuming it would not continue its run
    (a changed configuration, no intact checkpoint, ``train.resume=false`` on a folder with checkpoints); or a
    folder is not an alignkit run, or runs cannot be summarised or compared as asked."""


class MaskedError(AlignkitError):
    """Too many consecutive epochs had every sample masked (no reward could score any sample)."""


class Interrupted(AlignkitError):
    """The run stopped at a safe point after SIGINT / SIGTERM; its last checkpoint is intact.

    Attributes:
        signum: the signal received; ``exit_code`` is ``128 + signum`` (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Aborted(KeyboardInterrupt):
    """A second SIGINT / SIGTERM while the run was stopping: raised at once, wherever the run was (checkpoints
    are written atomically, so the last complete one is intact). ``signum``: the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
