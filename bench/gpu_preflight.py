"""Pre-flight of the GPU check, here on CPU: the GPU machine's environment rebuilt, and its own entry point run.

A lent GPU machine (``/work/.library/device/KINDS.md``) runs a Python with a fixed package set, receives the
working tree as plain files (tracked and untracked-not-ignored; no ``.git``, no build outputs) plus the carried
``.whl/``, and can fetch nothing. This script rebuilds that and runs ``bash bench/device_check.sh --cpu`` in it,
which takes the same steps as the GPU run (install, import checks, GPU-marked tests, ``gpu_throughput.py``) with
the tiny model on CPU:

1. a clean interpreter (``python -m venv --without-pip``) whose site-packages holds only the distributions the GPU
   image has (:data:`GPU_PACKAGES`), linked from this interpreter's site-packages;
2. the repository copied as plain files (``git ls-files --cached --others --exclude-standard``) with the wheels
   to carry: ``.whl/`` as it is here (what the device tool will carry), else the list of
   ``device_check.sh --wheels`` fetched once into a cache;
3. every carried wheel checked for a CPython 3.12 / x86-64 tag, and its requirements and alignkit's checked
   against the GPU image's packages (and versions where known);
4. ``device_check.sh --cpu`` in the copy, then its output folder checked as the device tool would return it.

What it cannot reproduce: the GPU image's versions (its torch is 2.11, its huggingface_hub 1.33; here this
interpreter's versions of the same packages are used) and its Python minor version, and CUDA itself.

    .venv/bin/python bench/gpu_preflight.py                  # CI runs this (.ci/run)
    .venv/bin/python bench/gpu_preflight.py --keep --results bench/results/gpu_throughput_cpu_tiny.json
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import zipfile
from collections import defaultdict
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.tags import compatible_tags, cpython_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

logger = logging.getLogger("bench.gpu_preflight")

REPO = Path(__file__).resolve().parents[1]

GPU_PACKAGES = frozenset(canonicalize_name(n) for n in """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())
"""The Python distributions of the GPU machines' image ('cuda'), as KINDS.md lists them (read 2026-11-17)."""

GPU_VERSIONS = {canonicalize_name(k): v for k, v in {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
    "sentencepiece": "0.2.2", "tokenizers": "0.23.2", "torch": "2.11.0", "torchaudio": "2.11.0",
    "torchvision": "0.26.0", "transformers": "5.17.0", "triton": "3.6.0", "onnxruntime": "1.30.0",
    "sentence-transformers": "6.0.1", "jaxtyping": "0.3.11",
}.items()}
"""Versions KINDS.md's ``pip list`` row reports for the image (2026-11); Python 3.12.3."""

UNUSED_REQUIREMENTS = {("diffusers", "importlib-metadata"): "diffusers imports it on Python < 3.8 only"}
"""Declared requirements the carried code never imports on the GPU image's Python (not carried)."""

GPU_PYTHON = "3.12.3"
TRAVEL_LIMIT_MIB = 64  # the device tool's limit on the working tree and carried paths together
GPU_PLATFORMS = ["manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64",
                 *(f"manylinux_2_{n}_x86_64" for n in range(5, 40))]


class PreflightError(RuntimeError):
    """A step of the pre-flight could not run (reported as one line, without a traceback)."""


def carried_tags() -> set:
    """Wheel tags a CPython 3.12 on x86-64 Linux installs."""
    platforms = GPU_PLATFORMS
    return {*cpython_tags((3, 12), abis=["cp312", "abi3", "none"], platforms=platforms),
            *compatible_tags((3, 12), interpreter="cp312", platforms=platforms)}


def check_requirements(wheels: list[Path], pyproject: Path) -> tuple[list[str], list[str]]:
    """Problems (a requirement the GPU image lacks or whose version it does not meet, a wheel that will not install
    on CPython 3.12 x86-64) and notes (requirements met by a package of unknown version there)."""
    import tomllib

    env = {**default_environment(), "python_version": "3.12", "python_full_version": GPU_PYTHON,
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "implementation_name": "cpython", "extra": ""}
    tags = carried_tags()
    carried: dict[str, Version] = {}
    requires: list[tuple[str, str, str]] = []  # (who, its distribution name, requirement)
    problems, notes = [], []
    for wheel in wheels:
        name, version, _, wheel_tags = parse_wheel_filename(wheel.name)
        carried[name] = version
        if not wheel_tags & tags:
            problems.append(f"{wheel.name}: no tag CPython 3.12 on x86-64 Linux installs")
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode().splitlines()
        requires += [(wheel.name, name, line.split(":", 1)[1].strip()) for line in lines
                     if line.startswith("Requires-Dist:")]
    project = tomllib.loads(pyproject.read_text())["project"]
    requires += [("alignkit", "alignkit", spec) for spec in project["dependencies"]]
    for who, dist, spec in requires:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if (dist, name) in UNUSED_REQUIREMENTS:
            notes.append(f"{who} requires {spec}: not carried, {UNUSED_REQUIREMENTS[dist, name]}")
            continue
        have = carried.get(name) or (Version(GPU_VERSIONS[name]) if name in GPU_VERSIONS else None)
        if have is not None:
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                where = "carried" if name in carried else "on the GPU image"
                problems.append(f"{who} requires {spec}; {where}: {name} {have}")
        elif name in GPU_PACKAGES:
            if req.specifier:
                notes.append(f"{who} requires {spec}: the GPU image has {name}, version not recorded")
        else:
            problems.append(f"{who} requires {spec}: not on the GPU image and not carried (add it to device_check.sh's "
                            "WHEELS)")
    return problems, notes


