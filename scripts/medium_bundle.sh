#!/usr/bin/env bash
# Here, on the CPU: synthesize + preprocess the medium preset into data_medium/ (the same stage
# commands as dvc.yaml, with --params params-medium.yaml, tracked in MLflow as usual), then pack
# what the GPU stages read into ONE archive, .medium/bundle.tar.xz, that travels to the lent GPU
# machine (carried with .whl; 64 MiB per call in all). scripts/device_medium.sh unpacks it there.
#
# Packed: preprocessed/ (latents, text embeddings, manifest; the text in float16: scripts/medium_text16.py
# pack rounds it here in place and stages a float16 copy, device_medium.sh casts it back to the same
# float32 bytes as here), motionx_synth/{meta.csv,synth.json,splits/}
# (evaluate's judge labels; not the videos), metrics/{synthesize,preprocess}.json and pipeline_id
# (the lofa.pipeline tag shared by every stage run of this medium run, here and on the device).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
source scripts/medium_common.sh
MAX_BYTES=${LOFA_MEDIUM_BUNDLE_MAX_BYTES:-36000000}  # beside .whl/ (28.6 MB) and the tree: 64 MiB a call
PARAMS=$(medium_params)
D=$MEDIUM_DIR
mkdir -p "$D/metrics"
if [ -z "${LOFA_PIPELINE_ID:-}" ] && [ -f "$D/pipeline_id" ]; then
  LOFA_PIPELINE_ID=$(cat "$D/pipeline_id")  # the same data_medium/ keeps its run id (resume, re-pack)
fi
export LOFA_PIPELINE_ID=${LOFA_PIPELINE_ID:-medium-$(date -u +%Y%m%dT%H%M%SZ)}
export PYTHONUNBUFFERED=1
echo "$LOFA_PIPELINE_ID" > "$D/pipeline_id"
echo "[medium_bundle] params $PARAMS, data $D, lofa.pipeline=$LOFA_PIPELINE_ID"

start=$(date +%s)
"$PY" -m pipelines.synthesize --params "$PARAMS" --out "$D/motionx_synth" \
  --metrics "$D/metrics/synthesize.json" --no-progress
"$PY" -m pipelines.preprocess --params "$PARAMS" --root "$D/motionx_synth" --out "$D/preprocessed" \
  --metrics "$D/metrics/preprocess.json" --no-progress
echo "[medium_bundle] synthesize + preprocess: $(( $(date +%s) - start )) s"

start=$(date +%s)
mkdir -p "$(dirname "$MEDIUM_BUNDLE")"
tmp="$MEDIUM_BUNDLE.partial"
"$PY" scripts/medium_text16.py pack "$D/preprocessed" "$D/bundle16/preprocessed"
# one xz stream, one thread, -9e: the whole set shares one dictionary (smallest result)
tar -cf - -C "$D" pipeline_id motionx_synth/meta.csv motionx_synth/synth.json motionx_synth/splits \
  metrics/synthesize.json metrics/preprocess.json -C bundle16 preprocessed | xz -9e -T1 > "$tmp"
rm -rf "$D/bundle16"
mv "$tmp" "$MEDIUM_BUNDLE"
bytes=$(stat -c %s "$MEDIUM_BUNDLE")
clips=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['clips'])" "$D/metrics/preprocess.json")
echo "[medium_bundle] $MEDIUM_BUNDLE: $bytes bytes, $clips clips ($(( bytes / clips )) bytes per clip), packed in $(( $(date +%s) - start )) s"
if [ "$bytes" -gt "$MAX_BYTES" ]; then
  echo "[medium_bundle] ERROR: $MEDIUM_BUNDLE is $bytes bytes, over the $MAX_BYTES that fit beside .whl/ in one" \
       "device call; lower PRESETS['medium']['num_clips'] in lofa/data/synthetic.py" >&2
  exit 1
fi
