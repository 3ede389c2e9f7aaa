#!/usr/bin/env bash
# How busy the SMs' shared memory is in the sm90 GEMMs, next to their time and tensor-pipe use: ncu on one
# moe_example run (T=SMEM_TOKENS, default 16384) with the L1/shared data-bank and shared-memory metrics this ncu
# knows (listed first with --query-metrics, since names differ between versions). Builds build/smem
# (moe_example only). The table goes to $OUT/smem.txt, the metric list to $OUT/smem_metrics.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT" build
export PATH="/usr/local/cuda/bin:$PATH"
if ! { cmake -S . -B build/smem -G Ninja -DCMAKE_BUILD_TYPE=Release -DFUSEDMOE_CUDA=ON -DFUSEDMOE_BUILD_TESTS=OFF &&
       cmake --build build/smem -j "$(nproc)" --target moe_example; } >build/smem_build.log 2>&1; then
  tail -30 build/smem_build.log; exit 1
fi
ncu --query-metrics >build/smem_all_metrics.txt 2>&1
grep -E -i "^(l1tex__data_bank|l1tex__data_pipe_lsu_wavefronts_mem_shared|smsp__sass_inst_executed_op_shared|sm__pipe_shared|l1tex__throughput|sm__memory_throughput)" \
  build/smem_all_metrics.txt | awk '{print $1}' | sort -u >"$OUT/smem_metrics.txt"
metrics="gpu__time_duration.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed"
while read -r m; do
  case "$m" in
    l1tex__data_bank_reads|l1tex__data_bank_writes|l1tex__data_pipe_lsu_wavefronts_mem_shared|l1tex__throughput|sm__memory_throughput)
      metrics="$metrics,$m.avg.pct_of_peak_sustained_elapsed" ;;
  esac
done <"$OUT/smem_metrics.txt"
echo "metrics: $metrics" | tee "$OUT/smem.txt"
ncu --clock-control none -k regex:gemm_sm90 --launch-count "${SMEM_LAUNCHES:-9}" --metrics "$metrics" \
  ./build/smem/moe_example --tokens "${SMEM_TOKENS:-16384}" --repeats 1 --no-check >build/smem_ncu.txt 2>&1
grep -E "gemm_sm90_kernel|duration|pct_of_peak" build/smem_ncu.txt |
  sed -E 's/\(fusedmoe::detail::cuda::[^)]*\)//g; s/gemm_sm90_kernel<([^,]*), ([^,]*), ([^,]*), ([^,]*), ([^,]*), ([^,>]*)>.*/gemm \3 \4 gated=\5 cluster=\6/; s/  +/ /g' |
  cut -c1-150 | tee -a "$OUT/smem.txt"
