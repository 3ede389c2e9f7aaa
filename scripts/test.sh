#!/usr/bin/env bash
# Builds fusedmoe (the CUDA backend too, compiled for sm_90a, wherever nvcc exists), runs every C++ test,
# then installs the Python package into .venv and runs every Python test.
# GPU tests skip themselves on a machine without a Hopper GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
export PATH="/usr/local/cuda/bin:$PATH"
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)"
ctest --preset release -j "$(nproc)"
py=$(bash scripts/python_env.sh)
"$py" -m pytest -q tests/python
