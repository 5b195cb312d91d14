#!/usr/bin/env bash
# The GPU checks as one prepared command for a lent device machine (/work/.library/device/README.md), and the
# very same steps on CPU with the tiny model for the pre-flight (bench/gpu_preflight.py runs `--cpu`).
#
#   bash bench/device_check.sh --wheels                # the wheels to carry (the GPU image lacks these)
#   bash bench/device_check.sh --fetch-wheels [DIR]    # download / build them here into DIR (default .whl;
#                                                      # $PYTHON, default python3, runs pip)
#   bash bench/device_check.sh                         # on the GPU machine (see below)
#   bash bench/device_check.sh --cpu                   # the same steps on CPU: tiny model, GPU tests on CPU
#
# On the GPU machine: once, here, `echo /.whl/ >> .git/info/exclude` and `bash bench/device_check.sh
# --fetch-wheels`; then the device tool's run with carry [".whl"], timeout_s 480 and the command
#   ALIGNKIT_COMMIT=<git rev-parse HEAD> bash bench/device_check.sh
# (the tree arrives there without .git: the commit is passed in for the results' provenance).
#
# Steps (each is checked; the script exits non-zero when any failed):
#   1. .whl holds exactly the wheels listed below (the device image has no diffusers, hydra or open_clip, and its
#      huggingface_hub 1.33 rules out transformers >= 5.25);
#   2. they, then alignkit built from this tree (with the carried setuptools: no network, no build isolation),
#      install into $ALIGNKIT_SITE (default /tmp/site);
#   3. alignkit imports from there (not from the tree), its entry-point registries are filled and the
#      sd35_medium recipes compose; versions and the GPU go to env.txt;
#   4. the GPU-marked tests run: more than zero, none failed, none skipped;
#   5. bench/gpu_throughput.py (SD3.5-Medium shape; --tiny on CPU) with a deadline inside its timeout.
# Under $OUT (default /tmp/alignkit_device) it writes 7 files: summary.txt, env.txt, install.log,
# pytest_gpu.log, pytest_gpu.xml, gpu_throughput.log and gpu_throughput_<device>[_tiny].json.
# Time on one H100: at most TOTAL_BUDGET=400 s (under 7 min) in all: about 20 s to install, the tests (timeout 120 s),
# then the throughput in the time left; it stops starting timed epochs that would overrun (and says so). For a
# rerun in the same lease, a smaller TOTAL_BUDGET (e.g. 240) keeps time for it.
set -uo pipefail
SECONDS=0

WHEELS=(diffusers==0.42.1 transformers==5.24.0 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
        setuptools==84.2.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.5)
SDIST_ONLY=(antlr4-python3-runtime)  # published as source only: built into a wheel here (pure Python)

cd "$(dirname "$0")/.."
MODE=gpu
case "${1:-}" in
  --wheels) printf '%s\n' "${WHEELS[@]}"; exit 0 ;;
  --fetch-wheels)
    dir=${2:-.whl}; mkdir -p "$dir" || exit 1
    for spec in "${WHEELS[@]}"; do
      name=${spec%%==*}
      if [[ " ${SDIST_ONLY[*]} " == *" $name "* ]]; then
        "${PYTHON:-python3}" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" "$spec" || exit 1
      else
        "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
          -d "$dir" "$spec" || exit 1
      fi
    done
    ls "$dir"; exit 0 ;;
  --cpu) MODE=cpu ;;
  "") ;;
  *) echo "usage: bash bench/device_check.sh [--cpu | --wheels | --fetch-wheels [DIR]]" >&2; exit 2 ;;
esac

OUT=${OUT:-/tmp/alignkit_device}
SITE=${ALIGNKIT_SITE:-/tmp/site}
WHL=${ALIGNKIT_WHEELS:-.whl}
# the whole run ends within TOTAL_BUDGET seconds: the throughput gets what the steps before it left
if [[ $MODE == gpu ]]; then
  TOTAL_BUDGET=${TOTAL_BUDGET:-400}; TEST_TIMEOUT=${TEST_TIMEOUT:-120}; BENCH_ARGS=()
else
  TOTAL_BUDGET=${TOTAL_BUDGET:-600}; TEST_TIMEOUT=${TEST_TIMEOUT:-300}; BENCH_ARGS=(--tiny)
  export ALIGNKIT_GPU_TESTS_DEVICE=cpu  # the GPU-marked tests run on CPU (tests/conftest.py)
fi
mkdir -p "$OUT" || exit 1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export ALIGNKIT_CACHE=${ALIGNKIT_CACHE:-$SITE.cache}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0
note() { echo "[${SECONDS}s] $*" | tee -a "$SUMMARY"; }
fail() { note "FAIL: $*"; FAILED=1; }

