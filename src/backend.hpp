// The interface every backend implements, over already-validated arguments (see contract.hpp).
// The op list lives in backend_ops.inc and is declared once per backend namespace.
#pragma once

#include <algorithm>
#include <cstdint>

#include "fusedmoe/tensor.hpp"
#include "fusedmoe/tiling.hpp"

namespace fusedmoe::detail {

// How routed row i (expert order) addresses a row of an operand.
enum class RowMap : uint8_t {
  identity,  // row i
  token,     // row gather[i] / top_k  (the token; as an output of gemm_nn: summed over the k slots)
  slot,      // row gather[i]          (the flat slot t·k + j)
};

// sort_by_expert's scratch: per-chunk expert counts, a chunk being kSortChunk slots.
constexpr int64_t kSortChunk = 256;
inline int64_t sort_chunks(int64_t slots) { return (slots + kSortChunk - 1) / kSortChunk; }
inline int64_t sort_scratch_elements(int64_t slots, int64_t num_experts) { return sort_chunks(slots) * num_experts; }

struct Routing {
  Tensor expert_offsets;  // [E+1] int32
  Tensor gather_indices;  // [M] int32 (undefined when every map is identity)
  int num_experts = 0;
  int top_k = 1;
  int64_t M = 0;  // routed rows
  int64_t T = 0;  // tokens = M / top_k
};

// Y[y_map(i)] = s(i) · X[x_map(i)] · W[e(i)]ᵀ,  W [E,N,K];  s(i) = slot_scale[gather[i]] when defined.
// With act defined ([M, N/2], y_map identity, no slot_scale): also act = silu(Y[:, :N/2]) · Y[:, N/2:] from
// the Y values as stored (GEMM1 with SiLU·mul fused where the backend can); Y may then be undefined (act only:
// Y is not written, or lives in the backend's scratch where SiLU·mul is a separate pass).
// unit_counter (GemmNT, GemmNN): room the caller may lend (int32, at least one element) for a backend whose tile
// loop takes its work units from a counter; the backend zeroes it before each use (else it allocates its own).
struct GemmNT {
  Tensor X; RowMap x_map; Tensor W; Tensor Y; RowMap y_map; Tensor slot_scale; Tensor act = {}; GemmTiling tiling = {};
  Tensor unit_counter = {};
};
// dX[dx_map(i)] (=, or += with accumulate) dY[dy_map(i)] · W[e(i)]; dx_map = token sums a token's k slots
// in slot order (deterministic). slot_scratch: room the caller lends for those k-slot products ([M, K] of dX's
// dtype, 16-byte aligned), which a backend that stages them in dX's dtype uses instead of allocating its own.
struct GemmNN {
  Tensor dY; RowMap dy_map; Tensor W; Tensor dX; RowMap dx_map; bool accumulate = false; GemmTiling tiling = {};
  Tensor slot_scratch = {};
  Tensor unit_counter = {};
};
// dW[e] = Σ_{i∈e} dY[dy_map(i)]ᵀ · X[x_map(i)],  dW [E,N,K]; experts without rows get zeros. A backend may split
// one long reduction (a single group of M rows: the router's dgate) into at most max_split_k(M) row chunks, whose
// float32 partial sums ([chunks, N, K]) go to split_scratch where the caller lends it, else to its own scratch.
inline int64_t max_split_k(int64_t rows) { return std::min<int64_t>(32, rows / 512); }
struct GemmTN {
  Tensor dY; RowMap dy_map; Tensor X; RowMap x_map; Tensor dW; GemmTiling tiling = {};
  Tensor split_scratch = {};
};

namespace cpu {
#include "backend_ops.inc"
}  // namespace cpu

#ifdef FUSEDMOE_WITH_CUDA
namespace cuda {
#include "backend_ops.inc"
void release_scratch_pools();  // fusedmoe::release_scratch_memory()
}  // namespace cuda
#endif

}  // namespace fusedmoe::detail
