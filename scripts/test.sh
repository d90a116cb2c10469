#!/usr/bin/env bash
# Set up everything from scratch (scripts/setup.sh) and run the test suite. Without a GPU the Triton kernels run
# under the Triton interpreter (TRITON_INTERPRET=1) and the CUDA tests are skipped with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! .venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export TRITON_INTERPRET=1
fi
exec .venv/bin/python -m pytest tests -q -ra "$@"
