#!/usr/bin/env bash
# Set up everything from scratch: a virtual environment in .venv with the pinned torch, the dev tools, and
# gmwae_fast built in place (C++ CPU kernels always; CUDA kernels when a CUDA toolkit is found).
# Idempotent: a second run reuses .venv and only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
PIP="$VPY -m pip --disable-pip-version-check -q"
# Pinned torch/torchvision for reproducible CI (a CUDA 13 build; it also runs on CPU). The package itself only
# requires torch>=2.4, so it installs over an existing torch.
$PIP install "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
$PIP install -r requirements-dev.txt 2>&1 | grep -v "^WARNING: Location" || true

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -n "${CUDA_HOME:-}" ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  export TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
$PIP install --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
$VPY - <<'PY'
import gmwae_fast, json
print("gmwae_fast build:", json.dumps({k: v for k, v in gmwae_fast.build_info().items()}, default=str))
PY
