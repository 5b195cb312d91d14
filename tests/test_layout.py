"""The house rules of the tree, checked on the source: which package may import which.

    alignkit (core)  imports no backbone, reward or world
    modalities       backbones: import the core only (never a reward or a world)
    rewards          reward plug-ins: import the core only (never a backbone or a world)
    worlds           on top: may import the core, backbones and rewards; nothing imports a world
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# repository folder -> its installed name (pyproject's package-dir mapping)
FOLDERS = {"alignkit": "alignkit", "modalities": "alignkit.modalities", "rewards": "alignkit.rewards",
           "worlds": "alignkit.worlds"}
FORBIDDEN = {
    "alignkit": ("alignkit.modalities", "alignkit.rewards", "alignkit.worlds"),
    "modalities": ("alignkit.rewards", "alignkit.worlds"),
    "rewards": ("alignkit.modalities", "alignkit.worlds"),
    "worlds": (),
}


def _imports(path: Path) -> list[tuple[int, str]]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append((node.lineno, node.module))
            names += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return names


def _is_under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


@pytest.mark.parametrize("folder", sorted(FOLDERS))
def test_packages_import_only_what_the_layout_allows(folder: str) -> None:
    bad = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for line, name in _imports(path):
            if any(_is_under(name, f) for f in FORBIDDEN[folder]):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_code_imports_the_repository_folders_by_their_bare_names() -> None:
    """Installed, the folders exist only as ``alignkit.<folder>``: a bare ``import modalities`` would work in
    the repository and fail (or import another distribution) once installed."""
    bare = ("modalities", "rewards", "recipes", "worlds")
    bad = []
    for folder in (*FOLDERS, "tests", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for line, name in _imports(path):
                if name.split(".")[0] in bare:
                    bad.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not bad, "\n".join(bad)


def test_pyproject_lists_every_package_folder() -> None:
    """Each folder with an ``__init__.py`` under a mapped folder is listed in ``[tool.setuptools] packages``
    (an unlisted one would be missing from the wheel)."""
    import tomllib

    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = cfg["package-dir"]
    assert mapping == {installed: folder for folder, installed in {**FOLDERS, "recipes": "alignkit.recipes"}.items()}
    expected = set()
    for installed, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            expected.add(".".join([installed, *rel.parts]))
    assert set(cfg["packages"]) == expected
