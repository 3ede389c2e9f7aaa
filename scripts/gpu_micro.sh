#!/usr/bin/env bash
# The microbenchmarks of bench/micro, built with nvcc alone (~30 s) and run on the GPU machine:
#   wgmma_rate     cycles per 64-deep k-step of one or two warpgroups issuing wgmma from shared memory, with
#                  nothing else running or with the other warpgroup storing
#   pipeline_rate  a synthetic grouped-GEMM mainloop (TMA + cp.async producer, wgmma consumers, stores) at
#                  Qwen3-30B-A3B's GEMM shapes, cooperative and ping-pong schedules
#   WGMMA_KSTEPS=8192 (k-steps per warpgroup in wgmma_rate)   MICRO="wgmma_rate pipeline_rate" (which to run)
#   PIPELINE_ARGS=tiles (pipeline_rate: 128 × 256 against 192 × 192 tiles only; =intake: the stages' fill rate alone)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/usr/local/cuda/bin:$PATH"
mkdir -p build/micro
for bench in ${MICRO:-wgmma_rate pipeline_rate}; do
  nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Iinclude -Xptxas -v \
    -o "build/micro/$bench" "bench/micro/$bench.cu" \
    2>"build/micro/$bench.ptxas"
  echo "== $bench ($(grep -cE '[1-9][0-9]* bytes spill' "build/micro/$bench.ptxas" || true) kernels with spills)"
  case $bench in
    wgmma_rate) "./build/micro/$bench" "${WGMMA_KSTEPS:-8192}" ;;
    pipeline_rate) "./build/micro/$bench" ${PIPELINE_ARGS:-} ;;
    *) "./build/micro/$bench" ;;
  esac
done
