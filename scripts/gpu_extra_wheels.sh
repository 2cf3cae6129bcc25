#!/usr/bin/env bash
# Wheels for the two GPU runs besides the medium preset (docs/real_profile.md), as py3.12 wheels:
#   .real/whl/  decord (the real profile's video reader), carried with .real by scripts/device_real.sh
#               beside .whl (diffsynth + mlflow-skinny: scripts/gpu_wheels.sh);
#   .fa4/gpa, .fa4/gpb  flash-attn-4 and nvidia-cutlass-dsl (libs-base, libs-core, libs-cu12), with
#               diffsynth's wheels, in two halves of at most 64 MiB each (one device call carries one),
#               for scripts/device_fa4.sh. Both folders are in .gitignore, so a warm device machine keeps
#               the first half while the second travels.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=(.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     --abi cp312 --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64
     --platform any)
mkdir -p .real/whl .fa4/gpa .fa4/gpb
"${PIP[@]}" -d .real/whl decord==0.6.0
"${PIP[@]}" -d .fa4/gpa diffsynth==2.1.12 modelscope==1.40.2 modelscope-hub==0.5.1 ftfy==6.3.1 wcwidth==0.9.5 \
  einops==0.8.2 cryptography==51.0.1 cffi==2.1.1 pycparser==3.12
"${PIP[@]}" --pre -d .fa4/gpb flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5
tmp=$(mktemp -d)
"${PIP[@]}" -d "$tmp" nvidia-cutlass-dsl-libs-cu12==4.8.1
split -b 46000000 "$tmp"/nvidia_cutlass_dsl_libs_cu12-*.whl "$tmp/cu12.part."
mv "$tmp/cu12.part.aa" .fa4/gpa/ && mv "$tmp/cu12.part.ab" .fa4/gpb/ && rm -rf "$tmp"
for d in .fa4/gpa .fa4/gpb; do
  bytes=$(du -sb "$d" | cut -f1)
  echo "$d: $bytes bytes (a call carries at most 67108864 with the ~3.5 MB work tree)"
done
