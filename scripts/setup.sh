#!/usr/bin/env bash
# Create .venv at the repo root and install pdserve with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  py=$(command -v python3.11 || command -v python3)
  "$py" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
# System packages: redis-server (the metadata store is a real Redis), and openssh-server + rsync, which the
# `ray up` test needs (Ray's local provider reaches the head node, here 127.0.0.1, over SSH).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing ${missing[*]} (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${missing[*]} (e.g. sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi
pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: CUDA present, installing the default torch build"
    pip install -q torch
  else
    # NOTE: a CPU machine must take the CPU build first; an unpinned torch would pull several GB of CUDA.
    echo "setup: no CUDA, installing torch==2.13.0 (CPU)"
    pip install -q torch==2.13.0
  fi
fi
pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import engine, torch; print('setup: ok, torch', torch.__version__)"
