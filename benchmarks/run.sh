#!/usr/bin/env bash
# One command for a full benchmark run on this machine: the suite (pytest-benchmark, JSON output), then the report.
#
#   bash benchmarks/run.sh                       # small sweep on a CPU-only machine, full sweep on a GPU
#   bash benchmarks/run.sh --sweep full          # any extra argument goes to pytest (see benchmarks/README.md)
#
# Writes the raw pytest-benchmark JSON to .benchmarks/raw-<time>.json and the report to
# benchmarks/results/<device>.{json,md,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
fi
mkdir -p .benchmarks
RAW=".benchmarks/raw-$(date +%Y%m%d-%H%M%S).json"
set +e
"$PY" -m pytest benchmarks --benchmark-only --benchmark-json "$RAW" -rs --durations=15 -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exit codes: 0 all passed, 1 some failed (report what ran, then fail), others: nothing usable
if [ ! -s "$RAW" ]; then
    echo "run.sh: pytest exited $rc and wrote no benchmark JSON" >&2
    exit "$rc"
fi
"$PY" benchmarks/report.py "$RAW"
exit "$rc"
