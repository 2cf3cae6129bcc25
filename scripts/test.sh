#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # dvc.yaml calls a bare `python`: the project's
exec python -m pytest tests "$@"
