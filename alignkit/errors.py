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
    """A folder is not an alignkit run, or runs cannot be summarised or compared as asked."""
