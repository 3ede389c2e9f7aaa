#!/usr/bin/env bash
# The main job: sets up, builds, and runs the benchmark on its default (the GPU sweep on a Hopper GPU,
# a small CPU run elsewhere). Extra arguments go to `python -m fusedmoe.bench` (see --help).
# Output: a table on stdout, bench-out/bench.json and bench-out/bench.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
py=$(bash scripts/python_env.sh)
"$py" -m fusedmoe.bench --out bench-out "$@"
