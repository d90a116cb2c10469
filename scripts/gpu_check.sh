#!/usr/bin/env bash
# The whole GPU validation of gmwae_fast in one command, on a machine with an NVIDIA GPU and no network:
#
#   bash scripts/gpu_check.sh               # build, selftest, sanitizers, benchmarks, training slice, GPU tests
#   bash scripts/gpu_check.sh --dry-run     # list the steps, their time limits and the total; runs nothing
#   bash scripts/gpu_check.sh --steps selftest,bench     # only these steps (e.g. a rerun after a fix)
#
# Uses the system python (PYTHON, default python3) with what is installed there (torch, triton, nvcc, ninja,
# pytest, pytest-benchmark, matplotlib, compute-sanitizer); no pip, no venv, no install: the extension is built in
# place and the checkout is put on PYTHONPATH. Each step has its own time limit and the whole stays within
# GPU_CHECK_BUDGET_S (default 480 s, so that a 600 s remote call keeps ~2 minutes of margin): a step gets
# min(its limit, what is left - 15 s), and one with less than 20 s left is skipped. Steps, most informative first:
#
#   build      TORCH_CUDA_ARCH_LIST=9.0 FORCE_CUDA=1 MAX_JOBS=$(nproc) python3 setup.py build_ext --inplace
#   selftest   python3 -m gmwae_fast.selftest (every backend on cpu and cuda against the float64 reference), then
#              benchmarks/guard_cost.py (the first-use guard's one-time cost per GPU route; gmwae_fast/guard.py)
#   sanitizer  compute-sanitizer memcheck and racecheck over scripts/gpu_sanitize.py (every CUDA kernel once)
#   bench      benchmarks/run.sh on the key configurations: n = 4096 (d = 10, 64) and n = 65536 (d = 10),
#              fwd+bwd, fp32; fused cuda and triton against eager, torch.compile and KeOps (if installed);
#              GMWAE_FAST_CUDA_TENSOR_CORES=0 bash scripts/gpu_check.sh --steps bench: the same with the float
#              kernels kept off the tensor-core route (32 <= d <= 64), for an A/B of that route
#   train      200 GM-WAE steps at the paper's settings on the GPU (needs MNIST, see below)
#   tests      the device-parametrised op tests (-k "cuda or triton" over the op test files; the emulator,
#              planner, static-model and training tests compile or train on the CPU: CI runs them)
#
# MNIST for the train step: only the checkout reaches a remote GPU machine (../shared does not), so put the four
# .gz files (11 MB) in the git-ignored folder data/ of the checkout and name it in the remote call's carry list:
#
#   mkdir -p data/MNIST/raw && cp ../shared/mnist-gz/MNIST/raw/*.gz data/MNIST/raw/      # carry: ["data"]
#
# It is looked for in --data-dir DIR, $GMWAE_DATA, ./data, ./shared/data and ../shared/data (DIR/MNIST/raw, the
# files .gz or not); the step is skipped with a message when none holds it.
#
# Results go to $OUT (default ./gpu_check_out), each file written as its step completes, 8 files at most:
#   summary.txt (device, versions, each step's status and time, the selftest table, the guard cost), build.log,
#   selftest.json, sanitizer.log, bench.log (console + report), bench.json (raw pytest-benchmark JSON), train.log,
#   tests.log.
# Exit status: 0 when every step that ran passed, 1 when one failed or timed out, 2 when there is no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/gpu_check_out}
BUDGET=${GPU_CHECK_BUDGET_S:-480}
DATA_DIR=${GMWAE_DATA:-}
DRY=0

STEPS=(build selftest sanitizer bench train tests)
declare -A LIMIT=([build]=150 [selftest]=60 [sanitizer]=45 [bench]=70 [train]=30 [tests]=35)
MARGIN=15  # per step: the kill grace (5 s) and the step's own bookkeeping after its command
declare -A WHAT=(
  [build]="build gmwae_fast._C in place for sm_90 (FORCE_CUDA=1: a CUDA build failure fails the step)"
  [selftest]="python -m gmwae_fast.selftest --json, then benchmarks/guard_cost.py (first-use guard cost)"
  [sanitizer]="compute-sanitizer memcheck + racecheck of scripts/gpu_sanitize.py (every CUDA kernel, odd sizes)"
  [bench]="benchmarks/run.sh: n=4096 d=10,64 and n=65536 d=10, fwd+bwd fp32, fused vs eager/compile/KeOps"
  [train]="python -m gmwae_fast.train: 200 GM-WAE steps at the paper's settings on cuda (needs MNIST)"
  [tests]="pytest -k 'cuda or triton' over the op test files (device-parametrised tests only)"
)

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --data-dir) DATA_DIR=${2:?--data-dir needs a directory}; shift ;;
    --steps) IFS=, read -r -a STEPS <<< "${2:?--steps needs a comma-separated list}"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

find_data() {
  local d
  for d in "$DATA_DIR" "$ROOT/data" "$ROOT/shared/data" "$ROOT/../shared/data"; do
    if [ -n "$d" ] && [ -d "$d/MNIST/raw" ]; then echo "$d"; return 0; fi
  done
  return 1
}

