#!/usr/bin/env bash
# Thin entry point: `commhooks-launch horovodrun` (see commhooks/launch/cli.py). It prints the exact
# command it runs; --dry-run prints it only.   launch/horovodrun.sh [options] -- script.py [args]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
exec "$py" -m commhooks.launch.cli horovodrun "$@"
