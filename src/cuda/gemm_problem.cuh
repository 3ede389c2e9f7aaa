// The grouped-GEMM problem description shared by the GEMM kernels (gemm.cu: mma.sync, any sm_80+ shape;
// gemm_sm90.cu: wgmma, the Hopper fast path).
#pragma once

#include "common.cuh"

namespace fusedmoe::detail::cuda {

// nt: C[i] = A[i]·B[e]ᵀ (forward; B stored [N,K]); nn: C[i] = A[i]·B[e] (dX; B stored [K_red,N]);
// tn: C[e] = Σ_{i∈e} A[i]ᵀ·B[i] (dW; a variable-length reduction over each group's routed rows).
enum class GemmKind { nt, nn, tn };

template <class T, class OutT>
struct Problem {
  const T* A; int64_t lda; RowMap a_map;  // nt/nn: row m (K-major); tn: row = reduction index
  const T* B; int64_t ldb; int64_t b_group_stride; RowMap b_map;
  OutT* C; int64_t ldc; int64_t c_group_stride; RowMap c_map;
  const T* row_scale;  // nt/nn only: output row i scaled by row_scale[slot(i)]
  bool accumulate;     // C += result
  DeviceRouting routing;
  int64_t M, N, K;     // nt/nn: N, K fixed, M per group; tn: M, N fixed, K per group
  // nt, sm90 only (gated): C = [gate | up] (N = 2·I) and act[row] = silu(gate)·up of the stored C values.
  // A tile then covers act columns n0 … n0+BN/2 and the matching gate and up columns of C.
  OutT* act = nullptr;
  int64_t ld_act = 0;
  // tn, sm90 only: C[e] holds the product transposed (element (m, n) at c_group_stride·e + n·ldc + m).
  bool c_transposed = false;
  // nt/nn, sm90 only: room the caller lends for the tile loop's unit counter (null: the launch allocates it).
  unsigned* unit_counter = nullptr;
  // nt, sm90 only, A identity-mapped: the groups are the K-slices of one product (split-K; the router's GEMM).
  // Group g reads columns g·K … g·K + K − 1 of A's rows i − (its first row), so every group covers the same rows.
  bool a_k_split = false;
};

// The Hopper (wgmma) kernels: returns false, launching nothing, when the problem or the device is not
// eligible (not sm_90, unaligned rows or sizes, too many groups); the caller then uses the portable kernel.
// `tiling` picks the tile width and weight multicast (zero fields: the heuristic).
template <class T, class OutT>
bool launch_sm90(const Problem<T, OutT>& p, GemmKind kind, int64_t groups, int64_t M_total, const GemmTiling& tiling,
                 cudaStream_t stream);

}  // namespace fusedmoe::detail::cuda
