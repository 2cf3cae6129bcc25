#!/usr/bin/env bash
# The hypernetwork benchmarks that track prediction and the stage-I step on a lent GPU machine
# (docs/performance.md), carrying .whl (diffsynth for the `predictor` section: scripts/gpu_wheels.sh):
#   bash scripts/device_bench.sh                      # ceiling, graph_predict, predictor, train1_compiled
#   ONLY=predict,train1 bash scripts/device_bench.sh  # other sections of benchmarks/bench_hypernet.py
#   WHEELS=".fa4/gpa/*.whl" ONLY=... bash scripts/device_bench.sh  # diffsynth's wheels from another folder
set -uo pipefail
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
source scripts/device_env.sh ${WHEELS:-.whl/*.whl}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
python3 benchmarks/bench_hypernet.py --repeats 10 --no-ckpt --only "${ONLY:-ceiling,graph_predict,predictor,train1_compiled}" \
  2>&1 | grep --line-buffered -v -e Warning -e warnings.warn | tee "$OUT/bench.log" | tail -30
