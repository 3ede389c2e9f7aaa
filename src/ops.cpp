// Public ops: check the contract, then run on the backend of the tensors' device.
#include "fusedmoe/ops.hpp"

#include "contract.hpp"
#include "dispatch.hpp"

namespace fusedmoe {

using namespace detail;

void router_logits(const Tensor& x, const Tensor& gate, const Tensor& logits, Stream s) {
  check_router_logits(x, gate, logits);
  FUSEDMOE_DISPATCH(x.device, router_logits, x, gate, logits, Tensor{}, s);
}

void route_topk(const Tensor& logits, int top_k, bool norm_topk_prob, const Tensor& topk_weights,
                const Tensor& topk_ids, Stream s) {
  check_route_topk(logits, top_k, topk_weights, topk_ids);
  FUSEDMOE_DISPATCH(logits.device, route_topk, logits, top_k, norm_topk_prob, topk_weights, topk_ids, s);
}

void sort_by_expert(const Tensor& topk_ids, int num_experts, const Tensor& gather_indices, const Tensor& m_sizes,
                    const Tensor& expert_offsets, Stream s) {
  check_sort_by_expert(topk_ids, num_experts, gather_indices, m_sizes, expert_offsets);
  FUSEDMOE_DISPATCH(topk_ids.device, sort_by_expert, topk_ids, num_experts, gather_indices, m_sizes, expert_offsets,
                    Tensor{}, s);
}

namespace {
Routing routing_of(const GroupedGemmArgs& a, const GemmDims& d) {
  Routing r;
  r.expert_offsets = a.expert_offsets;
  if (a.permute_x || a.permute_y) r.gather_indices = a.gather_indices;
  r.num_experts = d.E;
  r.top_k = d.top_k;
  r.M = d.M;
  r.T = d.T;
  return r;
}

void check_slot_weights(const char* op, const Tensor& w, const GroupedGemmArgs& a, const GemmDims& d,
                        const Device& dev) {
  if (!w.defined()) return;
  if (!a.permute_x && !a.permute_y)
    fail(op, "argument 'row_weights' needs gather_indices with permute_x or permute_y (weights are per slot)");
  if (w.ndim == 2)
    check_tensor(op, "row_weights", w, {d.T, d.top_k}, kFloat, &dev);
  else
    check_tensor(op, "row_weights", w, {d.M}, kFloat, &dev);
}
}  // namespace

void grouped_gemm(const Tensor& X, const Tensor& W, const GroupedGemmArgs& args, const Tensor& Y,
                  const Tensor& row_weights, Stream s) {
  const char* op = "grouped_gemm";
  const GemmDims d = check_grouped_gemm(op, X, "X", true, W, args, Y, "Y", W.defined() ? W.shape[1] : 0);
  if (W.shape[2] != d.K)
    fail(op, "argument 'W' expected shape [E, N, " + std::to_string(d.K) + "] (K from X), got " + W.describe());
  check_tensor(op, "Y", Y, {d.M, d.N}, kFloat, &X.device);
  check_slot_weights(op, row_weights, args, d, X.device);
  check_tiling("grouped_gemm: args.tiling", args.tiling, /*multicast=*/true);
  GemmNT g{X, args.permute_x ? RowMap::token : RowMap::identity, W, Y,
           args.permute_y ? RowMap::slot : RowMap::identity, row_weights, {}, args.tiling};
  FUSEDMOE_DISPATCH(X.device, gemm_nt, routing_of(args, d), g, s);
}

void grouped_gemm_dX(const Tensor& dY, const Tensor& W, const GroupedGemmArgs& args, const Tensor& dX, Stream s) {
  const char* op = "grouped_gemm_dX";
  const GemmDims d = check_grouped_gemm(op, dY, "dY", false, W, args, dY, "dY", 0);
  if (W.shape[1] != d.K)
    fail(op, "argument 'W' expected shape [E, " + std::to_string(d.K) + ", K] (N from dY), got " + W.describe());
  const int64_t K = W.shape[2];
  RowMap dx_map = RowMap::identity;
  if (args.permute_x) {
    const bool per_token = dX.defined() && dX.ndim == 2 && dX.shape[0] == d.T && d.T != d.M;
    check_tensor(op, "dX", dX, {per_token ? d.T : d.M, K}, kFloat, &dY.device);
    dx_map = per_token ? RowMap::token : RowMap::slot;
  } else {
    check_tensor(op, "dX", dX, {d.M, K}, kFloat, &dY.device);
  }
  check_tiling("grouped_gemm_dX: args.tiling", args.tiling, /*multicast=*/true);
  GemmNN g{dY, args.permute_y ? RowMap::slot : RowMap::identity, W, dX, dx_map, false, args.tiling};
  FUSEDMOE_DISPATCH(dY.device, gemm_nn, routing_of(args, d), g, s);
}

void grouped_gemm_dW(const Tensor& X, const Tensor& dY, const GroupedGemmArgs& args, const Tensor& dW, Stream s) {
  const char* op = "grouped_gemm_dW";
  check_tensor(op, "dY", dY, {kAny, kAny}, kFloat);
  const GemmDims d = check_grouped_gemm(op, X, "X", true, dW, args, dY, "dY", dY.shape[1]);
  check_tensor(op, "dY", dY, {d.M, kAny}, kFloat, &X.device);
  check_same_dtype(op, "dY", dY, "X", X);
  check_tensor(op, "dW", dW, {d.E, d.N, d.K}, kFloat, &X.device);
  check_tiling("grouped_gemm_dW: args.tiling", args.tiling, /*multicast=*/false);
  GemmTN g{dY, args.permute_y ? RowMap::slot : RowMap::identity, X, args.permute_x ? RowMap::token : RowMap::identity,
           dW, args.tiling};
  FUSEDMOE_DISPATCH(X.device, gemm_tn, routing_of(args, d), g, s);
}

void silu_mul(const Tensor& Y1, const Tensor& A, Stream s) {
  check_silu_mul("silu_mul", Y1, A, "A");
  FUSEDMOE_DISPATCH(Y1.device, silu_mul, Y1, A, s);
}

void silu_mul_backward(const Tensor& dA, const Tensor& Y1, const Tensor& dY1, Stream s) {
  const char* op = "silu_mul_backward";
  check_silu_mul(op, Y1, dA, "dA");
  check_tensor(op, "dY1", dY1, {Y1.shape[0], Y1.shape[1]}, kFloat, &Y1.device);
  FUSEDMOE_DISPATCH(Y1.device, silu_mul_backward, dA, Y1, dY1, s);
}

void topk_combine(const Tensor& Y2, const Tensor& topk_weights, const Tensor& out, Stream s) {
  check_topk_combine("topk_combine", Y2, topk_weights, out, "out");
  FUSEDMOE_DISPATCH(Y2.device, topk_combine, Y2, topk_weights, out, s);
}

void topk_combine_backward(const Tensor& dOut, const Tensor& Y2, const Tensor& topk_weights, const Tensor& dY2,
                           const Tensor& d_topk_weights, Stream s) {
  const char* op = "topk_combine_backward";
  const RouteDims d = check_topk_combine(op, Y2, topk_weights, dOut, "dOut");
  if (dY2.defined()) check_tensor(op, "dY2", dY2, {Y2.shape[0], Y2.shape[1]}, kFloat, &Y2.device);
  if (d_topk_weights.defined())
    check_tensor(op, "d_topk_weights", d_topk_weights, {d.T, d.top_k}, kFloat, &Y2.device);
  FUSEDMOE_DISPATCH(Y2.device, topk_combine_backward, dOut, Y2, topk_weights, dY2, d_topk_weights, s);
}

void route_topk_backward(const Tensor& logits, const Tensor& topk_ids, const Tensor& d_topk_weights,
                         bool norm_topk_prob, const Tensor& d_logits, Stream s) {
  const char* op = "route_topk_backward";
  check_tensor(op, "logits", logits, {kAny, kAny}, kFloat);
  const int64_t T = logits.shape[0], E = logits.shape[1];
  check_tensor(op, "topk_ids", topk_ids, {T, kAny}, kInt32, &logits.device);
  const int64_t k = topk_ids.shape[1];
  if (k < 1 || k > E) fail(op, "argument 'topk_ids' must have 1 to E columns, got " + topk_ids.describe());
  check_tensor(op, "d_topk_weights", d_topk_weights, {T, k}, kFloat, &logits.device);
  check_tensor(op, "d_logits", d_logits, {T, E}, kFloat, &logits.device);
  if (logits.device.type == DeviceType::cpu) {
    const int32_t* ids = topk_ids.ptr<const int32_t>();
    for (int64_t i = 0; i < T * k; ++i)
      if (ids[i] < 0 || ids[i] >= E)
        fail(op, "argument 'topk_ids' holds " + std::to_string(ids[i]) + "; expected an expert id in [0, " +
                     std::to_string(E) + ")");
  }
  FUSEDMOE_DISPATCH(logits.device, route_topk_backward, logits, topk_ids, d_topk_weights, norm_topk_prob, d_logits,
                    s);
}

void router_logits_backward(const Tensor& d_logits, const Tensor& x, const Tensor& gate, const Tensor& dx,
                            const Tensor& dgate, bool accumulate_dx, Stream s) {
  const char* op = "router_logits_backward";
  check_router_logits(x, gate, d_logits);
  if (dx.defined()) check_tensor(op, "dx", dx, {x.shape[0], x.shape[1]}, kFloat, &x.device);
  if (dgate.defined()) check_tensor(op, "dgate", dgate, {gate.shape[0], gate.shape[1]}, kFloat, &x.device);
  FUSEDMOE_DISPATCH(x.device, router_logits_backward, d_logits, x, gate, dx, dgate, accumulate_dx, Tensor{}, s);
}

}  // namespace fusedmoe
