#!/usr/bin/env bash
# Builds fusedmoe and runs the example on its default (Qwen3-30B-A3B-shaped layer, 64 tokens).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
export PATH="/usr/local/cuda/bin:$PATH"
cmake --preset release >/dev/null
cmake --build --preset release -j "$(nproc)" --target moe_example
./build/release/moe_example "$@"