for s in "${STEPS[@]}"; do
  [ -n "${LIMIT[$s]:-}" ] || { echo "gpu_check.sh: unknown step '$s' (steps: ${!LIMIT[*]})" >&2; exit 2; }
done

if [ "$DRY" = 1 ]; then
  echo "gpu_check.sh steps (total budget ${BUDGET} s; results under ${OUT}):"
  total=0
  for s in "${STEPS[@]}"; do
    printf '  %-10s <= %4s s  %s\n' "$s" "${LIMIT[$s]}" "${WHAT[$s]}"
    total=$((total + LIMIT[$s] + MARGIN))
  done
  fit="fits"; [ "$total" -le "$BUDGET" ] || fit="exceeds it: later steps are cut short or skipped"
  echo "  worst case: limits + ${MARGIN} s per step = ${total} s; the budget (${BUDGET} s) $fit"
  d=$(find_data 2>/dev/null) && echo "  MNIST for the train step: $d" || echo "  MNIST for the train step: not found" \
    "(see the header: data/MNIST/raw/*.gz, carry [\"data\"])"
  exit 0
fi

# ---- no GPU: stop at once ------------------------------------------------------------------------------------
GPU_REASON=$("$PY" - <<'PY' 2>&1
import torch
if not torch.cuda.is_available():
    print(f"torch {torch.__version__} sees no CUDA device (torch.version.cuda={torch.version.cuda})")
PY
) || GPU_REASON="python ($PY) could not import torch: $GPU_REASON"
if [ -n "$GPU_REASON" ]; then
  echo "gpu_check.sh: no GPU here: $GPU_REASON. This script validates the CUDA/Triton kernels on a GPU machine;" \
       "on a CPU use bash scripts/test.sh (or --dry-run to list the steps)." >&2
  exit 2
fi

mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
WORK=$(mktemp -d)  # scratch (training checkpoints, raw console output): never under $OUT
trap 'rm -rf "$WORK"' EXIT
START=$(date +%s)
FAILED=0
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export GMWAE_FAST_QUIET_EXT=1 PYTHONUNBUFFERED=1  # logs up to the last line even when a step is killed
unset TRITON_INTERPRET

versions() {
  local commit
  commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
  echo "gpu_check.sh  $(date -u '+%Y-%m-%d %H:%M:%S UTC')  host $(hostname)  commit $commit"
  echo "budget ${BUDGET} s, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
  echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 \
    | head -4)"
  echo "nvcc: $(nvcc --version 2>&1 | grep -i release || echo 'not found')"
  echo "compute-sanitizer: $(compute-sanitizer --version 2>&1 | grep -i version | head -1 || echo 'not found')"
  "$PY" - <<'PY' 2>&1
import platform, torch
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"not importable ({e})"
print(f"python {platform.python_version()}  torch {torch.__version__} (cuda {torch.version.cuda})  triton {tv}")
import os
print(f"device: {torch.cuda.get_device_name()}  capability {torch.cuda.get_device_capability()}  cpus {os.cpu_count()}")
PY
  echo
  printf '%-10s %-8s %7s  %s\n' step status seconds detail
}

# run_step NAME FUNCTION: runs FUNCTION with $T (seconds it may take) and $LOG set; records status and time.
run_step() {
  local name=$1 fn=$2 now left rc t0 status detail
  now=$(date +%s); left=$((START + BUDGET - now - MARGIN))
  T=${LIMIT[$name]}; [ "$left" -lt "$T" ] && T=$left
  if [ "$T" -lt 20 ]; then
    printf '%-10s %-8s %7s  %s\n' "$name" skipped 0 "no time left in the ${BUDGET} s budget" >> "$SUMMARY"
    return
  fi
  LOG=$OUT/$name.log
  echo "== $name (limit ${T} s): ${WHAT[$name]}" >&2
  t0=$(date +%s)
  DETAIL=""
  "$fn"; rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT; FAILED=1 ;;
    99) status=skipped ;;
    *) status="FAILED"; FAILED=1 ;;
  esac
  detail=${DETAIL:-"exit $rc"}
  printf '%-10s %-8s %7s  %s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$detail" >> "$SUMMARY"
  echo "== $name: $status ($detail)" >&2
}

# tmo SECONDS CMD...: the command under its own time limit (TERM, then KILL 10 s later)
tmo() { local s=$1; shift; timeout --kill-after=5 "$s" "$@"; }

step_build() {
  FORCE_CUDA=1 tmo "$T" "$PY" setup.py build_ext --inplace > "$LOG" 2>&1
  local rc=$?
  local cuda
  cuda=$(tmo 10 "$PY" -c "import gmwae_fast, json; print(json.dumps(gmwae_fast.build_info(), default=str)); \
print(gmwae_fast.available_backends('cuda')['cuda'] or 'usable')" 2>&1 | tee -a "$LOG" | tail -1)
  DETAIL="exit $rc; cuda backend: $cuda"
  return $rc
}

