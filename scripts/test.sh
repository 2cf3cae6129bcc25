#!/usr/bin/env bash
# Set up (if needed) and run the tests on CPU; the two tiers are described in docs/testing.md.
#   bash scripts/test.sh              the fast tier: every test not marked slow (under 2 minutes on 2 cores)
#   bash scripts/test.sh --slow       the slow tier only (end-to-end runs, servers, faults; about 30 minutes)
#   bash scripts/test.sh --all        both tiers
#   bash scripts/test.sh --coverage   the fast tier under coverage.py, then fail unless it imported and
#                                     exercised every module of lofa/ and pipelines/ (scripts/module_coverage.py)
# Other arguments go to pytest (-x, -k NAME, test files: the tier's tests of those; a -m of yours replaces the tier's).
# With no file named, pytest collects tests/ (testpaths in pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
tier=fast
case "${1:-}" in
  --slow|--all|--coverage) tier=${1#--}; shift ;;
esac
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"  # dvc.yaml calls a bare `python`: the project's
case $tier in
  fast) exec python -m pytest -m "not slow" "$@" ;;
  slow) exec python -m pytest -m slow "$@" ;;
  all) exec python -m pytest "$@" ;;
  coverage)
    data=out/coverage/fast.coverage  # read it again with: python -m coverage report --data-file=$data
    mkdir -p "$(dirname "$data")"
    python -m coverage run --data-file="$data" --source=lofa,pipelines -m pytest -m "not slow" "$@"
    exec python scripts/module_coverage.py "$data" ;;
esac
