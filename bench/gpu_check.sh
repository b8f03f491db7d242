#!/usr/bin/env bash
# The first run on a CUDA machine, in one command (see bench/gpu_check.py): GPU tests, Triton vs CUDA vs torch
# kernel timings, the calibration and 8B decode benchmarks, and a summary against the targets.
#   bash bench/gpu_check.sh            # on a GPU machine; fails loudly (exit 1) when there is no usable GPU
#   bash bench/gpu_check.sh --dry-run  # on a CPU machine: checks what it can, measures nothing
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m bench.gpu_check "$@"
