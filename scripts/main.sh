#!/usr/bin/env bash
# Set up everything from scratch (scripts/setup.sh), then run the main job: the fused-vs-materialised MMD demo
# and a short GM-WAE training run on MNIST.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m gmwae_fast.demo --n 2048 --d 10
