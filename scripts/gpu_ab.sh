#!/usr/bin/env bash
# A/B of the CUDA backend's kernel switches on the GPU machine, in one call: builds the C++ example and
# tests, checks each variant against the CPU oracle (GPU tests), times the block per variant (moe_example)
# and profiles its GEMM kernels with ncu (time, L2 and tensor-pipe use). Logs go to $OUT.
#   AB_VARIANTS="A=ENV=VAL,ENV2=VAL B=..."  (default: the sm90 weight multicast on and off)
#   AB_TOKENS="2048 16384"   AB_NCU=0 skips the profile.   AB_TEST_REPEAT=N repeats the GPU tests N times.
#   AB_UNTESTED="name …": variants timed without the GPU tests (kernels the default build already tested);
#   AB_TESTS=0: none of them (the tests are then not built either).
#   AB_EXAMPLE_ARGS="--hidden 4096 --intermediate 1536": moe_example's shape (default Qwen3-30B-A3B); with it
#   the runs skip the CPU oracle (--no-check), which takes minutes at the larger shapes.
#   AB_NCU_METRICS="dram__bytes_read.sum,…": more ncu metrics.
#   AB_CUDA_FLAGS="-DFUSEDMOE_SM90_STAGES256=3": extra CUDA flags of the build (compile-time experiments, or ones
#   whose variant bits the variants then switch), in a build directory of its own (build/gpu-flags).
#   AB_DENSE=1: also profiles the dense cuBLAS GEMMs of the same FLOPs (torch.matmul, bf16, [T·k, H]·[H, 2I]
#   and [T·k, I]·[I, H]) with the same metrics, under "== ncu dense".
# $OUT gets three files (the GPU machine returns only a few): ab.txt, ncu_summary.txt and the build log;
# the full logs stay in build/ab.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
LOGS=build/ab
mkdir -p "$OUT" "$LOGS"
export PATH="/usr/local/cuda/bin:$PATH"
variants=${AB_VARIANTS:-"pairs=FUSEDMOE_SM90_CLUSTER=2 single=FUSEDMOE_SM90_CLUSTER=1"}
t0=$(date +%s)
BUILD=build/gpu${AB_CUDA_FLAGS:+-flags}
if ! { cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFUSEDMOE_CUDA=ON ${AB_CUDA_FLAGS:+"-DCMAKE_CUDA_FLAGS=$AB_CUDA_FLAGS"} &&
       cmake --build "$BUILD" -j "$(nproc)" --target moe_example $([ "${AB_TESTS:-1}" = 0 ] || echo fusedmoe_tests); } \
       >"$OUT/build.log" 2>&1; then
  tail -30 "$OUT/build.log"; exit 1
fi
echo "build ok ($(( $(date +%s) - t0 )) s) on $(nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.mem --format=csv,noheader | head -1)"
table="$OUT/ab.txt"; : >"$table"
example_args=${AB_EXAMPLE_ARGS:-}
[ -n "$example_args" ] && example_args="$example_args --no-check"
metrics="gpu__time_duration.sum,launch__grid_size,lts__throughput.avg.pct_of_peak_sustained_elapsed,\
sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed${AB_NCU_METRICS:+,$AB_NCU_METRICS}"
for v in $variants; do
  name=${v%%=*}; envs=${v#*=}
  IFS=',' read -ra kv <<<"$envs"
  ( export "${kv[@]}"
    # Variants named diag* compute wrong results on purpose (kernel diagnostics): timings only.
    [[ $name == diag* || " ${AB_UNTESTED:-} " == *" $name "* || ${AB_TESTS:-1} == 0 ]] || ./$BUILD/fusedmoe_tests --gtest_brief=1 --gtest_filter="${AB_TEST_FILTER:-Cuda*:*/Cuda*}" \
      --gtest_repeat="${AB_TEST_REPEAT:-1}" >"$LOGS/tests_$name.log" 2>&1
    echo "$name tests: $(grep -E '^\[  (PASSED|FAILED)' "$LOGS/tests_$name.log" 2>/dev/null | sort | uniq -c | tr '\n' ' ')" >>"$table"
    grep -E -B2 -A12 '^\[  FAILED  \]|Failure' "$LOGS/tests_$name.log" 2>/dev/null | head -60 >>"$table"
    for T in ${AB_TOKENS:-2048 16384}; do
      ./$BUILD/moe_example --tokens "$T" --repeats 10 $example_args >"$LOGS/example_${name}_$T.log" 2>&1
      echo "$name T=$T $(grep -E '^(forward|backward|inference)' "$LOGS/example_${name}_$T.log" | tr -s ' ' | tr '\n' ' ')" >>"$table"
    done
    if [ "${AB_NCU:-1}" = 1 ]; then
      ncu --clock-control none -k regex:gemm --metrics "$metrics" \
        ./$BUILD/moe_example --tokens "${AB_NCU_TOKENS:-16384}" --repeats 1 $example_args >"$LOGS/ncu_$name.txt" 2>&1
      { echo "== ncu $name"; grep -E "gemm|duration|grid_size|lts__|hmma|dram__|sm__" "$LOGS/ncu_$name.txt" | grep -v "==PROF==" |
          sed -E 's/\(fusedmoe::detail::cuda::[^)]*\)//g; s/  +/ /g' | cut -c1-150 | head -130; } >>"$OUT/ncu_summary.txt"
    fi )
done
if [ "${AB_DENSE:-0}" = 1 ]; then
  # The dense equivalent's two forward GEMMs at moe_example's shape (its --hidden/--intermediate/--top-k).
  get() { local a=($example_args) i; for ((i = 0; i + 1 < ${#a[@]}; i++)); do [ "${a[i]}" = "$1" ] && { echo "${a[i+1]}"; return; }; done; echo "$2"; }
  H=$(get --hidden 2048) I=$(get --intermediate 768) K=$(get --top-k 8)
  M=$(( ${AB_NCU_TOKENS:-16384} * K ))
  ncu --clock-control none --metrics "$metrics" python3 -c "
import torch
a, w1 = torch.randn($M, $H, device='cuda', dtype=torch.bfloat16), torch.randn($H, 2 * $I, device='cuda', dtype=torch.bfloat16)
b, w2 = torch.randn($M, $I, device='cuda', dtype=torch.bfloat16), torch.randn($I, $H, device='cuda', dtype=torch.bfloat16)
for _ in range(2): a @ w1; b @ w2
torch.cuda.synchronize()" >"$LOGS/ncu_dense.txt" 2>&1
  { echo "== ncu dense (cuBLAS [$M, $H]·[$H, $((2 * I))] then [$M, $I]·[$I, $H], two calls each; all kernels)"
    grep -E "^  [a-zA-Z_]|duration|grid_size|lts__|hmma|dram__|sm__" "$LOGS/ncu_dense.txt" |
      sed -E 's/  +/ /g' | cut -c1-150 | tail -40; } >>"$OUT/ncu_summary.txt"
fi
cat "$OUT/ncu_summary.txt" 2>/dev/null | head -400
echo "================ A/B ================"
cat "$table"
