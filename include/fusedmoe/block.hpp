// The whole Qwen3-MoE MLP block, forward and backward (DESIGN.md §3, §4).
//
// Memory is the caller's: outputs, the state saved for backward (`MoeSaved`, carved from one
// allocation of moe_saved_bytes()), and scratch (`Workspace` of moe_*_workspace_bytes()).
#pragma once

#include "fusedmoe/ops.hpp"
#include "fusedmoe/tensor.hpp"

namespace fusedmoe {

struct MoeConfig {
  int64_t hidden_size = 2048;        // H
  int64_t intermediate_size = 768;   // I (moe_intermediate_size)
  int num_experts = 128;             // E
  int top_k = 8;                     // k (num_experts_per_tok)
  bool norm_topk_prob = true;
  DType dtype = DType::bf16;         // dtype of activations and weights
  // Kernel choices of the expert GEMMs (CUDA): forward (GEMM1, GEMM2), dX (dA, dx) and dW (dW1, dW2).
  struct Tilings {
    GemmTiling forward, backward_dx, backward_dw;
  } kernels{};

  // Throws fusedmoe::Error naming the field when the config is unusable.
  void validate() const;
  // FLOPs of the expert GEMMs (router excluded): forward 6·T·k·H·I; backward 12·T·k·H·I (6 without dW).
  double forward_flops(int64_t tokens) const;
  double backward_flops(int64_t tokens, bool with_dW) const;
};

// Qwen3-30B-A3B and Qwen3-235B-A22B expert shapes.
MoeConfig qwen3_30b_a3b_config();
MoeConfig qwen3_235b_a22b_config();

struct MoeWeights {
  Tensor gate;          // [E,H]    router (HF gate.weight)
  Tensor gate_up_proj;  // [E,2I,H] rows 0..I-1 gate, I..2I-1 up
  Tensor down_proj;     // [E,H,I]
};

// What forward saves for backward: routing metadata and the first GEMM's output. A forward that no backward
// will follow (inference) may leave gate_up_out undefined: Y1 is then neither kept nor written, which saves its
// T·k·2I elements and two thirds of the first GEMM's output stores; moe_backward needs it.
struct MoeSaved {
  Tensor topk_weights;    // [T,k]    cfg.dtype
  Tensor topk_ids;        // [T,k]    int32
  Tensor gather_indices;  // [T·k]    int32
  Tensor m_sizes;         // [E]      int32
  Tensor expert_offsets;  // [E+1]    int32
  Tensor gate_up_out;     // [T·k,2I] cfg.dtype, expert order (Y1)
};

// keep_gate_up = false: the state of an inference forward (no gate_up_out).
size_t moe_saved_bytes(const MoeConfig& cfg, int64_t tokens, bool keep_gate_up = true);
// Carves the MoeSaved views out of `memory` (moe_saved_bytes() bytes on `device`, 256-byte aligned).
MoeSaved moe_saved_views(const MoeConfig& cfg, int64_t tokens, void* memory, Device device, bool keep_gate_up = true);

size_t moe_forward_workspace_bytes(const MoeConfig& cfg, int64_t tokens);

// out [T,H] and router_logits [T,E] in cfg.dtype; x [T,H] (callers flatten [B,S,H]).
void moe_forward(const MoeConfig& cfg, const Tensor& x, const MoeWeights& weights, const Tensor& out,
                 const Tensor& router_logits, const MoeSaved& saved, Workspace workspace, Stream stream = {});

// The gradients wanted. An undefined view is not computed, and its work is skipped entirely: leave
// d_gate_up_proj and d_down_proj undefined for frozen experts (dX only), dx for dW only.
struct MoeGrads {
  Tensor dx;              // [T,H]
  Tensor d_gate;          // [E,H]
  Tensor d_gate_up_proj;  // [E,2I,H]
  Tensor d_down_proj;     // [E,H,I]
};

size_t moe_backward_workspace_bytes(const MoeConfig& cfg, int64_t tokens, const MoeGrads& wanted);

void moe_backward(const MoeConfig& cfg, const Tensor& d_out, const Tensor& x, const MoeWeights& weights,
                  const Tensor& router_logits, const MoeSaved& saved, const MoeGrads& grads, Workspace workspace,
                  Stream stream = {});

// ---- The experts alone, given the routing ----
// For integrations whose router runs elsewhere (e.g. transformers' experts interface):
//   out[t] = Σ_j topk_weights[t,j] · down_j(silu(gate_j(x[t])) · up_j(x[t])),  expert ids from topk_ids.
// topk_weights [T,k] (any float dtype), topk_ids [T,k] int32. `saved` receives the sort and Y1; its
// topk_* views are not used. weights.gate is not used.
void moe_experts_forward(const MoeConfig& cfg, const Tensor& x, const Tensor& topk_weights, const Tensor& topk_ids,
                         const MoeWeights& weights, const Tensor& out, const MoeSaved& saved, Workspace workspace,
                         Stream stream = {});

struct MoeExpertGrads {
  Tensor dx;              // [T,H]
  Tensor d_topk_weights;  // [T,k] float32 or cfg.dtype
  Tensor d_gate_up_proj;  // [E,2I,H]
  Tensor d_down_proj;     // [E,H,I]
};

size_t moe_experts_backward_workspace_bytes(const MoeConfig& cfg, int64_t tokens, const MoeExpertGrads& wanted);

void moe_experts_backward(const MoeConfig& cfg, const Tensor& d_out, const Tensor& x, const Tensor& topk_weights,
                          const MoeWeights& weights, const MoeSaved& saved, const MoeExpertGrads& grads,
                          Workspace workspace, Stream stream = {});

}  // namespace fusedmoe
