#!/usr/bin/env bash
# Installs what uploader needs on a fresh Debian/Ubuntu machine: beanstalkd, redis-server,
# systemd's analysis tools and chromium from apt (only those missing), and a virtualenv in .venv with the
# package and its dev extra. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v beanstalkd >/dev/null || missing+=(beanstalkd)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v chromium >/dev/null || missing+=(chromium)  # the status page's browser test
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
