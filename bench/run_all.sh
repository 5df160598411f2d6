#!/usr/bin/env bash
# Rerun every CPU benchmark and regenerate its results and docs:
#   1. the benchmark MoE, trained only if bench/.cache/models/qwen3moe-shakespeare is missing;
#   2. the quality table   -> bench/results/quality.json, docs/quality.md, docs/quality.png;
#   3. the compressor cost -> bench/results/compressor-cost.json, docs/compressor-cost.{md,png};
#   4. the CPU speed table -> bench/results/speed-cpu.json, docs/speed.{md,png}, with one
#      request profiled in-process first -> bench/results/decode-profile.json (shown in the docs);
#   5. one CAMERA-Q layer on the CPU kernels -> bench/results/cpu-kernel.{json,png}.
# Usage: bench/run_all.sh [quality] [cost] [speed] [kernel]   (no argument: all four, in that order)
# Roughly 2-3 hours on 2 busy cores (model training adds 20-35 minutes).  The GPU kernel
# benchmark is separate: bench/run_gpu_bench.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
MODEL=bench/.cache/models/qwen3moe-shakespeare

steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(quality cost speed kernel)
for s in "${steps[@]}"; do
  case "$s" in quality|cost|speed|kernel) ;; *) echo "run_all.sh: unknown step '$s' (quality, cost, speed, kernel)" >&2; exit 2;; esac
done

if [ ! -f "$MODEL/config.json" ]; then
  echo "== benchmark model missing: training it (bench/build_model.py)"
  "$PY" bench/build_model.py
fi

for s in "${steps[@]}"; do
  start=$(date +%s)
  case "$s" in
    quality) echo "== quality table"; "$PY" bench/quality.py ;;
    cost)    echo "== compressor cost"; "$PY" bench/compressor_cost.py ;;
    speed)   echo "== CPU speed table"
             "$PY" bench/speed_cpu.py --prepare-only && "$PY" bench/decode_profile.py && "$PY" bench/speed_cpu.py ;;
    kernel)  echo "== CAMERA-Q CPU kernel, one layer"; "$PY" bench/cpu_kernel_bench.py ;;
  esac
  echo "== $s done in $(( $(date +%s) - start )) s"
done
