#!/usr/bin/env bash
# On the lent GPU machine, after the pip line of README "Medium preset on a GPU machine": unpack
# .medium/bundle.tar.xz (scripts/medium_bundle.sh) into data_medium/ (its float16 text embeddings cast
# back to float32: scripts/medium_text16.py), run the six GPU stages of
# dvc.yaml in its order with --params params-medium.yaml, print each stage's wall time, and leave ONE
# archive, $OUT/medium_results.tar.gz (< 16 MiB), also when a stage fails. The stages log to MLflow
# itself (mlflow-skinny from .whl/: scripts/gpu_wheels.sh) in a local sqlite store, tracking/mlflow.db;
# mlflow-export-import exports its runs into tracking/export/ of the archive (here:
# `python -m lofa.device_runs import DIR`). No model is registered there (LOFA_REGISTER_MODEL=0).
#
#   LOFA_MEDIUM_BUDGET_S  seconds for this whole script (default 540): a stage still running when
#                         they run out is stopped, so the archive is written inside the call's limit
#   LOFA_MEDIUM_FROM      a stage name: the stages before it are not run (a second call on the same
#                         warm machine, whose first call finished them; their outputs must be there);
#                         auto: from the first stage that no earlier call here finished with exit 0
#                         (their timings are kept as logs/timings-call<N>.tsv; none: from the start)
#   LOFA_MEDIUM_SMOKE=1   tiny params and a tiny bundle, on CPU here (tests/test_medium.py)
# After evaluate, scripts/medium_refine.py (logged as stage "refine"): the medium bar's refine check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
source scripts/medium_common.sh
: "${OUT:?set OUT to the folder that receives medium_results.tar.gz}"
deadline=$(( $(date +%s) + ${LOFA_MEDIUM_BUDGET_S:-540} ))
RESERVE_S=40                    # kept back for the export of the runs and the archive
ARCHIVE_MAX=16000000            # bytes; files come back from the device at 16 MiB each at most
WEIGHTS_MAX=4194304             # stage-II weights travel back only when this small
D=$MEDIUM_DIR
P=$D/preprocessed

mkdir -p "$D"
if command -v xz >/dev/null; then
  tar -C "$D" -xJf "$MEDIUM_BUNDLE"
else
  "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='data')" "$MEDIUM_BUNDLE" "$D"
fi
"$PY" scripts/medium_text16.py unpack "$P"  # the bundle's float16 text embeddings back to float32 files
PARAMS=$(medium_params)
mkdir -p "$D/logs" "$D/metrics"
if [ -f "$D/logs/timings.tsv" ]; then  # an earlier call on this machine: keep its timings
  n=1
  while [ -e "$D/logs/timings-call$n.tsv" ]; do n=$(( n + 1 )); done
  mv "$D/logs/timings.tsv" "$D/logs/timings-call$n.tsv"
fi
STAGES="pretrain_base fit_loras train_stage1 train_stage2 train_stage2_naive train_judge evaluate refine"
FROM=${LOFA_MEDIUM_FROM:-}
if [ "$FROM" = auto ]; then
  FROM=
  for s in $STAGES; do
    if ! cat "$D"/logs/timings-call*.tsv 2>/dev/null | awk -F'\t' -v s="$s" '$1 == s && $3 == "0" {f = 1} END {exit !f}'
    then
      FROM=$s
      break
    fi
  done
  [ -n "$FROM" ] || [ ! -e "$D/logs/timings-call1.tsv" ] || FROM=none  # every stage finished earlier
  echo "[device_medium] LOFA_MEDIUM_FROM=auto: ${FROM:-from the start}"
fi
cp "$PARAMS" "$D/logs/params.yaml"
: > "$D/logs/commands.txt"
printf 'stage\tseconds\texit\n' > "$D/logs/timings.tsv"
TRACK=$(cd "$D" && pwd)/tracking  # absolute: MLflow stores artifact locations as given
mkdir -p "$TRACK"
export MLFLOW_TRACKING_URI=sqlite:///$TRACK/mlflow.db LOFA_MLFLOW_ARTIFACTS=$TRACK/artifacts LOFA_REGISTER_MODEL=0
export PYTHONUNBUFFERED=1
export LOFA_PIPELINE_ID=${LOFA_PIPELINE_ID:-$(cat "$D/pipeline_id")}
{
  "$PY" -c "import platform, torch; print('python', platform.python_version(), 'torch', torch.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
} | tee "$D/logs/device.txt"
echo "[device_medium] params $PARAMS, data $D, lofa.pipeline=$LOFA_PIPELINE_ID"

