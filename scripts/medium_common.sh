# Sourced by scripts/medium_bundle.sh (here, CPU) and scripts/device_medium.sh (the GPU machine).
#   LOFA_MEDIUM_DIR     where the medium data and outputs live (default data_medium)
#   LOFA_MEDIUM_BUNDLE  the archive that carries the preprocessed set (default .medium/bundle.tar.xz)
#   LOFA_MEDIUM_SMOKE=1 a tiny world and tiny models: params-medium.yaml overridden by
#                       scripts/medium_smoke.yaml (what tests/test_medium.py runs on CPU)
MEDIUM_DIR=${LOFA_MEDIUM_DIR:-data_medium}
MEDIUM_BUNDLE=${LOFA_MEDIUM_BUNDLE:-.medium/bundle.tar.xz}
MEDIUM_SMOKE=${LOFA_MEDIUM_SMOKE:-0}

# The params file the stages read: params-medium.yaml, or in smoke mode that file with
# scripts/medium_smoke.yaml merged over it (written to $MEDIUM_DIR/params-smoke.yaml).
medium_params() {
  if [ "$MEDIUM_SMOKE" != 1 ]; then
    echo params-medium.yaml
    return
  fi
  mkdir -p "$MEDIUM_DIR"
  "$PY" - params-medium.yaml scripts/medium_smoke.yaml "$MEDIUM_DIR/params-smoke.yaml" <<'PYEOF' || return 1
import sys

import yaml


def merge(base, over):
    return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in over.items()}}


base_path, over_path, out_path = sys.argv[1:]
with open(base_path) as f:
    base = yaml.safe_load(f)
with open(over_path) as f:
    over = yaml.safe_load(f)
with open(out_path, "w") as f:
    yaml.safe_dump(merge(base, over), f, sort_keys=False)
PYEOF
  echo "$MEDIUM_DIR/params-smoke.yaml"
}