step_selftest() {
  local rc t0 left
  t0=$(date +%s)
  tmo "$((T - 15))" "$PY" -m gmwae_fast.selftest --json "$OUT/selftest.json" > "$WORK/selftest.txt" 2>&1; rc=$?
  DETAIL="exit $rc; $(grep -E '^(OK|FAILED):' "$WORK/selftest.txt" | tail -1)"
  left=$((T - ($(date +%s) - t0)))
  if [ "$left" -ge 5 ]; then
    { echo "---- first-use guard cost (benchmarks/guard_cost.py)"
      tmo "$left" "$PY" benchmarks/guard_cost.py 2>&1 | tail -6; } >> "$WORK/selftest.txt"
  fi
  return $rc
}

step_sanitizer() {
  if ! command -v compute-sanitizer > /dev/null; then DETAIL="compute-sanitizer not found"; return 1; fi
  local half=$((T / 2)) rc=0 r tool
  : > "$LOG"
  for tool in memcheck racecheck; do
    echo "---- compute-sanitizer --tool $tool" >> "$LOG"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 tmo "$half" compute-sanitizer --tool "$tool" --error-exitcode 3 \
      --leak-check no "$PY" scripts/gpu_sanitize.py >> "$LOG" 2>&1; r=$?
    echo "---- $tool exit $r" >> "$LOG"
    DETAIL="$DETAIL$tool exit $r; "
    [ "$r" -ne 0 ] && rc=$r
  done
  DETAIL="$DETAIL$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOG" | tr '\n' ' ')"
  return $rc
}

step_bench() {
  local rc raw md
  touch "$WORK/bench.start"
  tmo "$T" env PYTHON="$PY" bash benchmarks/run.sh --sweep full --bench-device cuda --bench-dtypes fp32 \
    --bench-n 4096,65536 --bench-d 10,64 --bench-time 0.3 --bench-max-rounds 50 --bench-max-call-s 2 \
    --bench-providers fused_cuda,fused_triton,per_bandwidth,vectorised,compiled,keops \
    -k "fwd+bwd and not n65536-d64" > "$LOG" 2>&1; rc=$?
  raw=$(find .benchmarks -name 'raw-*.json' -newer "$WORK/bench.start" 2>/dev/null | head -1)
  [ -n "$raw" ] && cp "$raw" "$OUT/bench.json"
  md=$(find benchmarks/results -name '*.md' -newer "$WORK/bench.start" 2>/dev/null | head -1)
  [ -n "$md" ] && { echo; echo "---- report $md"; cat "$md"; } >> "$LOG"
  DETAIL="exit $rc; $(grep -E '[0-9]+ (passed|failed|skipped)' "$LOG" | tail -1)"
  return $rc
}

step_train() {
  local data rc
  if ! data=$(find_data); then
    DETAIL="no MNIST (looked in --data-dir/\$GMWAE_DATA, ./data, ./shared/data, ../shared/data for MNIST/raw)"
    echo "$DETAIL" > "$LOG"
    return 99
  fi
  tmo "$T" "$PY" -m gmwae_fast.train --model gmwae --data-dir "$data" --no-download --steps 200 --device cuda \
    --out "$WORK/train" --eval-every 200 --test-subset 2000 --no-kmeans --no-figures --no-progress \
    > "$LOG" 2>&1; rc=$?
  DETAIL="exit $rc; $(grep -oE '[0-9.]+ s/step' "$LOG" | tail -1)"
  [ -f "$WORK/train/summary.json" ] && { echo "---- summary.json"; cat "$WORK/train/summary.json"; } >> "$LOG"
  return $rc
}

# The op tests parametrised over devices and backends (their cuda/triton cases are what a GPU adds to CI).
GPU_TEST_FILES=(tests/test_mmd.py tests/test_mmd_api.py tests/test_backends.py tests/test_triton_kernels.py
  tests/test_gm_reparam.py tests/test_mmd_hostile.py tests/test_guard.py)

step_tests() {
  local rc
  tmo "$T" "$PY" -m pytest "${GPU_TEST_FILES[@]}" -q -x -k "cuda or triton" -p no:cacheprovider --durations=15 \
    -rfE > "$LOG" 2>&1; rc=$?
  DETAIL="exit $rc; $(grep -E '[0-9]+ (passed|failed)' "$LOG" | tail -1)"
  return $rc
}

versions > "$SUMMARY"
for s in "${STEPS[@]}"; do
  run_step "$s" "step_$s"
  if [ -f "$WORK/selftest.txt" ]; then  # the selftest table goes into the summary, under its step line
    { echo "---- selftest output"; cat "$WORK/selftest.txt"; echo "----"; } >> "$SUMMARY"; rm -f "$WORK/selftest.txt"
  fi
done
echo >> "$SUMMARY"
VERDICT="ALL STEPS THAT RAN PASSED"; [ "$FAILED" = 0 ] || VERDICT="SOME STEPS FAILED"
echo "total $(( $(date +%s) - START )) s; $VERDICT" >> "$SUMMARY"
cat "$SUMMARY"
exit $FAILED
