# Sourced by the device_*.sh scripts on a lent GPU machine (run from the repo root):
#   source scripts/device_env.sh WHEEL...   installs the carried wheels into /tmp/site (no index, no deps)
# and exports what every command there runs with. A failed install ends the calling script.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$@" || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
