#!/usr/bin/env bash
# The tensor-core rate microbenchmark (bench/micro/wgmma_rate.cu): cycles per 64-deep k-step of one or two
# warpgroups issuing wgmma from shared memory, nothing else running. Builds with nvcc alone (~20 s).
#   WGMMA_KSTEPS=8192 (k-steps per warpgroup)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/cuda/bin:$PATH"
mkdir -p build/micro
nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a -Xptxas -v -o build/micro/wgmma_rate bench/micro/wgmma_rate.cu \
  2>build/micro/wgmma_rate.ptxas
grep -E "spill" build/micro/wgmma_rate.ptxas | sort | uniq -c
./build/micro/wgmma_rate "${WGMMA_KSTEPS:-8192}"
