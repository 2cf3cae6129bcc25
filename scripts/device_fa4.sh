#!/usr/bin/env bash
# FlashAttention 4 against SDPA (cuDNN) and the conventional baseline on a lent GPU machine
# (docs/real_profile.md "FlashAttention 4"). The wheels travel in two calls (64 MiB a call):
#   call 1 carries .fa4/gpa (diffsynth's wheels + the first half of nvidia-cutlass-dsl-libs-cu12),
#   call 2 carries .fa4/gpb (its second half, flash-attn-4, nvidia-cutlass-dsl{,-libs-base,-libs-core},
#   apache-tvm-ffi, torch-c-dlpack-ext, quack-kernels) and runs this script.
# The cutlass-dsl wheels share the directory nvidia_cutlass_dsl/, which `pip --target` would overwrite
# wheel by wheel: they are unzipped into the target instead, and the path their .pth adds is set by hand.
set -uo pipefail
OUT=${OUT:-/tmp/fa4_out}; mkdir -p "$OUT"
cat .fa4/gpa/cu12.part.aa .fa4/gpb/cu12.part.ab > /tmp/nvidia_cutlass_dsl_libs_cu12-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl
source scripts/device_env.sh .fa4/gpa/*.whl
for w in .fa4/gpb/*.whl /tmp/nvidia_cutlass_dsl_libs_cu12-*.whl; do python3 -m zipfile -e "$w" /tmp/site || exit 1; done
export PYTHONPATH=$PYTHONPATH:/tmp/site/nvidia_cutlass_dsl/dsl_packages
python3 -c "import flash_attn.cute.interface; print('flash-attn-4 imports')" || exit 1
[ -n "${BREAKDOWN:-}" ] && python3 benchmarks/fit_breakdown.py --attention fa4,sdpa 2>&1 \
  | grep --line-buffered -v -e Warning -e warnings.warn | tee "$OUT/breakdown.log" | tail -60
python3 benchmarks/bench_fit.py --resolutions "${RESOLUTIONS:-81x480x832,17x256x256}" --budget-s "${BUDGET_S:-150}" 2>&1 \
  | tee "$OUT/bench.log" | tail -30
