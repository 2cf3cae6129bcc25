#!/usr/bin/env bash
# Here (network to PyPI): download into .whl/ the wheels that give the GPU machine (Python 3.12, no
# index) MLflow itself: mlflow-skinny, a sqlite store (SQLAlchemy, Alembic), mlflow-export-import to
# export its runs, and what these need that the machine's image lacks (its package list:
# the device notes' KINDS.md). diffsynth's wheels are already there; this adds to them. Then it
# checks the size: the working tree, .whl/ and .medium/ travel together, 64 MiB a call.
#
#   bash scripts/gpu_wheels.sh        # idempotent: pinned versions, same file names
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LIMIT=$(( 64 * 1024 * 1024 ))
# mlflow-skinny 3.17.2's requirements minus those the image has (click, cloudpickle, packaging, protobuf,
# pyyaml, requests, anyio, h11, annotated-doc, zipp, urllib3); typing-extensions: pydantic needs >= 4.16
WHEELS="mlflow-skinny==3.17.2 sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-semantic-conventions==0.66b2 cachetools==7.3.3 databricks-sdk==0.167.0 google-auth==2.63.1
  pyasn1==0.6.5 pyasn1-modules==0.4.2 importlib-metadata==9.1.0 python-dotenv==1.2.4 sqlparse==0.6.1
  gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.55.0
  mlflow-export-import==1.2.0 shortuuid==1.0.13"
mkdir -p .whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl $WHEELS 2> >(grep -v '^WARNING: Location' >&2)
dupes=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "[gpu_wheels] ERROR: two versions of $dupes in .whl/ (pip --target stops on them): remove the older" >&2
  exit 1
fi
whl=$(du -sb .whl | cut -f1)  # all of it travels when a call carries .whl
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
bundle=$(du -cb .medium 2>/dev/null | tail -1 | cut -f1)
total=$(( whl + tree + ${bundle:-0} ))
echo "[gpu_wheels] .whl/ $whl bytes, tracked tree $tree, .medium/ ${bundle:-0}: $total of $LIMIT a call carries"
if [ "$total" -gt "$LIMIT" ]; then
  echo "[gpu_wheels] ERROR: over the 64 MiB a device call carries" >&2
  exit 1
fi
