"""Load a repository script that is not part of the package (``bench/*.py``, MkDocs hooks) as a module."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """The module at ``path`` (relative paths from the repository root), registered in ``sys.modules`` under
    ``name`` (the file's stem by default) the way MkDocs loads a hook: dataclasses resolve their module by name."""
    path = path if path.is_absolute() else REPO / path
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None, f"{path} is not a Python file"
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` as the module ``name``."""
    return load_script(Path("bench") / f"{name}.py")
