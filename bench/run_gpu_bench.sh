#!/usr/bin/env bash
# One command for the GPU kernel benchmark: CAMERA-Q mixes, CAMERA-P 50 % and shared experts vs
# bf16 (estimated 3-5 minutes on one H100 before the P and shared rows came; more now, unmeasured):
#   bash bench/run_gpu_bench.sh            # all shapes -> bench/results/gpu-kernels-<device>.json
#   bash bench/run_gpu_bench.sh --kinds p,shared --shapes Qwen2-57B-A14B   # a subset of the rows
#   bash bench/run_gpu_bench.sh --dry-run  # tiny shapes on CPU under TRITON_INTERPRET=1 (~20 s)
#   bash bench/run_gpu_bench.sh --tune --shapes Qwen3-30B-A3B   # writes kernels/configs/<device>.json
# Needs only python3 with torch and triton (>= 3.6); kernels/ is imported by path, so
# nothing from this repository has to be installed.  Extra arguments go to
# bench/gpu_kernels.py (--shapes, --tokens, --kinds, --iters, --no-graph, --out ...).
# Exit status 1: a correctness check failed, or a kernel call could not be captured in a
# CUDA graph (then the JSON has "error" and "complete": false).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# The GPU machine may get a copy of the tree without .git: pass GIT_COMMIT through then.
if [[ -z "${GIT_COMMIT:-}" ]]; then
  GIT_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
  if [[ "$GIT_COMMIT" != unknown ]] && ! git diff --quiet HEAD -- kernels bench 2>/dev/null; then
    GIT_COMMIT="${GIT_COMMIT}-dirty"
  fi
fi
export GIT_COMMIT
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available())'
exec "$PYTHON" bench/gpu_kernels.py "$@"
