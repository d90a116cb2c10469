#!/usr/bin/env bash
# Set up everything from scratch: a virtual environment in .venv with the pinned torch, the dev tools, and
# gmwae_fast built in place (C++ CPU kernels always; CUDA kernels when a CUDA toolkit is found).
#
# Reruns are cheap: the packages are reinstalled only when the pins or requirements-dev.txt change (a stamp in
# .venv), and the extension is built with `setup.py build_ext --inplace` into the persistent build/ folder, so an
# unchanged tree recompiles nothing and a changed source recompiles that file only (ninja's dependency tracking).
# The editable install (`pip install -e .`) runs only when gmwae_fast is not yet installed in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
PIP="$VPY -m pip --disable-pip-version-check -q"
# pip's exit status survives the filter (pipefail); grep finding no line is not an error.
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }

# Pinned torch/torchvision for reproducible CI (a CUDA 13 build; it also runs on CPU). The package itself only
# requires torch>=2.11 (the oldest torch CI tests: scripts/compat.sh), so it installs over an existing torch.
PINS="torch==2.14.1 torchvision==0.29.1"
STAMP=.venv/.gmwae-fast-deps
WANT=$( (echo "$PINS"; cat requirements-dev.txt) | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
  # shellcheck disable=SC2086
  quiet $PIP install $PINS
  quiet $PIP install -r requirements-dev.txt
  echo "$WANT" > "$STAMP"
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -n "${CUDA_HOME:-}" ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  export TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# Build (or bring up to date) gmwae_fast/_C*.so in place; a no-op when nothing changed. The compiler lines go to
# build/build.log (GMWAE_FAST_VERBOSE=1 prints them); shown here: the build's summary line, warnings, and the log's
# tail when it fails.
mkdir -p build
if [ "${GMWAE_FAST_VERBOSE:-0}" = 1 ]; then
  quiet "$VPY" setup.py -q build_ext --inplace
elif ! "$VPY" setup.py -q build_ext --inplace > build/build.log 2>&1; then
  tail -n 40 build/build.log >&2
  echo "setup.sh: the build failed; the whole log is build/build.log" >&2
  exit 1
else
  grep -E "^gmwae_fast build:|^WARNING: gmwae_fast" build/build.log || true
fi
# Install (editable) only when .venv does not yet import gmwae_fast from this checkout at this version.
if ! (cd / && "$ROOT/$VPY" - "$ROOT" <<'PY'
import importlib.metadata, importlib.util, os, re, sys
root = sys.argv[1]
spec = importlib.util.find_spec("gmwae_fast")
want = re.search(r'__version__ = "([^"]+)"', open(os.path.join(root, "gmwae_fast", "_version.py")).read()).group(1)
here = os.path.realpath(os.path.join(root, "gmwae_fast"))
ok = spec is not None and os.path.realpath(os.path.dirname(spec.origin)) == here
sys.exit(0 if ok and importlib.metadata.version("gmwae_fast") == want else 1)
PY
); then
  quiet $PIP install --no-build-isolation --no-deps -e .
fi
$VPY - <<'PY'
import gmwae_fast, json
print("gmwae_fast build:", json.dumps({k: v for k, v in gmwae_fast.build_info().items()}, default=str))
PY
