#!/usr/bin/env bash
# The GPU checks in one command, for a session lent a device machine (see /work/.library/device/README.md).
#
# The machine's Python (3.12, torch, accelerate, peft, transformers ...) lacks diffusers and hydra-core; they
# travel as wheels in .whl/ (git-ignored: add `/.whl/` to .git/info/exclude). Fetch them here once:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl diffusers==0.42.1 hydra-core==1.3.8 omegaconf==2.3.1 transformers==5.24.0 importlib_metadata
#   .venv/bin/pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3   # pure Python; published as sdist only
#
# then call the device tool's run with carry [".whl"], command `bash bench/device_check.sh`, timeout_s 540.
# It writes under $OUT: the SD3.5-Medium-shaped throughput figures (Flow-GRPO and TempFlow-GRPO, 512 px, 10
# steps, 24 samples per prompt, bf16) and the log of the GPU-marked tests.
set -uo pipefail
OUT=${OUT:-/tmp/alignkit_device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 ALIGNKIT_CACHE=/tmp/alignkit_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
timeout 420 python3 bench/gpu_throughput.py --out "$OUT/gpu_throughput_h200.json" 2>&1 | tee "$OUT/gpu_throughput.log"
timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.log"
