#!/usr/bin/env bash
# The real profile on a lent GPU machine (docs/real_profile.md): carry .whl (diffsynth, mlflow-skinny,
# mlflow-export-import: scripts/gpu_wheels.sh) and .real (decord in .real/whl: scripts/gpu_extra_wheels.sh;
# the mp4 clips: `python scripts/real_profile.py clips --root .real/motionx`), then run this from the repo root.
# Runs are recorded by MLflow in a local sqlite store and exported with mlflow-export-import into
# $OUT/real_runs.tar.gz (import here: `python -m lofa.device_runs import DIR`).
set -uo pipefail
OUT=${OUT:-/tmp/real_out}; WORK=${WORK:-/tmp/real}; mkdir -p "$OUT" "$WORK/track"
source scripts/device_env.sh .whl/*.whl .real/whl/*.whl
export LOFA_REGISTER_MODEL=0
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}  # fewer fragments beside the 1.3B DiT
export MLFLOW_TRACKING_URI=sqlite:///$WORK/track/mlflow.db LOFA_MLFLOW_ARTIFACTS=$WORK/track/artifacts
export LOFA_PIPELINE_ID=${LOFA_PIPELINE_ID:-real-$(date -u +%Y%m%dT%H%M%SZ)}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 scripts/real_profile.py run --root .real/motionx --work "$WORK" --out "$OUT" "$@" 2>&1 \
  | grep --line-buffered -v -e Warning -e warnings.warn | tee "$OUT/real.log" | grep --line-buffered -e '^\[real_profile\]' -e Error -e '^[a-z_0-9]* .* s ' 
rc=${PIPESTATUS[0]}
cp "$WORK/stages.log" "$OUT/" 2>/dev/null
rm -rf "$WORK/track/export"
python3 -m mlflow_export_import.experiment.export_experiment --experiment lofa --output-dir "$WORK/track/export" \
  > "$OUT/export.log" 2>&1 && tar -czf "$OUT/real_runs.tar.gz" -C "$WORK/track" \
  --exclude='*.gif' --exclude='*.mp4' --exclude='*.safetensors' export || echo "[device_real] export failed"
exit "$rc"
