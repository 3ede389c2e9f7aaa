// The sum of a token's k slot rows, shared by the top-k combine (forward: weighted by the routing weights) and
// the dX pass (backward: the k slot products of a token added into dX).
#pragma once

#include <type_traits>

#include "common.cuh"

namespace fusedmoe::detail::cuda {

constexpr int kSlotSumThreads = 256;

// V consecutive elements of a row as stored (one 16-byte load for V = 8 of 16-bit data): the slot sum holds its
// loads in flight in this form, half the registers of floats.
template <int V, class T>
struct alignas(V * sizeof(T) >= 16 ? 16 : alignof(T)) StoredLanes {
  T e[V];
};

// out[t, c] = (accumulate ? out[t, c] : 0) + Σ_j w[t·k + j] · rows[t·k + j, c], j ascending, in float32
// (w = 1 without weights: the same sum as plain adds). Work items are (token, V consecutive columns), so a token's
// columns spread over the GPU even when the tokens are few (a warp per token took ~17 µs at any T up to 512, one
// memory latency per slot row and column step), walked with a grid stride by a grid that stays resident: blocks
// of one token each left the memory idle while blocks ended and started. The slot loop is unrolled by 4, which
// keeps a few loads in flight per thread at ~40 registers (explicit batches of 4–8 loads took 64–100 registers,
// and the lower occupancy cost a quarter of the bandwidth at large T). The order of the additions is fixed:
// deterministic.
template <int V, class R, class W, class O>
__global__ void sum_slot_rows_kernel(const R* rows, const W* weights, O* out, int64_t T, int k, int64_t cols,
                                     bool accumulate) {
  const int64_t groups_per_row = cols / V;  // cols % V == 0 (the launch picks V so)
  const int64_t items = T * groups_per_row;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < items;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = g / groups_per_row, c = (g % groups_per_row) * V;
    Lanes<V, O> s;
    if (accumulate) s.load(out + t * cols + c);
    else
#pragma unroll
      for (int i = 0; i < V; ++i) s.v[i] = 0.f;
    const R* row = rows + t * k * cols + c;  // slot j's columns: row + j · cols
    const W* w_row = weights ? weights + t * k : nullptr;
#pragma unroll 4
    for (int j = 0; j < k; ++j) {
      const StoredLanes<V, R> y = *reinterpret_cast<const StoredLanes<V, R>*>(row + j * cols);
      const float w = w_row ? to_f32(w_row[j]) : 1.f;
#pragma unroll
      for (int i = 0; i < V; ++i) s.v[i] += w * to_f32(y.e[i]);
    }
    s.store(out + t * cols + c);
  }
}

// Launches sum_slot_rows_kernel: 16-byte column groups where cols and every row start allow them.
template <class R, class W, class O>
void sum_slot_rows(const R* rows, const W* weights, O* out, int64_t T, int k, int64_t cols, bool accumulate,
                   cudaStream_t stream) {
  if (T * cols == 0) return;
  const bool wide = cols % 8 == 0 && reinterpret_cast<uintptr_t>(rows) % 16 == 0 &&
                    reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int64_t items = wide ? T * (cols / 8) : T * cols;
  const int64_t needed = (items + kSlotSumThreads - 1) / kSlotSumThreads;
  const int sms = current_device_info().sms;
  auto launch = [&](auto group) {
    constexpr int G = decltype(group)::value;
    const unsigned grid = resident_grid<sum_slot_rows_kernel<G, R, W, O>, kSlotSumThreads>(needed, sms);
    sum_slot_rows_kernel<G, R, W, O><<<grid, kSlotSumThreads, 0, stream>>>(rows, weights, out, T, k, cols, accumulate);
  };
  if (wide) launch(std::integral_constant<int, 8>{}); else launch(std::integral_constant<int, 1>{});
  check_launch("sum_slot_rows_kernel");
}

}  // namespace fusedmoe::detail::cuda
