// The contract of every op, written once: argument checks shared by all backends, and the derived
// problem sizes the backends receive. Every failure throws fusedmoe::Error naming op and argument.
#pragma once

#include <initializer_list>
#include <string>

#include "fusedmoe/block.hpp"
#include "fusedmoe/error.hpp"
#include "fusedmoe/ops.hpp"

namespace fusedmoe::detail {

using DTypeMask = unsigned;
constexpr DTypeMask mask(DType d) { return 1u << static_cast<unsigned>(d); }
constexpr DTypeMask kFloat = mask(DType::f32) | mask(DType::f64) | mask(DType::bf16) | mask(DType::f16);
constexpr DTypeMask kInt32 = mask(DType::i32);
constexpr DTypeMask kF32 = mask(DType::f32);

constexpr int64_t kAny = -1;

// Checks one tensor argument of `op`: defined, of `ndim = shape.size()` dims with each size equal to the
// given one (kAny: any), of an allowed dtype, contiguous, and (when `device` is given) on that device.
void check_tensor(const char* op, const char* name, const Tensor& t, std::initializer_list<int64_t> shape,
                  DTypeMask dtypes, const Device* device = nullptr);
// Same dtype as the reference tensor.
void check_same_dtype(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref);
[[noreturn]] void fail(const char* op, const std::string& message);

struct RouteDims { int64_t T; int E; int top_k; };
struct GemmDims { int64_t T, M, N, K; int E; int top_k; };

RouteDims check_router_logits(const Tensor& x, const Tensor& gate, const Tensor& logits);
RouteDims check_route_topk(const Tensor& logits, int top_k, const Tensor& weights, const Tensor& ids);
RouteDims check_sort_by_expert(const Tensor& ids, int num_experts, const Tensor& gather, const Tensor& m_sizes,
                               const Tensor& offsets);
// Row counts: X rows / Y rows per permute flags; checks the routing tensors (and, on the CPU, their values).
GemmDims check_grouped_gemm(const char* op, const Tensor& X, const char* x_name, bool x_rows_tokens_ok,
                            const Tensor& W, const GroupedGemmArgs& args, const Tensor& Y, const char* y_name,
                            int64_t y_cols);
void check_silu_mul(const char* op, const Tensor& Y1, const Tensor& A, const char* a_name);
RouteDims check_topk_combine(const char* op, const Tensor& Y2, const Tensor& weights, const Tensor& out,
                             const char* out_name);

// On the CPU: the routing tensors' values are checked (offsets monotone from 0 to M, gather a valid
// slot index) before any kernel uses them, so bad metadata cannot read or write out of bounds.
void check_routing_values(const char* op, const Tensor& offsets, const Tensor* gather, int64_t M);

void check_config(const MoeConfig& cfg);
// A kernel choice; `what` names it in the error. multicast: the family may use cluster_m = 2 (nt / nn).
void check_tiling(const char* what, const GemmTiling& t, bool multicast);
// The block's arguments: the config and x (returns T), the weights (the router's too when with_gate),
// the saved state (all of it, or the experts' part alone; gate_up_out is optional in forward, needed in backward).
int64_t check_tokens(const char* op, const MoeConfig& cfg, const Tensor& x);
void check_weights(const char* op, const MoeConfig& cfg, const MoeWeights& w, const Device& dev, bool with_gate);
void check_saved(const char* op, const MoeConfig& cfg, int64_t T, const MoeSaved& saved, const Device& dev,
                 bool backward);
void check_expert_saved(const char* op, const MoeConfig& cfg, int64_t T, const MoeSaved& saved, const Device& dev,
                        bool backward);
void check_workspace(const char* op, const Workspace& ws, size_t needed);

}  // namespace fusedmoe::detail
