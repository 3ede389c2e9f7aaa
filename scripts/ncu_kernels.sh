#!/usr/bin/env bash
# ncu's per-kernel times of one moe_example forward+backward (and inference forward), one line per kernel:
# name (80 characters), then min max avg and the unit. Clocks left alone.
#   bash scripts/ncu_kernels.sh ./build/gpu/moe_example T [more moe_example arguments]
set -uo pipefail
example=$1 T=$2
shift 2
ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
  "$example" --tokens "$T" --repeats 1 --no-check "$@" 2>&1 | grep -E "^  [a-zA-Z_]|gpu__time_duration" |
  sed -E 's/\(fusedmoe::detail::cuda::[^)]*\)//; s/^ +void //; s/^ +//; s/(sm90::)?<?unnamed>:://g; s/__nv_bfloat16/bf16/g' |
  paste - - | sed -E 's/^(.{80}).* (us|ms) +([0-9.,]+) +([0-9.,]+) +([0-9.,]+)$/\1  \3 \4 \5 \2/'
