#!/usr/bin/env bash
# The per-tile timeline of the sm90 GEMMs (diagnostic build -DFUSEDMOE_SM90_TIMELINE) on the GPU machine, per
# kernel variant: builds build/tl (moe_example only: no GoogleTest sources needed, so it also runs in another
# source tree), runs it per variant and token count without the CPU oracle, and collects each run's report
# (cycles per tile: tile switch, first-stage wait, mainloop, epilogue) in $OUT/timeline.txt.
#   TL_VARIANTS="A=ENV=VAL,ENV2=VAL B=..."  (default: the heuristic, named "default")
#   TL_TOKENS="4096 16384"   TL_FLAGS="-DFUSEDMOE_SM90_DIAG_TN_KMAJOR_A" (extra CUDA flags of the build)
#   Extra traffic during the nt/nn mainloop (gemm_sm90.cu, kDiagSmemRead…): TL_FLAGS="-DFUSEDMOE_SM90_DIAG_TRAFFIC"
#   TL_VARIANTS="base=FUSEDMOE_TL_DEFAULT=1 smem16=FUSEDMOE_SM90_VARIANT=16 st8=FUSEDMOE_SM90_VARIANT=64"
#   TL_BUILD_ONLY=1 builds and stops (to build next to another tree before timing anything).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT" build
export PATH="/usr/local/cuda/bin:$PATH"
if ! { cmake -S . -B build/tl -G Ninja -DCMAKE_BUILD_TYPE=Release -DFUSEDMOE_CUDA=ON -DFUSEDMOE_BUILD_TESTS=OFF \
         -DCMAKE_CUDA_FLAGS="-DFUSEDMOE_SM90_TIMELINE ${TL_FLAGS:-}" &&
       cmake --build build/tl -j "${TL_JOBS:-$(nproc)}" --target moe_example; } >build/tl_build.log 2>&1; then
  tail -30 build/tl_build.log; exit 1
fi
[ "${TL_BUILD_ONLY:-0}" = 1 ] && exit 0
out="$OUT/timeline.txt"
echo "# $(nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,clocks.max.mem --format=csv,noheader | head -1); build flags: -DFUSEDMOE_SM90_TIMELINE ${TL_FLAGS:-}" >>"$out"
for v in ${TL_VARIANTS:-default=FUSEDMOE_TL_DEFAULT=1}; do
  name=${v%%=*}; envs=${v#*=}
  IFS=',' read -ra kv <<<"$envs"
  for T in ${TL_TOKENS:-4096 16384}; do
    { echo "== $name T=$T"
      ( export "${kv[@]}"; ./build/tl/moe_example --tokens "$T" --repeats 3 --no-check 2>&1 ) |
        grep -E "^(forward|backward|inference)|timeline|^  (nt|nn|tn)"; } >>"$out"
  done
done
cat "$out"
