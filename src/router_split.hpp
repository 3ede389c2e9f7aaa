// How many slices of H the sm_90a router GEMM (logits [T, E] = x [T, H] · gateᵀ) splits its reduction into: host
// code of the CUDA backend, here so that the CPU tests check the choice the backend makes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cluster_schedule.hpp"  // default_block_n

namespace fusedmoe::detail {

// The router's GEMM has one or two column tiles (E ≤ 128, or 256-wide tiles) and T/128 row tiles: below one tile
// per SM each CTA walks all of H alone (T=4096: 32 CTAs of 32 k-steps, 24.6 µs on an H200, where its 2 GFLOP take
// ~4 µs at the tensor cores' rate; NOTES, session 26). Split into S slices, group s reduces slice s of every row into
// float32 partials [S, T, E], summed in slice order afterwards. S: the most slices (up to 8) of whole 64-column
// k-steps, at least 4 each (the pipeline's depth), that keep the CTAs within one wave of the `sms` SMs and the
// partials within `room_bytes`; 1 (no split) where the row tiles already fill half the SMs.
inline int router_split_k(int64_t T, int64_t H, int64_t E, int sms, size_t room_bytes) {
  constexpr int64_t kStep = 64, kMinSteps = 4, kMaxSplits = 8, kRows = 128;
  const int64_t block_n = default_block_n(E);
  const int64_t tiles = ((T + kRows - 1) / kRows) * ((E + block_n - 1) / block_n);
  if (T <= 0 || H <= 0 || E <= 0 || H % kStep != 0 || 2 * tiles > sms) return 1;
  const int64_t steps = H / kStep;
  int best = 1;
  for (int64_t S = 2; S <= kMaxSplits; ++S)
    if (steps % S == 0 && steps / S >= kMinSteps && tiles * S <= sms &&
        static_cast<size_t>(S * T * E) * sizeof(float) <= room_bytes)
      best = static_cast<int>(S);
  return best;
}

}  // namespace fusedmoe::detail