# 1. the carried wheels, exactly one per listed name and version
missing=()
for spec in "${WHEELS[@]}"; do
  name=${spec%%==*}; version=${spec##*==}
  file_name=$(echo "$name" | tr 'A-Z-.' 'a-z__')
  found=$(ls "$WHL" 2>/dev/null | tr 'A-Z' 'a-z' | grep -c "^${file_name}-${version}-.*\.whl$")
  [[ $found == 1 ]] || missing+=("$spec (found $found)")
done
extra=$(ls "$WHL" 2>/dev/null | grep -c '\.whl$')
if (( ${#missing[@]} )) || (( extra != ${#WHEELS[@]} )); then
  fail "$WHL must hold exactly these ${#WHEELS[@]} wheels, has $extra; not found once: ${missing[*]:-none}." \
       "Fix: rm -rf $WHL && bash bench/device_check.sh --fetch-wheels, and carry [\"$WHL\"]"
  exit 1
fi
note "ok: $WHL holds the ${#WHEELS[@]} listed wheels"

# 2. install the wheels, then alignkit from this tree, into $SITE (no network, no build isolation)
{
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl &&
  PYTHONPATH="$SITE" python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
    --no-cache-dir --upgrade --target "$SITE" .
} > "$OUT/install.log" 2>&1
if (( $? )); then
  fail "install into $SITE (see install.log):"; tail -5 "$OUT/install.log" | tee -a "$SUMMARY"; exit 1
fi
note "ok: wheels and alignkit installed into $SITE"
export PYTHONPATH="$SITE"

# 3. the installed package, its registries and recipes, versions and device
{
  [[ $MODE == gpu ]] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -P - "$SITE" <<'EOF'
import importlib.metadata as md, platform, sys
from pathlib import Path
import torch
import alignkit
from alignkit.compose import load_run_config
from alignkit.registry import REWARDS, SAMPLERS

site = Path(sys.argv[1]).resolve()
where = Path(alignkit.__file__).resolve()
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("alignkit", "diffusers", "transformers", "accelerate", "peft", "hydra-core", "huggingface_hub",
             "tokenizers", "safetensors", "open_clip_torch", "setuptools", "numpy", "pytest"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "NOT INSTALLED")
print("alignkit imported from", where)
assert site in where.parents, f"alignkit imports from {where}, not from the installed {site}"
eps = md.distribution("alignkit").entry_points
print("entry points:", len(eps))
assert "sd3" in SAMPLERS.names() and "jpeg_compressibility" in REWARDS.names(), "entry-point registries are empty"
for recipe in ("sd35_medium_flow_grpo", "sd35_medium_tempflow_grpo"):
    load_run_config(recipe, [])
SAMPLERS.get("sd3"), REWARDS.get("jpeg_compressibility")
broken = []
for ep in eps:
    if ep.group.startswith("alignkit."):
        try:
            ep.load()
        except Exception as exc:  # reported, not fatal: optional extras the GPU check does not use
            broken.append(f"{ep.group}:{ep.name} ({type(exc).__name__}: {exc})")
print("entry points that do not load here:", "; ".join(broken) or "none")
EOF
} > "$OUT/env.txt" 2>&1
if (( $? )); then
  fail "installed alignkit (see env.txt):"; tail -3 "$OUT/env.txt" | tee -a "$SUMMARY"; exit 1
fi
note "ok: alignkit imports from $SITE with its registries; versions in env.txt"

# 4. the GPU-marked tests: some must run, none may fail or skip (a module skipped at collection counts when it
#    holds GPU-marked tests, e.g. test_preference_rewards.py without open_clip)
timeout "$TEST_TIMEOUT" python3 -P -m pytest -q -m gpu -p no:cacheprovider -rs --junitxml="$OUT/pytest_gpu.xml" \
  tests > "$OUT/pytest_gpu.log" 2>&1
code=$?
counts=$(python3 -P - "$OUT/pytest_gpu.xml" <<'EOF' 2>/dev/null
import ast, sys, xml.etree.ElementTree as ET
ran = failed = skipped = 0
lost = []
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    skip, bad = case.find("skipped"), case.find("failure") is not None or case.find("error") is not None
    if case.get("classname"):
        ran += skip is None and not bad
        skipped += skip is not None
        failed += bad
    elif skip is not None:  # a module skipped at collection
        path, _, reason = ast.literal_eval(skip.text)
        if "mark.gpu" in open(path).read():
            lost.append(f"{case.get('name')} ({reason})")
    else:
        failed += bad  # a collection error
print(ran, failed, skipped, len(lost), "; ".join(lost) or "-")
EOF
)
read -r ran failed skipped nlost lost <<< "${counts:-0 0 0 0 -}"
if (( code == 124 )); then fail "GPU-marked tests: timed out after $TEST_TIMEOUT s (pytest_gpu.log)"
elif (( code == 5 || ran + failed + skipped == 0 )); then fail "GPU-marked tests: none collected (pytest -m gpu, exit $code)"
elif (( code != 0 || failed > 0 )); then fail "GPU-marked tests: exit $code, $failed failed or errors (pytest_gpu.log)"
elif (( skipped > 0 )); then fail "GPU-marked tests: $skipped of $((ran + skipped)) skipped (pytest_gpu.log says why)"
elif (( nlost > 0 )); then fail "GPU-marked tests skipped with their module at collection: $lost"
else note "ok: $ran GPU-marked tests ran and passed ($MODE)"; fi

# 5. throughput in the time left (10 s kept for the end), with a deadline 25 s inside its timeout so that it
#    writes its results file before it would be stopped
bench_timeout=$(( TOTAL_BUDGET - SECONDS - 10 ))
(( bench_timeout >= 60 )) || bench_timeout=60
note "gpu_throughput.py: ${bench_timeout} s left of TOTAL_BUDGET=${TOTAL_BUDGET}"
timeout "$bench_timeout" python3 -P bench/gpu_throughput.py "${BENCH_ARGS[@]}" --out-dir "$OUT" \
  --deadline-s $((bench_timeout - 25)) > "$OUT/gpu_throughput.log" 2>&1
code=$?
if (( code )); then fail "gpu_throughput.py exit $code (gpu_throughput.log):"; tail -5 "$OUT/gpu_throughput.log" | tee -a "$SUMMARY"
else note "ok: gpu_throughput.py: $(cd "$OUT" && ls gpu_throughput_*.json)"; fi

files=$(find "$OUT" -type f | wc -l)
(( files <= 8 )) || fail "$files files under $OUT (at most 8 come back)"
note "$([[ $FAILED == 0 ]] && echo PASSED || echo FAILED) ($MODE): $files files under $OUT"
exit $FAILED
