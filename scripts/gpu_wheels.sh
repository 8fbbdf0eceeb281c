#!/usr/bin/env bash
# Prepare, on a machine with PyPI, what the lent GPU machine lacks for scripts/gpu_check.sh:
#   bash scripts/gpu_wheels.sh
# Downloads the wheels of scripts/gpu_wheels.txt for its image (Python 3.12, manylinux x86_64), checks that each
# one's needs are carried or in the image, slims bitsandbytes to the image's CUDA 13.0 library, puts them all in one
# tar file and cuts it into N equal parts, as few as fit 64 MiB a device call with the working tree (.gpu/ is
# ignored by git):
#   .gpu/callK/   payload.tar.partK and MANIFEST (N and the tar's sha256), for K = 1 ... N
# Prints every wheel's size and each call's (also in .gpu/sizes.md). Run it right before a GPU session: the parts
# are sized to the working tree of that moment. PYTHON: the interpreter whose pip downloads (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
downloads=$(mktemp -d)
trap 'rm -rf "$downloads"' EXIT
# pip matches a manylinux_2_N tag exactly, so each N a wheel here uses is named (bitsandbytes: 2_24).
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${tag}_x86_64")
done
mapfile -t pins < <(grep -v '^#' scripts/gpu_wheels.txt | awk 'NF {print $1}')
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$downloads" "${pins[@]}"
"$PYTHON" scripts/gpu_check.py prepare "$downloads"
