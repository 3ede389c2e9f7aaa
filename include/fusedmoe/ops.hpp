// The building-block ops of the MoE block. Each op has one contract (checked in src/contract.cpp),
// served by the CPU backend (the oracle) or the CUDA backend according to the tensors' device.
//
// Shapes (DESIGN.md §2): T tokens, H hidden, E experts, k = top_k, M = T·k routed rows.
// "Expert order" row i belongs to expert e(i), with rows [offsets[e], offsets[e+1]) owned by e;
// gather_indices[i] is the flat slot f = t·k + j that row i came from.
//
// Row maps of the grouped GEMMs (the reference design's `permute_x` / `permute_y`):
//   in_row(i)  = permute_x ? gather_indices[i] / top_k : i       (row of X read by row i)
//   out_row(i) = permute_y ? gather_indices[i]          : i       (row of Y written by row i)
#pragma once

#include "fusedmoe/tensor.hpp"
#include "fusedmoe/tiling.hpp"

namespace fusedmoe {

// logits[T,E] = x[T,H] · gate[E,H]ᵀ, accumulated in fp32, stored in logits' dtype.
void router_logits(const Tensor& x, const Tensor& gate, const Tensor& logits, Stream stream = {});

// p = softmax(float32(logits)); (w, ids) = top-k of p (ties: lower expert id first; NaN ranks above
// every number, as torch.topk does); if norm_topk_prob, w /= Σ_j w. Outputs: topk_weights [T,k] in its
// own dtype (usually the input dtype), topk_ids [T,k] int32, both sorted by descending weight.
void route_topk(const Tensor& logits, int top_k, bool norm_topk_prob, const Tensor& topk_weights,
                const Tensor& topk_ids, Stream stream = {});

// Stable counting sort of the flat slots by expert id. topk_ids [T,k] int32 with ids in [0, E).
// Outputs: gather_indices [T·k] int32, m_sizes [E] int32, expert_offsets [E+1] int32 (offsets[0] = 0).
// The CPU backend rejects ids out of range; the CUDA backend (no host sync) clamps them into range.
void sort_by_expert(const Tensor& topk_ids, int num_experts, const Tensor& gather_indices,
                    const Tensor& m_sizes, const Tensor& expert_offsets, Stream stream = {});

struct GroupedGemmArgs {
  Tensor expert_offsets;  // [E+1] int32, cumulative row offsets in expert order
  Tensor gather_indices;  // [M] int32; needed when permute_x or permute_y
  int top_k = 1;
  bool permute_x = false;
  bool permute_y = false;
  GemmTiling tiling = {};  // the CUDA kernel and tile (cluster_m = 2 only for grouped_gemm and grouped_gemm_dX)
};

// Y[out_row(i)] = X[in_row(i)] · W[e(i)]ᵀ.  X: [T,K] if permute_x else [M,K]; W: [E,N,K]; Y: [M,N].
// `row_weights` (optional, [T,k] or [M] in slot order): Y row of slot f is multiplied by row_weights[f]
// (the reference design's fuse_mul_post); requires gather_indices.
void grouped_gemm(const Tensor& X, const Tensor& W, const GroupedGemmArgs& args, const Tensor& Y,
                  const Tensor& row_weights = {}, Stream stream = {});

// Gradient w.r.t. X: dXe[i] = dY[out_row(i)] · W[e(i)].  dY: [M,N]; W: [E,N,K].
// dX: [M,K] — row in_row(i) when !permute_x, slot gather[i] when permute_x —
//  or, with permute_x, [T,K]: the k slots of each token summed in a fixed order (deterministic).
void grouped_gemm_dX(const Tensor& dY, const Tensor& W, const GroupedGemmArgs& args, const Tensor& dX,
                     Stream stream = {});

// Gradient w.r.t. W: dW[e] = Σ_{i∈e} dY[out_row(i)]ᵀ · X[in_row(i)]   → [E,N,K] (experts with no rows: 0).
void grouped_gemm_dW(const Tensor& X, const Tensor& dY, const GroupedGemmArgs& args, const Tensor& dW,
                     Stream stream = {});

// A[:, c] = silu(Y1[:, c]) · Y1[:, I + c].  Y1: [M,2I], A: [M,I].
void silu_mul(const Tensor& Y1, const Tensor& A, Stream stream = {});
// dY1 = [dA ⊙ u ⊙ σ(g)(1 + g(1−σ(g))) | dA ⊙ silu(g)] with g = Y1[:, :I], u = Y1[:, I:].
void silu_mul_backward(const Tensor& dA, const Tensor& Y1, const Tensor& dY1, Stream stream = {});

// out[t] = Σ_j w[t,j] · Y2[t·k + j] (fp32, j ascending).  Y2: [T·k,H] slot order, w: [T,k], out: [T,H].
void topk_combine(const Tensor& Y2, const Tensor& topk_weights, const Tensor& out, Stream stream = {});
// dY2[t·k+j] = w[t,j] · dOut[t];  d_topk_weights[t,j] = ⟨dOut[t], Y2[t·k+j]⟩ (either output optional).
void topk_combine_backward(const Tensor& dOut, const Tensor& Y2, const Tensor& topk_weights, const Tensor& dY2,
                           const Tensor& d_topk_weights, Stream stream = {});

// Back through the renormalisation and the float32 softmax of route_topk: given d_topk_weights [T,k]
// (any float dtype), writes d_logits [T,E] (float32 or the logits' dtype).
void route_topk_backward(const Tensor& logits, const Tensor& topk_ids, const Tensor& d_topk_weights,
                         bool norm_topk_prob, const Tensor& d_logits, Stream stream = {});

// Back through router_logits: dgate[E,H] = d_logitsᵀ · x and dx[T,H] (+)= d_logits · gate.
// Either output may be undefined (skipped). With accumulate_dx the result is added to dx.
void router_logits_backward(const Tensor& d_logits, const Tensor& x, const Tensor& gate, const Tensor& dx,
                            const Tensor& dgate, bool accumulate_dx, Stream stream = {});

}  // namespace fusedmoe
