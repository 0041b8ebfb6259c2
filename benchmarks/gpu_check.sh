#!/usr/bin/env bash
# The GPU check: correctness of every CUDA path, speed, sweeps and science in one run
# (benchmarks/gpu_check.py says what each stage does). From the repository root:
#   bash benchmarks/gpu_check.sh [--out DIR] [--budget 480] [--science S] [--data-dir DIR]
#   bash benchmarks/gpu_check.sh --smoke --out /tmp/check     # every stage, smallest size, CPU
# Output: DIR (default $OUT) holds summary.md, summary.json and gpu_check.tar.gz; the
# summary table is printed last. Exit code 1 if any check failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python3 benchmarks/gpu_check.py "$@"
