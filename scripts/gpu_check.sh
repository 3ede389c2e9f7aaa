#!/usr/bin/env bash
# The one-call GPU check (run on the GPU machine from the repo root, with .deps carried):
# builds, runs every GPU test (C++ and Python), a compute-sanitizer pass, and the benchmark,
# then prints a compact table last. Logs go to $OUT (or ./out), and all of them (no plots) into $OUT/0_logs.tar.gz.
#   GPU_CHECK_QUICK=1  skips the sanitizer and the long benchmark sweep.
#   GPU_CHECK_TARGETS=1  also benchmarks the rest of issue #5's targets in the same call: Qwen3-235B-A22B forward
#   and skewed routing (--skew 2.0) at T=16384 (bench_235b.log, bench_skew.log; ~2 minutes).
#   GPU_CHECK_KERNELS=1  also lists each kernel's time per step at the bench's steady state, ours beside the dense
#   equivalent's (scripts/steady_kernels.py at KERNELS_TOKENS, default "4096 16384"; steady_kernels.txt; ~1 minute).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
summary="$OUT/summary.txt"
: >"$summary"
note() { printf '%-38s %s\n' "$1" "$2" | tee -a "$summary" >/dev/null; }
PY="${PYTHON:-python3}"
export PATH="/usr/local/cuda/bin:$PATH"

gpu=$(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem --format=csv,noheader 2>/dev/null | head -1)
note "card" "$gpu"

# The Python package builds in the background while the C++ tree builds (each compiles the CUDA sources).
if [ -f pyproject.toml ]; then
  ( $PY -m pip install --no-build-isolation --no-deps -q . >"$OUT/pip.log" 2>&1; echo $? >"$OUT/pip.rc" ) &
  pip_job=$!
fi

t0=$(date +%s)
if cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DFUSEDMOE_CUDA=ON >"$OUT/build.log" 2>&1 &&
   cmake --build build/gpu -j "$(nproc)" >>"$OUT/build.log" 2>&1; then
  note "build (C++ + CUDA sm_90a)" "ok ($(( $(date +%s) - t0 )) s)"
else
  note "build" "FAILED (see build.log)"; tail -30 "$OUT/build.log"; cat "$summary"; exit 1
fi

./build/gpu/fusedmoe_tests --gtest_brief=1 >"$OUT/cpp_tests.log" 2>&1
rc=$?
note "C++ tests (CPU + GPU)" "$( [ $rc -eq 0 ] && echo ok || echo FAILED ): $(grep -E '^\[  (PASSED|FAILED)' "$OUT/cpp_tests.log" | tr '\n' ' ')"
[ $rc -ne 0 ] && grep -E "Failure|FAILED|error|Expected|Which is|relative" "$OUT/cpp_tests.log" | head -40
# The GPU tests again with dynamic work units forced on every nt/nn GEMM that allows them (the heuristic keeps
# them to GEMMs of many tiles per CTA, larger than most tests' shapes).
FUSEDMOE_SM90_DYNAMIC=1 ./build/gpu/fusedmoe_tests --gtest_brief=1 --gtest_filter='Cuda*:*/Cuda*' \
  >"$OUT/cpp_tests_dynamic.log" 2>&1
rc=$?
note "GPU tests, dynamic units forced" "$( [ $rc -eq 0 ] && echo ok || echo FAILED ): $(grep -E '^\[  (PASSED|FAILED)' "$OUT/cpp_tests_dynamic.log" | tr '\n' ' ')"
[ $rc -ne 0 ] && grep -E "Failure|FAILED|error|Expected|Which is|relative" "$OUT/cpp_tests_dynamic.log" | head -40

