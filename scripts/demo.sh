#!/usr/bin/env bash
# A sample job end to end: installs what it needs, starts private beanstalkd and redis-server,
# runs the daemon with the local directory store, enqueues 200 files and shows progress.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/uploader demo "$@"
