#!/usr/bin/env bash
# Set up everything from scratch (scripts/setup.sh), then run the main job: the fused-vs-materialised MMD demo and a
# short GM-WAE training run on MNIST with `--recipe robust` (prints the held-out clustering accuracy and where the
# figures are), then how the recorded 20-epoch runs compare with the paper. MNIST is read from $GMWAE_DATA
# (default ../shared/data, else downloaded by torchvision). Extra arguments go to the trainer (e.g. --steps 300).
#
# The training run uses a decoder of width 32 (`--dec-channels 32`; the paper's, and the trainer's default, is 128):
# 16x fewer decoder FLOPs, and on MNIST it clusters faster (seed 0: 0.955 held-out accuracy after 1000 steps against
# 0.850 at width 128; docs/results.md); the whole script took 7 min 9 s on a fresh clone on a 2-core Intel Xeon VM
# without a GPU (2026-11-30). Without a visible NVIDIA GPU the CUDA kernels are not compiled (set
# GMWAE_FAST_SKIP_CUDA=0 to build them anyway); `bash scripts/test.sh` builds them later when a toolkit is there.
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
echo "Recorded 20-epoch runs (docs/results.md), held-out accuracy on seeds 0 / 1 / 2: the paper's objective" \
  "0.655 / 0.676 / 0.665 (the paper: just under 0.70; k-means on pixels 0.54); this recipe at width 32:" \
  "0.947 / 0.938 / 0.887; best of three starts at width 64 on a weight average with the reconstruction cost" \
  "doubled (--recipe robust-ema): 0.975 / 0.977 / 0.976, all 10 modes used (reconstruction L2 13.5 / 12.6 / 15.2" \
  "against 13.8-15.8 at width 128)."