if [ "${GPU_CHECK_QUICK:-0}" != 1 ]; then
  subset='CudaOps.SortBy*:CudaOps.RouteTopk*:CudaOps.RouterLogits*:CudaOps.Elementwise*:Shapes/CudaGroupedGemm.*:EdgeCases/CudaBlock.*:CudaBlock.Deterministic*'
  compute-sanitizer --tool memcheck --error-exitcode 9 ./build/gpu/fusedmoe_tests --gtest_filter="$subset" \
    >"$OUT/memcheck.log" 2>&1
  note "compute-sanitizer memcheck" "$( [ $? -eq 0 ] && echo clean || echo 'ERRORS (memcheck.log)' ): $(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1)"
  race='CudaOps.SortBy*:Shapes/CudaGroupedGemm.ForwardDxDwMatchCpu/3:EdgeCases/CudaBlock.*/Unaligned'
  compute-sanitizer --tool racecheck --error-exitcode 9 ./build/gpu/fusedmoe_tests --gtest_filter="$race" \
    >"$OUT/racecheck.log" 2>&1
  note "compute-sanitizer racecheck" "$( [ $? -eq 0 ] && echo clean || echo 'ERRORS (racecheck.log)' ): $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/racecheck.log" | tail -1)"
fi

# Per-kernel times of one forward+backward at Qwen3-30B-A3B, T=16384 (ncu, clocks left alone).
if [ "${GPU_CHECK_PROFILE:-0}" = 1 ] && command -v ncu >/dev/null; then
  bash scripts/ncu_kernels.sh ./build/gpu/moe_example "${PROFILE_TOKENS:-16384}" >"$OUT/ncu.txt"
  note "ncu per-kernel" "ncu.txt"
fi

# Python package and its GPU tests, when the package exists.
if [ -f pyproject.toml ]; then
  wait "$pip_job"
  if [ "$(cat "$OUT/pip.rc")" = 0 ]; then
    note "python package build" "ok"
    $PY -m pytest -q -x tests/python >"$OUT/pytest.log" 2>&1
    note "Python tests (CPU + GPU)" "$(tail -1 "$OUT/pytest.log")"
  else
    note "python package build" "FAILED (pip.log)"; tail -20 "$OUT/pip.log"
  fi
fi

# The benchmark: the Python side-by-side when installed, else the C++ example.
if $PY -c "import fusedmoe.bench" >/dev/null 2>&1; then
  $PY -m fusedmoe.bench ${BENCH_ARGS:---tokens 2048 16384 --modes fwd fwdbwd --out "$OUT/bench"} \
    >"$OUT/bench.log" 2>&1
  note "benchmark" "exit $? (bench.log, bench.json)"
  cat "$OUT/bench.log" | tail -40
  if [ "${GPU_CHECK_TARGETS:-0}" = 1 ]; then
    $PY -m fusedmoe.bench --model qwen3-235b-a22b --tokens 16384 --modes fwd --impls fusedmoe torch_grouped_mm \
      --repeats 20 --out "$OUT/bench_235b" >"$OUT/bench_235b.log" 2>&1
    note "benchmark Qwen3-235B-A22B" "exit $? (bench_235b.log)"
    $PY -m fusedmoe.bench --tokens 16384 --modes fwd fwdbwd --impls fusedmoe --skew 2.0 --repeats 20 \
      --out "$OUT/bench_skew" >"$OUT/bench_skew.log" 2>&1
    note "benchmark skew 2.0" "exit $? (bench_skew.log)"
    grep -E "^ +[0-9]+ +[0-9.]+ +[0-9]" "$OUT/bench_235b.log" "$OUT/bench_skew.log" | sed 's|.*/||'
  fi
  if [ "${GPU_CHECK_KERNELS:-0}" = 1 ]; then
    $PY scripts/steady_kernels.py --tokens ${KERNELS_TOKENS:-4096 16384} >"$OUT/steady_kernels.txt" 2>&1
    note "per-kernel times, steady state" "exit $? (steady_kernels.txt)"
  fi
else
  for T in 2048 16384; do
    ./build/gpu/moe_example --tokens $T --repeats 5 >"$OUT/example_$T.log" 2>&1
    note "example T=$T fwd" "$(grep '^forward' "$OUT/example_$T.log")"
    note "example T=$T bwd" "$(grep '^backward' "$OUT/example_$T.log")"
    note "example T=$T err" "$(grep 'rel. error' "$OUT/example_$T.log")"
  done
fi
# The device tool brings back at most 8 files of $OUT: every log and JSON also goes into one archive, named to sort
# first (plots left out).
logs=$(mktemp) && tar -czf "$logs" -C "$OUT" --exclude=0_logs.tar.gz --exclude='*.png' . && mv "$logs" "$OUT/0_logs.tar.gz"
echo "================ summary ================"
cat "$summary"
