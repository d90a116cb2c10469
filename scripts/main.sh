#!/usr/bin/env bash
# Set up everything from scratch (scripts/setup.sh), then run the main job: a short GM-WAE training run on MNIST
# (prints the held-out clustering accuracy and where the figures are), preceded by the fused-vs-materialised MMD
# demo. MNIST is read from $GMWAE_DATA (default ../shared/data, else downloaded by torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m gmwae_fast.demo --n 2048 --d 10
DATA=${GMWAE_DATA:-../shared/data}
.venv/bin/python -m gmwae_fast.train --model gmwae --prior simplex --data-dir "$DATA" --out runs/main "$@"
