"""Backbone adapters per modality, and what they share."""

from __future__ import annotations

from pathlib import Path


def shipped_folder(folder: Path, marker: str, what: str, command: str) -> Path:
    """A pretrained model folder shipped inside the package, checked for its ``marker`` file.

    Raises:
        FileNotFoundError: naming ``what`` is missing and the pretraining ``command`` that rebuilds it.
    """
    if not (folder / marker).is_file():
        raise FileNotFoundError(f"the {what} is missing from {folder}; rebuild it with `{command}`")
    return folder
