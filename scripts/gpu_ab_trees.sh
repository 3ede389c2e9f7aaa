#!/usr/bin/env bash
# A/B of two source trees on the GPU machine, in one call: this working tree ("new") against another tree
# ("old": AB_OLD_TREE, e.g. `git archive <commit> | tar -x -C ab_old`, carried to the GPU machine). Builds both
# side by side, runs the new tree's GPU tests, times the block (moe_example) with the two trees' runs interleaved,
# and profiles each tree's GEMM kernels with ncu. Output: $OUT/ab_trees.txt (and the ncu summaries).
#   AB_OLD_TREE=ab_old   AB_TOKENS="2048 4096 16384"   AB_NCU_TOKENS=16384 (AB_NCU=0: no profile)
#   AB_NCU_OTHER="route|sort": also the times of the other kernels matching this regex, per tree
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT" build
export PATH="/usr/local/cuda/bin:$PATH"
old_tree=${AB_OLD_TREE:-ab_old}
jobs=$(( $(nproc) / 2 ))
t0=$(date +%s)
{ cmake -S "$old_tree" -B build/old -G Ninja -DCMAKE_BUILD_TYPE=Release -DFUSEDMOE_CUDA=ON -DFUSEDMOE_BUILD_TESTS=OFF &&
  cmake --build build/old -j "$jobs" --target moe_example; } >build/old_build.log 2>&1 &
old_job=$!
if ! { cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DFUSEDMOE_CUDA=ON &&
       cmake --build build/gpu -j "$jobs" --target fusedmoe_tests moe_example; } >build/new_build.log 2>&1; then
  tail -30 build/new_build.log; exit 1
fi
wait $old_job || { tail -30 build/old_build.log; exit 1; }
out="$OUT/ab_trees.txt"
echo "builds ok ($(( $(date +%s) - t0 )) s) on $(nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.mem --format=csv,noheader | head -1)" | tee "$out"
timeout ${AB_TEST_TIMEOUT:-300} ./build/gpu/fusedmoe_tests --gtest_brief=1 --gtest_filter="${AB_TEST_FILTER:-Cuda*:*/Cuda*}" >build/new_tests.log 2>&1
echo "new tests: $(grep -E '^\[  (PASSED|FAILED)' build/new_tests.log | tr '\n' ' ')" | tee -a "$out"
grep -E -B2 -A12 '^\[  FAILED  \]|Failure' build/new_tests.log | head -60 | tee -a "$out"
for T in ${AB_TOKENS:-2048 4096 16384}; do
  for round in 1 2; do
    for tree in old gpu; do
      echo "$tree T=$T ($round) $(./build/$tree/moe_example --tokens "$T" --repeats 10 --no-check 2>&1 |
        grep -E '^(forward|backward|inference)' | tr -s ' ' | tr '\n' ' ')" | tee -a "$out"
    done
  done
done
if [ "${AB_NCU:-1}" = 1 ]; then
  for tree in old gpu; do
    ncu --clock-control none -k regex:gemm --metrics gpu__time_duration.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed \
      ./build/$tree/moe_example --tokens "${AB_NCU_TOKENS:-16384}" --repeats 1 --no-check >build/ncu_$tree.txt 2>&1
    { echo "== ncu $tree"; grep -E "gemm|duration|lts__|hmma" build/ncu_$tree.txt |
        sed -E 's/\(fusedmoe::detail::cuda::[^)]*\)//g; s/  +/ /g' | cut -c1-150 | head -80; } >>"$OUT/ncu_summary.txt"
  done
  python3 scripts/ncu_table.py "$OUT/ncu_summary.txt" 2>&1 | tee -a "$out"
  if [ -n "${AB_NCU_OTHER:-}" ]; then
    for tree in old gpu; do
      ncu --clock-control none -k "regex:${AB_NCU_OTHER}" --metrics gpu__time_duration.sum \
        ./build/$tree/moe_example --tokens "${AB_NCU_TOKENS:-16384}" --repeats 1 --no-check >build/ncu_other_$tree.txt 2>&1
      echo "$tree: $(grep -E "^  [a-zA-Z_]|duration" build/ncu_other_$tree.txt | sed -E 's/\(.*//; s/gpu__time_duration.sum//; s/  +/ /g' |
        paste -sd' ' | cut -c1-400)" | tee -a "$out"
    done
  fi
fi
