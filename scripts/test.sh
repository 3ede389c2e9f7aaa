#!/usr/bin/env bash
# Builds fusedmoe (the CUDA backend too, compiled for sm_90a, wherever nvcc exists) and runs every test.
# GPU tests skip themselves on a machine without a Hopper GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
export PATH="/usr/local/cuda/bin:$PATH"
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)"
ctest --preset release -j "$(nproc)"
