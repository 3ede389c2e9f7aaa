#!/usr/bin/env bash
# A/B of one build under environment switches, in one GPU call (from the repo root; carry .deps): installs the
# package and builds the C++ tests once, runs the GPU tests, then `fusedmoe.bench` once per variant per round,
# the variants interleaved (same build, same autotune cache: only the switch differs). Output: $OUT/env_ab.txt.
#   ENV_AB_VARIANTS="pdl_off=FUSEDMOE_PDL=0 pdl_on=FUSEDMOE_PDL=1"  (name=VAR=VALUE[,VAR=VALUE…] …)
#   ENV_AB_TOKENS="64 2048 4096 16384"   ENV_AB_MODES="fwd fwdbwd"   ENV_AB_ROUNDS=3   ENV_AB_TEST_FILTER="Cuda*:*/Cuda*"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT" build
export PATH="/usr/local/cuda/bin:$PATH"
out="$OUT/env_ab.txt"
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -q . >build/env_ab_pip.log 2>&1 & pip_job=$!
{ cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DFUSEDMOE_CUDA=ON &&
  cmake --build build/gpu -j 8 --target fusedmoe_tests; } >build/env_ab_build.log 2>&1 || { tail -30 build/env_ab_build.log; exit 1; }
wait $pip_job || { tail -20 build/env_ab_pip.log; exit 1; }
echo "builds ok ($(( $(date +%s) - t0 )) s) on $(nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | head -1)" | tee "$out"
./build/gpu/fusedmoe_tests --gtest_brief=1 --gtest_filter="${ENV_AB_TEST_FILTER:-Cuda*:*/Cuda*}" >build/env_ab_tests.log 2>&1
echo "GPU tests: $(grep -E '^\[  (PASSED|FAILED)' build/env_ab_tests.log | tr '\n' ' ')" | tee -a "$out"
grep -E -B2 -A12 '^\[  FAILED  \]|Failure' build/env_ab_tests.log | head -60 | tee -a "$out"
for round in $(seq "${ENV_AB_ROUNDS:-3}"); do
  for v in ${ENV_AB_VARIANTS:-pdl_off=FUSEDMOE_PDL=0 pdl_on=FUSEDMOE_PDL=1}; do
    name=${v%%=*}
    IFS=',' read -ra kv <<<"${v#*=}"
    env "${kv[@]}" python3 -m fusedmoe.bench --tokens ${ENV_AB_TOKENS:-64 2048 4096 16384} \
      --modes ${ENV_AB_MODES:-fwd fwdbwd} --impls fusedmoe --repeats 20 --out "build/env_ab_${name}_$round" \
      >"build/env_ab_${name}_$round.log" 2>&1
    echo "== $name (${v#*=}), round $round" | tee -a "$out"
    grep -E '^\[|^ +[0-9]+ +[0-9.]+ ' "build/env_ab_${name}_$round.log" | tee -a "$out"
  done
done
