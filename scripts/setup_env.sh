#!/usr/bin/env bash
# Create .venv (if missing) and install a requirements file into it. Sourced by demo.sh and test.sh.
# Usage: source scripts/setup_env.sh requirements.txt
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build on a machine without one.
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r "${1:-requirements.txt}"
export PATH="$PWD/.venv/bin:$PATH"
