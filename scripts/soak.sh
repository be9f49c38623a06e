#!/usr/bin/env bash
# The long soak, apart from the default suite: one daemon (a subprocess) under random faults
# for SOAK_SECONDS (default 600): kill -9 and restart, beanstalkd and Redis restarts, S3
# SlowDown bursts, resets, slow answers and blackholes. Ends with every file checked.
#   SOAK_SECONDS=120 SOAK_SEED=7 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m pytest -m slow tests/daemon/test_chaos.py -k soak -s "$@"
