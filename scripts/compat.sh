#!/usr/bin/env bash
# Compatibility leg of CI: the GPU machine's software (Python 3.12, torch 2.11.0 = the oldest torch the package
# declares, triton 3.6.0, numpy < 2.4) in gpu_check's setting: the checkout built in place
# (FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 setup.py build_ext --inplace), PYTHONPATH = the tree, no install.
# Runs, on the CPU: python -m gmwae_fast.selftest --quick (cpu, reference and the interpreted triton), the op tests
# (values, gradients incl. weights, opcheck, torch.compile, the guard) and the Triton spill check for sm_90 under
# triton 3.6 (tests/test_triton_aot.py).
#
#   bash scripts/compat.sh            # what .ci/run runs after the main suite
#
# The venv lives outside the checkout (GMWAE_COMPAT_VENV, default ~/.cache/gmwae_fast/venv-torch2.11-py3.12) and is
# reused by later runs on the same machine (a stamp holds its pins); the tree is copied to a cache folder beside it
# with only changed files rewritten, so ninja recompiles only what changed. Both are built from nothing when absent.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd -P)
PINS="torch==2.11.0 triton==3.6.0 numpy<2.4 setuptools>=70.1,<82 ninja pytest hypothesis"
CACHE=${GMWAE_COMPAT_CACHE:-$HOME/.cache/gmwae_fast}
VENV=${GMWAE_COMPAT_VENV:-$CACHE/venv-torch2.11-py3.12}
TREE=$CACHE/tree-torch2.11-py3.12
log() { echo "compat: $*"; }

find_py312() {
  local p
  for p in "${PYTHON312:-}" "$(command -v python3.12 2>/dev/null || true)" \
           "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12; do
    if [ -n "$p" ] && [ -x "$p" ] && "$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
      echo "$p"; return 0
    fi
  done
  return 1
}

t0=$(date +%s)
if [ "$(cat "$VENV/.pins" 2>/dev/null || true)" != "$PINS" ]; then
  PY312=$(find_py312) || { echo "compat: no Python 3.12 found (set PYTHON312)" >&2; exit 1; }
  log "creating $VENV with $PY312 ($PINS)"
  rm -rf "$VENV"
  "$PY312" -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip --disable-pip-version-check -q install $PINS 2>&1 | { grep -v "^WARNING: Location" || true; }
  echo "$PINS" > "$VENV/.pins"
fi
VPY=$VENV/bin/python
log "$("$VPY" -c 'import platform, torch, triton, numpy; print("python", platform.python_version(), "torch",
  torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)')"

# The tracked files of this checkout (committed or not) in the cache tree; unchanged files keep their mtimes.
mkdir -p "$TREE"
git ls-files -z | "$VPY" -c '
import filecmp, os, shutil, sys
root, tree = sys.argv[1], sys.argv[2]
names = [n for n in sys.stdin.read().split("\0") if n and os.path.isfile(os.path.join(root, n))]
for n in names:
    src, dst = os.path.join(root, n), os.path.join(tree, n)
    if not (os.path.isfile(dst) and filecmp.cmp(src, dst, shallow=False)):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy2(src, dst)
' "$ROOT" "$TREE"

cd "$TREE"
export PYTHONPATH=$TREE MAX_JOBS=${MAX_JOBS:-$(nproc)}
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda
if [ -n "${CUDA_HOME:-}" ]; then
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0  # exactly gpu_check.sh's build
else
  log "no CUDA toolkit: building the CPU kernels only"
fi
log "build (in place, as gpu_check.sh)"
"$VPY" setup.py -q build_ext --inplace 2>&1 | { grep -E "error|Error|warning: |^CUDA|^C\+\+" || true; }
(cd / && "$VPY" -c "import gmwae_fast, json, sys; i = gmwae_fast.build_info(); print('compat: build_info', json.dumps(i));
sys.exit(0 if i['cpu_compiled'] and i['extension_error'] is None else 1)")
log "build done in $(( $(date +%s) - t0 )) s"

export TRITON_INTERPRET=1
(cd / && "$VPY" -m gmwae_fast.selftest --quick)
"$VPY" -m pytest -q -p no:cacheprovider tests/test_mmd.py tests/test_mmd_api.py tests/test_mmd_hostile.py \
  tests/test_backends.py tests/test_gm_reparam.py tests/test_guard.py tests/test_install.py::test_source_tree_runs_without_install \
  tests/test_triton_aot.py
log "done in $(( $(date +%s) - t0 )) s"
