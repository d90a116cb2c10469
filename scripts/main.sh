#!/usr/bin/env bash
# Set up everything from scratch (scripts/setup.sh), then run the main job: the fused-vs-materialised MMD demo and a
# short GM-WAE training run on MNIST with `--recipe robust` (prints the held-out clustering accuracy and where the
# figures are), then how the recorded 20-epoch runs compare with the paper. MNIST is read from $GMWAE_DATA
# (default ../shared/data, else downloaded by torchvision). Extra arguments go to the trainer (e.g. --steps 300).
#
# The training run uses a decoder of width 32 (`--dec-channels 32`; the paper's, and the trainer's default, is 128):
# 16x fewer decoder FLOPs. Without a visible NVIDIA GPU the CUDA kernels are not compiled (set
# GMWAE_FAST_SKIP_CUDA=0 to build them anyway); `bash scripts/test.sh` builds them later when a toolkit is there.
# It prints what it measured (the demo's table, the run's held-out accuracy and wall time); recorded results and
# how they were obtained are in docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${GMWAE_FAST_SKIP_CUDA:-}" ] && ! nvidia-smi -L > /dev/null 2>&1; then
  echo "main.sh: no NVIDIA GPU visible; building the CPU kernels only (GMWAE_FAST_SKIP_CUDA=0 builds CUDA too)"
  export GMWAE_FAST_SKIP_CUDA=1
fi
bash scripts/setup.sh
.venv/bin/python -m gmwae_fast.demo --n 2048 --d 10
DATA=${GMWAE_DATA:-../shared/data}
.venv/bin/python -m gmwae_fast.train --model gmwae --prior simplex --recipe robust --dec-channels 32 --steps 1000 \
  --seed 0 --eval-every 250 --no-kmeans --data-dir "$DATA" --out runs/main "$@"
echo "main.sh: done in ${SECONDS} s. The run's metrics: runs/main/summary.json; recorded runs and their protocol:" \
  "docs/results.md."
