#!/usr/bin/env bash
# Set up (if needed) and run the default synthetic pipeline end to end with DVC.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # dvc.yaml calls a bare `python`: the project's
export LOFA_PIPELINE_ID=${LOFA_PIPELINE_ID:-dvc-$(date -u +%Y%m%dT%H%M%SZ)}
start=$(date +%s)
dvc repro "$@"
echo "[run_default] pipeline finished in $(( $(date +%s) - start )) s (MLflow group tag lofa.pipeline=$LOFA_PIPELINE_ID)"
dvc metrics show