def installed() -> dict[str, importlib.metadata.Distribution]:
    """This interpreter's distributions by canonical name (the first on ``sys.path`` where one is shadowed)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name not in found:
            found[name] = dist
    return found


def gpu_set(dists: dict[str, importlib.metadata.Distribution]) -> tuple[set[str], dict[str, str]]:
    """The GPU image's distributions installed here, plus those their versions here need that the image lacks
    (e.g. huggingface_hub 2.x's httpx2, where the image's 1.33 uses httpx): ``(names, {added: needed by})``."""
    chosen = {n for n in dists if n in GPU_PACKAGES}
    added: dict[str, str] = {}
    todo = sorted(chosen)
    while todo:
        dist = dists[todo.pop()]
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            name = canonicalize_name(req.name)
            if name in dists and name not in chosen:
                chosen.add(name)
                added[name] = f"{dist.metadata['Name']} {dist.version}"
                todo.append(name)
    return chosen, added


def link_gpu_packages(site: Path, chosen: set[str]) -> None:
    """Link into ``site`` the files of this interpreter's distributions ``chosen``.

    Top-level entries that also belong to a distribution not chosen (namespace folders) are made real folders
    holding links to the chosen distributions' entries only.
    """
    wanted: dict[tuple[Path, str], set[str]] = defaultdict(set)  # (site dir, top) -> second-level entries
    unwanted: set[tuple[Path, str]] = set()
    for name, dist in installed().items():
        files = dist.files
        base = Path(dist.locate_file("")).resolve()
        if files is None:
            if name in chosen:
                raise RuntimeError(f"{name}: installed without a RECORD, its files cannot be linked")
            continue
        for f in files:
            parts = Path(f).parts
            if not parts or parts[0] == "..":
                continue  # scripts outside site-packages
            if name in chosen:
                wanted[(base, parts[0])].add(parts[1] if len(parts) > 2 else "")
            else:
                unwanted.add((base, parts[0]))
    for (base, top), children in wanted.items():
        source, target = base / top, site / top
        if not source.exists() or target.exists():
            continue
        if (base, top) in unwanted and source.is_dir():
            target.mkdir()
            for child in sorted(c for c in children if c):
                if (source / child).exists():
                    (target / child).symlink_to(source / child)
        else:
            target.symlink_to(source)


def copy_tree(dest: Path) -> int:
    """The repository as the device tool sends it: tracked and untracked-not-ignored files, no ``.git``."""
    done = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                          capture_output=True)
    if done.returncode:
        raise PreflightError(f"git ls-files in {REPO} failed ({done.stderr.decode().strip()}): the pre-flight copies "
                             "the tree as the device tool does, from a git checkout; run it in one")
    listed = done.stdout.decode().split("\0")
    count = 0
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file() or src.is_symlink():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel, follow_symlinks=False)
            count += 1
    return count


def wheels_to_carry(dest: Path) -> str:
    """``.whl/`` as here (what the device tool carries), else the listed wheels from a cache, into ``dest``."""
    here = REPO / ".whl"
    if dest.is_dir():
        return f"{here} (copied with the tree: untracked and not ignored, it travels without carry)"
    if here.is_dir():
        shutil.copytree(here, dest)
        return f"{here} (as the device tool will carry it)"
    listed = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--wheels"], check=True,
                            capture_output=True, text=True).stdout.split()
    key = hashlib.sha256(" ".join(listed).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "alignkit" / f"device-wheels-{key}"
    if not cache.is_dir():
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        logger.info("fetching the %d wheels to carry into %s", len(listed), cache)
        done = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--fetch-wheels", str(tmp)],
                              env={**os.environ, "PYTHON": sys.executable}, stdout=subprocess.DEVNULL)
        if done.returncode:
            shutil.rmtree(tmp, ignore_errors=True)
            raise PreflightError("device_check.sh --fetch-wheels failed (pip's message above): it needs the package "
                                 "index once; or put the wheels in .whl/ (device_check.sh --wheels lists them)")
        tmp.rename(cache)
    shutil.copytree(cache, dest)
    return f"{cache} (fetched once with device_check.sh --fetch-wheels; no .whl/ here)"


def check_out_folder(out: Path) -> list[str]:
    """What the device tool returns: at most 8 files, no deeper than out/a/b/file, plain names."""
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = [] if len(files) <= 8 else [f"{len(files)} files under $OUT; at most 8 come back"]
    for p in files:
        rel = p.relative_to(out)
        if len(rel.parts) > 3:
            problems.append(f"{rel}: deeper than $OUT/a/b/file")
        if not all(re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts):
            problems.append(f"{rel}: a name with characters other than letters, digits, '.', '_', '-'")
    return problems


def check_results(out: Path) -> list[str]:
    """The throughput results file exists and holds what the GPU run must report."""
    found = sorted(out.glob("gpu_throughput_*.json"))
    if len(found) != 1:
        return [f"expected one gpu_throughput_*.json under $OUT, found {[p.name for p in found]}"]
    r = json.loads(found[0].read_text())
    problems = []
    if r["provenance"]["commit"].startswith("unknown"):
        problems.append("results file without a commit")
    for algo in ("flow_grpo", "tempflow_grpo"):
        a = r["algos"].get(algo, {})
        if a.get("timed_epochs", 0) < 3:
            problems.append(f"{algo}: {a.get('timed_epochs', 0)} timed epochs ({a.get('stopped_early', '')})")
        if not a.get("flops", {}).get("attention_counted"):
            problems.append(f"{algo}: attention FLOPs not counted (closed-form check failed)")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (printed)")
    parser.add_argument("--results", type=Path, default=None, help="copy the tiny results JSON here")
    parser.add_argument("--verbose", action="store_true", help="list unchecked versions and linked extras")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="preflight: %(message)s")
    start = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="alignkit_preflight_"))
    problems: list[str] = []
    try:
        repo, out = tmp / "repo", tmp / "out"
        logger.info("copied %d files of the working tree into %s", copy_tree(repo), repo)
        if not (repo / "bench" / "device_check.sh").is_file():
            raise PreflightError("bench/device_check.sh is not in the copy: git must track it (git add)")
        logger.info("wheels to carry: %s", wheels_to_carry(repo / ".whl"))
        size = sum(p.stat().st_size for p in repo.rglob("*") if p.is_file())
        logger.info("what travels to the device: %.1f MiB of %d MiB", size / 2**20, TRAVEL_LIMIT_MIB)
        if size > TRAVEL_LIMIT_MIB * 2**20:
            problems.append(f"the tree and the wheels are {size / 2**20:.1f} MiB; the device tool sends at most "
                            f"{TRAVEL_LIMIT_MIB} MiB")
        req_problems, notes = check_requirements(sorted((repo / ".whl").glob("*.whl")), REPO / "pyproject.toml")
        for n in notes:
            logger.debug("unchecked: %s", n)
        logger.info("carried wheels: %d requirements met by a version the image has but KINDS.md does not record "
                    "(--verbose lists them)", len(notes))
        problems += req_problems

        venv = tmp / "venv"
        made = subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip",
                               str(venv)])
        if made.returncode:
            raise PreflightError(f"python -m venv --without-pip {venv} failed (exit {made.returncode})")
        site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
        chosen, added = gpu_set(installed())
        link_gpu_packages(site, chosen)
        absent = sorted(GPU_PACKAGES - chosen)
        logger.info("interpreter %s sees %d of the GPU image's %d distributions (%d are not installed here, so "
                    "not checked; --verbose lists them)", venv / "bin", len(chosen) - len(added), len(GPU_PACKAGES),
                    len(absent))
        logger.debug("not installed here: %s", ", ".join(absent))
        for name, by in sorted(added.items()):
            logger.debug("also linked: %s, needed by %s here (the GPU image's version may not need it)", name, by)

        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OUT=str(out),
                   ALIGNKIT_SITE=str(tmp / "site"), ALIGNKIT_CACHE=str(tmp / "cache"),
                   ALIGNKIT_COMMIT=commit + ("+uncommitted changes" if dirty else ""))
        logger.info("running bash bench/device_check.sh --cpu in the copy")
        done = subprocess.run(["bash", "bench/device_check.sh", "--cpu"], cwd=repo, env=env)
        if done.returncode:
            problems.append(f"device_check.sh --cpu exit {done.returncode} (summary above)")
        problems += check_out_folder(out)
        if done.returncode == 0:
            problems += check_results(out)
        if args.results is not None and (found := sorted(out.glob("gpu_throughput_*.json"))):
            args.results.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(found[0], args.results)
            logger.info("results copied to %s", args.results)
    except PreflightError as exc:
        problems.append(str(exc))
    finally:
        if args.keep:
            logger.info("kept %s", tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for p in problems:
        logger.error("FAIL: %s", p)
    logger.info("%s in %.0f s", "FAILED" if problems else "passed", time.monotonic() - start)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
