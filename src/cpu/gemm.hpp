// The CPU backend's one matrix-multiply engine. Every GEMM of the block (grouped, gathered, scattered,
// transposed, scaled) is expressed as a list of jobs over *addressed* matrices, so gathers, scatters
// and transposes cost nothing beyond packing.
#pragma once

#include <cstdint>
#include <vector>

#include "fusedmoe/tensor.hpp"

namespace fusedmoe::detail::cpu {

// Logical matrix: element (r, c) = base[row_off[r] + col_off[c]] · row_scale[r] · col_scale[c]
// (each scale only where given), in units of elements of `dtype`.
struct MatView {
  const void* base = nullptr;
  DType dtype = DType::f32;
  const int64_t* row_off = nullptr;
  const int64_t* col_off = nullptr;
  const double* row_scale = nullptr;
  const double* col_scale = nullptr;
};

struct OutView {
  void* base = nullptr;
  DType dtype = DType::f32;
  const int64_t* row_off = nullptr;
  const int64_t* col_off = nullptr;
  bool accumulate = false;  // C += A·B instead of C = A·B
};

// C[M,N] (=|+=) A[M,K] · B[K,N]. K == 0 writes zeros (or leaves C unchanged when accumulating).
struct MatmulJob {
  int64_t M = 0, N = 0, K = 0;
  MatView A, B;
  OutView C;
};

// Runs all jobs in parallel. Accumulates in double when `f64`, else in float.
void run_matmuls(const std::vector<MatmulJob>& jobs, bool f64);

// Offsets helpers: {0, s, 2s, ...} of length n.
std::vector<int64_t> strided_offsets(int64_t n, int64_t stride);

// A pointer advanced by `elements` elements of `dtype`.
inline const void* advance(const void* p, DType dtype, int64_t elements) {
  return static_cast<const char*>(p) + elements * static_cast<int64_t>(dtype_size(dtype));
}
inline void* advance(void* p, DType dtype, int64_t elements) {
  return static_cast<char*>(p) + elements * static_cast<int64_t>(dtype_size(dtype));
}

}  // namespace fusedmoe::detail::cpu