# run_stage NAME MODULE ARGS...: one stage command, its output in logs/NAME.log, its time in logs/timings.tsv
run_stage() {
  local name=$1 left=$(( deadline - RESERVE_S - $(date +%s) )) t0 rc=0
  shift
  if [ -n "$FROM" ] && [ "$name" != "$FROM" ]; then
    echo "[device_medium] $name: not run (LOFA_MEDIUM_FROM=$FROM; an earlier call on this machine ran it)"
    printf '%s\t0\tearlier call\n' "$name" >> "$D/logs/timings.tsv"
    return 0
  fi
  FROM=
  if [ "$left" -lt 5 ]; then
    echo "[device_medium] $name: not started, the time budget is spent"
    printf '%s\t0\tskipped\n' "$name" >> "$D/logs/timings.tsv"
    return 1
  fi
  echo "$PY -m $* --params $PARAMS --no-progress" >> "$D/logs/commands.txt"
  t0=$(date +%s)
  timeout --kill-after=10 "$left" "$PY" -m "$@" --params "$PARAMS" --no-progress 2>&1 | tee "$D/logs/$name.log" || rc=$?
  printf '%s\t%s\t%s\n' "$name" "$(( $(date +%s) - t0 ))" "$rc" >> "$D/logs/timings.tsv"
  echo "[device_medium] $name: $(( $(date +%s) - t0 )) s, exit $rc$([ "$rc" = 124 ] && echo ' (stopped: time budget)')"
  return "$rc"
}

# archive [DROP...]: the results (minus the DROP paths) into $OUT/medium_results.tar.gz
archive() {
  local paths=() p
  for p in pipeline_id metrics logs eval tracking/export base/dit.json base/samples loras/plots loras/curves \
           stage1/model.json stage2/model.json stage2_naive/model.json judge/judge.json; do
    [ -e "$D/$p" ] && paths+=("$p")
  done
  if [ -f "$D/stage2/model.safetensors" ] && [ "$(stat -c %s "$D/stage2/model.safetensors")" -le "$WEIGHTS_MAX" ]; then
    paths+=(stage2/model.safetensors)
  fi
  mkdir -p "$OUT"
  tar -C "$D" -czf "$OUT/medium_results.tar.gz" "${@/#/--exclude=}" "${paths[@]}"
}

status=0
run_stage pretrain_base pipelines.pretrain_base --data "$P" --out "$D/base" --metrics "$D/metrics/pretrain_base.json" &&
run_stage fit_loras pipelines.fit_loras --data "$P" --base "$D/base" --out "$D/loras" \
  --metrics "$D/metrics/fit_loras.json" &&
run_stage train_stage1 pipelines.train_stage1 --data "$P" --base "$D/base" --loras "$D/loras" --out "$D/stage1" \
  --metrics "$D/metrics/train_stage1.json" &&
run_stage train_stage2 pipelines.train_stage2 --data "$P" --base "$D/base" --loras "$D/loras" --stage1 "$D/stage1" \
  --out "$D/stage2" --metrics "$D/metrics/train_stage2.json" &&
run_stage train_stage2_naive pipelines.train_stage2 --ablation --data "$P" --base "$D/base" --loras "$D/loras" \
  --out "$D/stage2_naive" --metrics "$D/metrics/train_stage2_naive.json" &&
run_stage train_judge pipelines.train_judge --out "$D/judge" --metrics "$D/metrics/train_judge.json" &&
run_stage evaluate pipelines.evaluate --data "$P" --base "$D/base" --loras "$D/loras" --synth "$D/motionx_synth" \
  --stage1 "$D/stage1" --stage2 "$D/stage2" --naive "$D/stage2_naive" --judge "$D/judge" --out "$D/eval" \
  --metrics "$D/metrics/evaluate.json" --plots "$D/metrics/eval_methods.csv" &&
run_stage refine scripts.medium_refine --data "$P" --base "$D/base" --loras "$D/loras" --stage1 "$D/stage1" \
  --stage2 "$D/stage2" --metrics "$D/metrics/refine.json" --clips 4 || status=1

column -t -s $'\t' "$D/logs/timings.tsv" 2>/dev/null || cat "$D/logs/timings.tsv"
rm -rf "$TRACK/export"  # every run of this machine's store, earlier calls' too
if ! "$PY" -m mlflow_export_import.experiment.export_experiment --experiment lofa --output-dir "$TRACK/export" \
     > "$D/logs/export.log" 2>&1; then
  echo "[device_medium] exporting the MLflow runs FAILED (logs/export.log)"
  status=1
fi
archive
if [ "$(stat -c %s "$OUT/medium_results.tar.gz")" -gt "$ARCHIVE_MAX" ]; then
  echo "[device_medium] archive over $ARCHIVE_MAX bytes: again without fit curves and the runs' artifacts"
  archive loras/curves 'tracking/export/*/artifacts'
fi
echo "[device_medium] $OUT/medium_results.tar.gz: $(stat -c %s "$OUT/medium_results.tar.gz") bytes;" \
     "$( [ $status = 0 ] && echo 'every stage finished' || echo 'a stage FAILED (see logs/ in the archive)')"
exit $status
