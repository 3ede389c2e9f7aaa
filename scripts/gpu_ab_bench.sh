#!/usr/bin/env bash
# A/B of two source trees through the Python benchmark, in one GPU call (from the repo root; carry .deps and the
# old tree): this working tree ("new") against AB_OLD_TREE (default ab_old, e.g. `git archive <commit> | tar -x
# -C ab_old`). Builds both packages side by side (pip --target build/py_old, build/py_new) and the new tree's C++
# tests and moe_example, runs the new tree's GPU tests, then `fusedmoe.bench` with the two packages' runs
# interleaved (AB_ROUNDS rounds; the torch_grouped_mm block beside the new tree's), and ncu's per-kernel times of
# one new-tree moe_example forward+backward at each AB_NCU_TOKENS. AB_MID_TREES="ab_x ab_y" adds more trees (each
# carried, built and benched like the old one, between old and new in every round). Output: $OUT/ab_bench.txt.
#   AB_TOKENS="1 8 64 512 2048 4096 16384"   AB_MODES="fwd fwdbwd"   AB_ROUNDS=2   AB_NCU_TOKENS="64 2048 16384" (" ": none)
#   AB_BENCH_EXTRA="--skew 2.0" (more fusedmoe.bench arguments)   AB_TEST_FILTER (gtest filter of the GPU tests)
#   AB_BENCH=0 (no fusedmoe.bench)   AB_STEADY_TOKENS="4096 16384" (each round, each tree: steady_kernels.py's
#   per-kernel µs per step at those T, AB_STEADY_MODES="fwdbwd"; finer than the bench for a change of one kernel;
#   AB_STEADY_EXTRA="--no-dense" skips the dense equivalent)   AB_ALTERNATE=1 (even rounds run the trees in reverse
#   order, so the clocks' drift within a call does not favour the tree that runs first)
#   AB_HOST="--fwdbwd --marks 4096" (each round, each tree: scripts/host_overhead.py with these arguments)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT" build
export PATH="/usr/local/cuda/bin:$PATH"
old_tree=${AB_OLD_TREE:-ab_old}
out="$OUT/ab_bench.txt"
t0=$(date +%s)
pip_install() {  # tree, target
  rm -rf "$2" && python3 -m pip install --no-build-isolation --no-deps -q --target "$2" "$1" >"$2.log" 2>&1
}
mid_trees=${AB_MID_TREES:-}
pip_install "./$old_tree" build/py_old & old_job=$!
pip_install . build/py_new & new_job=$!
mid_jobs=()
for tree in $mid_trees; do pip_install "./$tree" "build/py_$tree" & mid_jobs+=($!); done
{ cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DFUSEDMOE_CUDA=ON &&
  cmake --build build/gpu -j 8 --target fusedmoe_tests moe_example; } >build/new_build.log 2>&1 ||
  { tail -30 build/new_build.log; exit 1; }
wait $old_job || { tail -20 build/py_old.log; exit 1; }
wait $new_job || { tail -20 build/py_new.log; exit 1; }
i=0
for tree in $mid_trees; do wait "${mid_jobs[$i]}" || { tail -20 "build/py_$tree.log"; exit 1; }; i=$((i + 1)); done
echo "builds ok ($(( $(date +%s) - t0 )) s) on $(nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | head -1)" | tee "$out"
timeout ${AB_TEST_TIMEOUT:-300} ./build/gpu/fusedmoe_tests --gtest_brief=1 --gtest_filter="${AB_TEST_FILTER:-Cuda*:*/Cuda*}" >build/new_tests.log 2>&1
echo "new tests: $(grep -E '^\[  (PASSED|FAILED)' build/new_tests.log | tr '\n' ' ')" | tee -a "$out"
grep -E -B2 -A12 '^\[  FAILED  \]|Failure' build/new_tests.log | head -60 | tee -a "$out"
for round in $(seq "${AB_ROUNDS:-2}"); do
  trees="old $mid_trees new"
  [ "${AB_ALTERNATE:-0}" = 1 ] && [ $((round % 2)) = 0 ] && trees=$(echo $trees | tr ' ' '\n' | tac | tr '\n' ' ')
  for tree in $trees; do
    if [ -n "${AB_STEADY_TOKENS:-}" ]; then
      echo "== $tree, round $round, steady kernels" | tee -a "$out"
      PYTHONPATH="$PWD/build/py_$tree" python3 scripts/steady_kernels.py --tokens $AB_STEADY_TOKENS \
        --modes ${AB_STEADY_MODES:-fwdbwd} ${AB_STEADY_EXTRA:-} 2>&1 | tee -a "$out"
    fi
    if [ -n "${AB_HOST:-}" ]; then
      echo "== $tree, round $round, host_overhead.py $AB_HOST" | tee -a "$out"
      PYTHONPATH="$PWD/build/py_$tree" python3 scripts/host_overhead.py $AB_HOST 2>&1 | tail -${AB_HOST_LINES:-60} | tee -a "$out"
    fi
    [ "${AB_BENCH:-1}" = 0 ] && continue
    impls=fusedmoe; [ "$tree" = new ] && impls="fusedmoe torch_grouped_mm"
    PYTHONPATH="$PWD/build/py_$tree" python3 -m fusedmoe.bench --tokens ${AB_TOKENS:-1 8 64 512 2048 4096 16384} \
      --modes ${AB_MODES:-fwd fwdbwd} --impls $impls --repeats 20 ${AB_BENCH_EXTRA:-} --out "$OUT/bench_${tree}_$round" \
      >"$OUT/bench_${tree}_$round.log" 2>&1
    echo "== $tree, round $round" | tee -a "$out"
    grep -E '^\[|^ +[0-9]+ +[0-9.]+ ' "$OUT/bench_${tree}_$round.log" | tee -a "$out"
  done
done
for T in ${AB_NCU_TOKENS:-64 2048 16384}; do
  echo "== ncu, new tree, T=$T (min max avg)" | tee -a "$out"
  bash scripts/ncu_kernels.sh ./build/gpu/moe_example "$T" | tee -a "$out"
done
if [ -n "${AB_STEADY_TOKENS:-}" ]; then
  echo "== steady kernels, change against old" | tee -a "$out"
  python3 scripts/ab_steady_table.py "$out" | tee -a "$out.table"
  cat "$out.table" >>"$out" && rm -f "$out.table"
fi
