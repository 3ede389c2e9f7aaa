#!/usr/bin/env bash
# Small-T (decode-sized) check in one GPU call, from the repo root with .deps carried: builds the package and
# moe_example, benchmarks fusedmoe beside the grouped_mm block at SMALL_TOKENS (fwd and fwd+bwd), lists ncu's
# per-kernel times of one moe_example forward+backward at SMALL_NCU_TOKENS, and the host marks of a forward
# (no_grad) at T=1 and 512. Output: $OUT/small.log, $OUT/ncu_<T>.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
export PATH=/usr/local/cuda/bin:$PATH
( python3 -m pip install --no-build-isolation --no-deps -q . >"$OUT/pip.log" 2>&1; echo $? >"$OUT/pip.rc" ) &
{ cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DFUSEDMOE_CUDA=ON -DFUSEDMOE_BUILD_TESTS=OFF &&
  cmake --build build/gpu -j 8 --target moe_example; } >"$OUT/build.log" 2>&1 || tail -20 "$OUT/build.log"
wait
[ "$(cat "$OUT/pip.rc")" = 0 ] || { tail -20 "$OUT/pip.log"; exit 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -m fusedmoe.bench --tokens ${SMALL_TOKENS:-1 8 64 256 512 1024 2048} --modes fwd fwdbwd \
  --impls fusedmoe torch_grouped_mm --repeats 20 --out "$OUT/small" >"$OUT/small.log" 2>&1
tail -22 "$OUT/small.log"
for T in ${SMALL_NCU_TOKENS:-8 64 512}; do
  bash scripts/ncu_kernels.sh ./build/gpu/moe_example "$T" >"$OUT/ncu_$T.txt"
  echo "ncu T=$T:"; cat "$OUT/ncu_$T.txt"
done
python3 scripts/host_overhead.py --marks 1 512 2>&1 | tail -45
