#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs pytest.
#   bash scripts/test.sh            (extra arguments go to pytest, e.g. -k export)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh requirements-dev.txt
# The web UI test drives Debian's Chromium (no browser is ever downloaded by a test tool).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    (sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium"
  else
    echo "note: chromium is not installed and this user cannot install it; the web UI test will be skipped"
  fi
fi
# --torch_compile's tests build kernels with a C++ compiler (the CI image has g++; a bare machine may not).
if ! command -v g++ >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq g++ >/dev/null) || echo "warning: could not install g++"
fi
# One thread per process: tests start several processes (torchrun, servers), and oversubscribed
# OpenMP threads spin against each other on a small machine.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Test files are shared out over MEDLORA_TEST_WORKERS processes (default 2, one per core of the CI machine);
# each file runs whole in one process, so its fixtures are built once. MEDLORA_TEST_WORKERS=0: one process.
# The longest test files start first (tests/conftest.py orders them; xdist would otherwise put files with
# the fewest tests, the real-model demo among them, last). --durations: the slowest tests, in CI's log too.
python -m pytest -n "${MEDLORA_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder --durations=15 "$@"
