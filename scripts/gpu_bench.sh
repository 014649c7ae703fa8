#!/usr/bin/env bash
# GPU benchmark of sorajax, sized for a 10-minute run on one H100/H200 (scripts/gpu_bench.py
# says what it measures; docs/PERFORMANCE.md how to read it).
#
#   scripts/gpu_bench.sh [--out gpu_bench.json] [--sections matmul,attention,train,sampler]
#   scripts/gpu_bench.sh --dry-run [--out /tmp/gpu_dry.json]     # same code paths, CPU, seconds
#
# Needs a Python with sorajax's requirements and a CUDA build of jax (pip install "jax[cuda12]");
# PYTHON overrides the interpreter (default: .venv/bin/python, else python3). Prints the card
# name, writes the JSON after every section (a run cut short keeps what it measured) and exits
# 1 if any section failed (the others still ran).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
dry=0
for arg in "$@"; do [[ "$arg" == "--dry-run" ]] && dry=1; done
if [[ $dry == 1 ]]; then
  export JAX_PLATFORMS=cpu
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "nvidia-smi not found: is this a GPU machine?"
  # One process owns the card: let XLA take most of its memory up front (fewer allocator stalls),
  # and let cuDNN/cuBLAS autotune (level 4: the default).
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
fi
exec "$PY" scripts/gpu_bench.py "$@"
