"""The documentation: generated reference pages cover the code, the site builds strictly, and what the README and the
docs cite (paths, recipes, modules, scripts) exists."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from types import ModuleType

import pytest
from script_modules import load_script

from alignkit import registry
from alignkit.compose import CONFIG_GROUPS, list_recipes, recipes_dir
from alignkit.config import RunConfig
from alignkit.metrics import METRICS

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README_LIMIT = 10 * 1024


def _hook() -> ModuleType:
    """docs/hooks/reference.py, loaded the way MkDocs loads a hook (a module registered under its name)."""
    return load_script(DOCS / "hooks" / "reference.py", "alignkit_docs_reference")


@pytest.fixture(scope="module")
def pages() -> dict[str, str]:
    return _hook().pages()


def _config_fields() -> list[tuple[str, dataclasses.Field]]:
    out = []

    def walk(tp: type, path: str) -> None:
        hints = typing.get_type_hints(tp)
        for f in dataclasses.fields(tp):
            name = f"{path}.{f.name}" if path else f.name
            out.append((name, f))
            inner, args = hints[f.name], typing.get_args(hints[f.name])
            if dataclasses.is_dataclass(inner):
                walk(inner, name)
            elif typing.get_origin(inner) is dict and dataclasses.is_dataclass(args[1]):
                walk(args[1], f"{name}.<name>")

    walk(RunConfig, "")
    return out


def _one_line(text: str) -> str:
    return " ".join(text.split())


def test_reference_pages_are_generated_not_committed(pages: dict[str, str]) -> None:
    assert set(pages) == {"reference/recipes.md", "reference/config.md", "reference/registries.md",
                          "reference/metrics.md"}
    assert not (DOCS / "reference").exists(), "the reference pages are generated at build time; do not commit them"


def test_config_reference_lists_every_field_with_its_type_default_and_help(pages: dict[str, str]) -> None:
    page = pages["reference/config.md"]
    rows = {line.split(" | ")[0].strip("| `"): line for line in page.splitlines() if line.startswith("| `")}
    for name, f in _config_fields():
        assert name in rows, f"config field {name} missing from the reference"
        assert _one_line(f.metadata["help"]).replace("|", "\\|") in rows[name]
    assert "| `train.learning_rate` | `float` | `0.0003` |" in page
    assert "| `backbone.revision` | `str | None` | `None` |" in page
    assert "| `backbone.name` | `str` | required |" in page


def test_recipes_reference_lists_every_recipe_and_every_group_option_with_its_comment(pages: dict[str, str]) -> None:
    page = pages["reference/recipes.md"]
    root = recipes_dir()
    for name in list_recipes():
        assert f"| `{name}`" in page, f"recipe {name} missing"
    options = 0
    for group in CONFIG_GROUPS:
        for path in sorted((root / group).glob("*.yaml")):
            options += 1
            first = path.read_text().splitlines()[0]
            assert first.startswith("# "), f"{path} has no leading comment line saying what it is"
            row = next((line for line in page.splitlines() if line.startswith(f"| `{path.stem}` |")
                        and _one_line(first[2:]).replace("|", "\\|") in line), None)
            assert row is not None, f"{group}/{path.stem}: its first comment line is missing from the reference"
    assert page.count("\n| `") >= options + len(list_recipes())


def test_registries_reference_lists_every_registered_name(pages: dict[str, str]) -> None:
    page = pages["reference/registries.md"]
    for reg in (registry.SAMPLERS, registry.REWARDS, registry.EXPLORATION_PLANS, registry.STEP_KINDS,
                registry.CREDIT_ASSIGNERS, registry.PROMPT_SOURCES):
        for name in reg.names():
            assert f"| `{name}` |" in page, f"{reg.kind} {name} missing"
    from alignkit.modalities.diffusers_common import BUILTIN_PIPELINES

    for name in [*registry.SHIPPED_MODELS.names(), *BUILTIN_PIPELINES]:
        assert f"| `builtin:{name}` |" in page
    assert "tiny-sd3" in BUILTIN_PIPELINES and "shapes" in registry.SHIPPED_MODELS.names()


def test_metrics_reference_lists_the_catalogue(pages: dict[str, str]) -> None:
    page = pages["reference/metrics.md"]
    for pattern, meaning in METRICS.items():
        assert f"| `{pattern}` | {_one_line(meaning)} |" in page


@pytest.mark.integration
def test_the_site_builds_strictly_with_the_generated_pages(tmp_path: Path) -> None:
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)], cwd=REPO,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    config = (site / "reference" / "config" / "index.html").read_text()
    assert "train.learning_rate" in config and "AdamW learning rate." in config
    assert "reward/{name}_mean" in (site / "reference" / "metrics" / "index.html").read_text()
    assert (site / "results" / "files" / "discrete_sample_efficiency" / "summary.json").is_file()
    included = (site / "results" / "discrete" / "index.html").read_text()
    assert "tempflow_masked_fraction" in included  # bench/results/discrete_sample_efficiency/table.md, at build time
    assert (site / "assets" / "dataflow.svg").is_file()


# --- what the prose cites exists ------------------------------------------------------------------------------

READMES = [REPO / folder / "README.md" for folder in ("alignkit", "modalities", "rewards", "worlds", "recipes", "bench",
                                                     "tests")]
PROSE = [REPO / "README.md", *sorted(DOCS.rglob("*.md")), *READMES, *sorted((REPO / "recipes").rglob("*.yaml"))]
"""Everything whose text cites paths and commands: the READMEs, the docs pages and the recipes' comments."""
PATH = re.compile(r"(?<![\w./-])((?:alignkit|modalities|rewards|worlds|recipes|bench|tests|docs)/[\w./-]*)")
RECIPE = re.compile(r"alignkit (?:train|eval) ([a-z0-9_]+)(?![\w=])")
MODULE = re.compile(r"python3? -m (alignkit[\w.]*)")
SCRIPT = re.compile(r"python3? (bench/[\w./-]+\.py)")
LINK = re.compile(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)")


