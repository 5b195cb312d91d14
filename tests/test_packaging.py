"""The wheel a user installs: one top-level name, and everything resolving from the installed copy.

Builds the wheel with ``pip wheel`` (no build isolation: offline), installs it into a fresh virtualenv that
borrows this environment's dependencies through a ``.pth`` line, and runs a probe from a folder outside the
repository: entry points, recipes, shipped weights and the CLI must all come from that virtualenv.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration

PROBE = r"""
import json, importlib.util, sys
from pathlib import Path
import alignkit
from alignkit.compose import list_recipes, load_run_config, recipes_dir
from alignkit.modalities.diffusers_common import resolve_pretrained
from alignkit.registry import PROMPT_SOURCES, REWARDS, SAMPLERS, SHIPPED_MODELS
import inspect
out = {
    "alignkit": alignkit.__file__,
    "bare": {n: importlib.util.find_spec(n) is not None for n in ("modalities", "rewards", "recipes", "worlds")},
    "sd3": inspect.getfile(SAMPLERS.get("sd3")),
    "shapeeval": inspect.getfile(REWARDS.get("shapeeval")),
    "shapes_source": inspect.getfile(PROMPT_SOURCES.get("shapes")),
    "models": SHIPPED_MODELS.names(),
    "recipes": recipes_dir().as_posix(),
    "default_in_recipes": "default" in list_recipes(),
    "builtin_shapes": resolve_pretrained("builtin:shapes"),
    "builtin_arithmetic": resolve_pretrained("builtin:arithmetic"),
    "builtin_video": resolve_pretrained("builtin:shapes-video"),
    "builtin_tones": resolve_pretrained("builtin:tones"),
    "builtin_palette": resolve_pretrained("builtin:shapes-palette"),
    "toneeval": inspect.getfile(REWARDS.get("toneeval")),
    "backbone": load_run_config("default").backbone.name,
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    # built from a copy: setuptools writes alignkit.egg-info into the source folder, and a stale one in the
    # repository root would shadow the installed entry points of any process started there
    source = tmp_path_factory.mktemp("source") / "alignkit"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "venv", "outputs", "runs", "site", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(source)], check=True, capture_output=True, text=True)
    (path,) = dist.glob("alignkit-*.whl")
    return path


def test_the_wheel_holds_only_the_alignkit_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"alignkit"}, tops
    for needed in ("alignkit/recipes/default.yaml", "alignkit/recipes/backbone/shapes.yaml",
                   "alignkit/worlds/shapes/weights/transformer/diffusion_pytorch_model.safetensors",
                   "alignkit/worlds/moving_shapes/weights/model_index.json",
                   "alignkit/worlds/arithmetic/weights/model.safetensors",
                   "alignkit/worlds/tones/weights/vae/diffusion_pytorch_model.safetensors",
                   "alignkit/worlds/shapes/palette_weights/model.safetensors",
                   "alignkit/recipes/tones_tempflow_grpo.yaml",
                   "alignkit/modalities/image/sd3.py", "alignkit/rewards/compression.py"):
        assert needed in names, needed
    meta = next(n for n in names if n.endswith(".dist-info/top_level.txt") or n.endswith(".dist-info/RECORD"))
    assert meta
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "LICENSE missing from the wheel"


def test_the_installed_wheel_resolves_entry_points_recipes_and_weights_from_itself(wheel: Path, tmp_path: Path) -> None:
    env = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env)
    py = env / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    # the dependencies of this environment, without its (editable) alignkit: .pth path lines are added to
    # sys.path after the venv's own site-packages, and .pth files inside them are not run
    deps = [sysconfig.get_paths()["purelib"], *(p for p in sys.path if p.endswith("site-packages"))]
    (purelib / "_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, text=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    proc = subprocess.run([str(py), "-c", PROBE], cwd=work, capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    inside = str(purelib)
    assert out["alignkit"].startswith(inside)
    assert out["bare"] == {"modalities": False, "rewards": False, "recipes": False, "worlds": False}
    for key in ("sd3", "shapeeval", "shapes_source", "recipes", "builtin_shapes", "builtin_arithmetic",
                "builtin_video", "builtin_tones", "builtin_palette", "toneeval"):
        assert out[key].startswith(inside), (key, out[key])
    assert out["models"] == ["arithmetic", "shapes", "shapes-palette", "shapes-video", "tones"]
    assert out["default_in_recipes"] and out["backbone"] == "sd3"
    cli = subprocess.run([str(env / "bin" / "alignkit"), "list", "rewards"], cwd=work, capture_output=True,
                         text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "shapeeval" in cli.stdout