def _cited(pattern: re.Pattern[str]) -> list[tuple[str, str]]:
    out = []
    for doc in PROSE:
        for match in pattern.finditer(doc.read_text(encoding="utf-8")):
            out.append((doc.relative_to(REPO).as_posix(), match.group(1).rstrip(".,:;")))
    return out


def test_every_package_folder_has_a_readme() -> None:
    missing = [p.relative_to(REPO).as_posix() for p in READMES if not p.is_file()]
    assert not missing, f"package folders without a README.md: {missing}"


def test_the_readme_is_short_and_its_links_resolve() -> None:
    readme = REPO / "README.md"
    assert readme.stat().st_size <= README_LIMIT, f"README.md is {readme.stat().st_size} bytes; move detail to docs/"
    text = readme.read_text()
    for command in ('python3 -m venv .venv', '.venv/bin/pip install -e ".[dev]"', ".venv/bin/alignkit train\n",
                    ".venv/bin/pytest\n"):
        assert command in text
    links = [m.group(1) for m in LINK.finditer(text)]
    assert links and all((REPO / link).is_file() for link in links), [x for x in links if not (REPO / x).is_file()]


def test_cited_paths_exist() -> None:
    cited = _cited(PATH)
    assert len(cited) > 100
    missing = [(doc, path) for doc, path in cited if not (REPO / path).exists()]
    assert not missing, f"paths cited in the docs that do not exist: {missing}"


def test_cited_recipes_modules_and_scripts_exist() -> None:
    recipes = set(list_recipes())
    bad = [(doc, name) for doc, name in _cited(RECIPE) if name not in recipes]
    bad += [(doc, name) for doc, name in _cited(MODULE) if importlib.util.find_spec(name) is None]
    bad += [(doc, name) for doc, name in _cited(SCRIPT) if not (REPO / name).is_file()]
    assert not bad, f"cited but not found: {bad}"
