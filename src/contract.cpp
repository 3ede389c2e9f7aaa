#include "contract.hpp"

#include <sstream>
#include <vector>

namespace fusedmoe::detail {

namespace {
std::string shape_string(std::initializer_list<int64_t> shape) {
  std::ostringstream os;
  os << "[";
  int i = 0;
  for (int64_t s : shape) os << (i++ ? ", " : "") << (s == kAny ? std::string("*") : std::to_string(s));
  os << "]";
  return os.str();
}

std::string dtypes_string(DTypeMask m) {
  std::string s;
  for (DType d : {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64})
    if (m & mask(d)) s += (s.empty() ? "" : " or ") + std::string(dtype_name(d));
  return s;
}
}  // namespace

void fail(const char* op, const std::string& message) { throw Error(std::string(op) + ": " + message); }

void check_tensor(const char* op, const char* name, const Tensor& t, std::initializer_list<int64_t> shape,
                  DTypeMask dtypes, const Device* device) {
  const std::string arg = std::string("argument '") + name + "'";
  if (!t.defined()) fail(op, arg + " is required (expected shape " + shape_string(shape) + "), got none");
  bool shape_ok = t.ndim == static_cast<int>(shape.size());
  if (shape_ok) {
    int d = 0;
    for (int64_t s : shape) {
      if (t.shape[d] < 0 || (s != kAny && t.shape[d] != s)) shape_ok = false;
      ++d;
    }
  }
  if (!shape_ok) fail(op, arg + " expected shape " + shape_string(shape) + ", got " + t.describe());
  if (!(dtypes & mask(t.dtype)))
    fail(op, arg + " expected dtype " + dtypes_string(dtypes) + ", got " + t.describe());
  if (!t.is_contiguous()) fail(op, arg + " must be contiguous (row-major), got " + t.describe());
  if (t.data == nullptr && t.numel() > 0) fail(op, arg + " has a null data pointer");
  if (device && t.device != *device)
    fail(op, arg + " expected to be on " + device_name(*device) + " like the other arguments, got " + t.describe());
  if (t.device.type == DeviceType::cuda && t.data != nullptr &&
      reinterpret_cast<uintptr_t>(t.data) % dtype_size(t.dtype) != 0)
    fail(op, arg + " is not aligned to its element size");
}

void check_same_dtype(const char* op, const char* name, const Tensor& t, const char* ref_name, const Tensor& ref) {
  if (t.dtype != ref.dtype)
    fail(op, std::string("argument '") + name + "' expected dtype " + dtype_name(ref.dtype) + " (that of '" +
                 ref_name + "'), got " + t.describe());
}

RouteDims check_router_logits(const Tensor& x, const Tensor& gate, const Tensor& logits) {
  const char* op = "router_logits";
  check_tensor(op, "x", x, {kAny, kAny}, kFloat);
  const int64_t T = x.shape[0], H = x.shape[1];
  check_tensor(op, "gate", gate, {kAny, H}, kFloat, &x.device);
  check_same_dtype(op, "gate", gate, "x", x);
  const int64_t E = gate.shape[0];
  if (E < 1) fail(op, "argument 'gate' must have at least one expert row");
  check_tensor(op, "logits", logits, {T, E}, kFloat, &x.device);
  return {T, static_cast<int>(E), 0};
}

RouteDims check_route_topk(const Tensor& logits, int top_k, const Tensor& weights, const Tensor& ids) {
  const char* op = "route_topk";
  check_tensor(op, "logits", logits, {kAny, kAny}, kFloat);
  const int64_t T = logits.shape[0], E = logits.shape[1];
  if (top_k < 1 || top_k > E)
    fail(op, "argument 'top_k' must be in [1, " + std::to_string(E) + "] (the number of experts), got " +
                 std::to_string(top_k));
  check_tensor(op, "topk_weights", weights, {T, top_k}, kFloat, &logits.device);
  check_tensor(op, "topk_ids", ids, {T, top_k}, kInt32, &logits.device);
  return {T, static_cast<int>(E), top_k};
}

RouteDims check_sort_by_expert(const Tensor& ids, int num_experts, const Tensor& gather, const Tensor& m_sizes,
                               const Tensor& offsets) {
  const char* op = "sort_by_expert";
  check_tensor(op, "topk_ids", ids, {kAny, kAny}, kInt32);
  const int64_t T = ids.shape[0], k = ids.shape[1];
  if (num_experts < 1) fail(op, "argument 'num_experts' must be >= 1, got " + std::to_string(num_experts));
  if (k < 1 || k > num_experts)
    fail(op, "argument 'topk_ids' has " + std::to_string(k) + " columns; expected 1 to num_experts (" +
                 std::to_string(num_experts) + ")");
  if (T * k >= (int64_t{1} << 31)) fail(op, "argument 'topk_ids' has T*k >= 2^31 slots; not supported");
  check_tensor(op, "gather_indices", gather, {T * k}, kInt32, &ids.device);
  check_tensor(op, "m_sizes", m_sizes, {num_experts}, kInt32, &ids.device);
  check_tensor(op, "expert_offsets", offsets, {num_experts + 1}, kInt32, &ids.device);
  return {T, num_experts, static_cast<int>(k)};
}

void check_routing_values(const char* op, const Tensor& offsets, const Tensor* gather, int64_t M) {
  if (offsets.device.type != DeviceType::cpu) return;  // device values are clamped by the kernels instead
  const int32_t* o = offsets.ptr<const int32_t>();
  const int64_t E = offsets.shape[0] - 1;
  if (o[0] != 0) fail(op, "argument 'expert_offsets' must start at 0, got " + std::to_string(o[0]));
  for (int64_t e = 0; e < E; ++e)
    if (o[e + 1] < o[e])
      fail(op, "argument 'expert_offsets' must be non-decreasing; offsets[" + std::to_string(e + 1) + "] = " +
                   std::to_string(o[e + 1]) + " < offsets[" + std::to_string(e) + "] = " + std::to_string(o[e]));
  if (o[E] != M)
    fail(op, "argument 'expert_offsets' must end at the number of routed rows " + std::to_string(M) + ", got " +
                 std::to_string(o[E]));
  if (gather) {
    const int32_t* g = gather->ptr<const int32_t>();
    for (int64_t i = 0; i < M; ++i)
      if (g[i] < 0 || g[i] >= M)
        fail(op, "argument 'gather_indices' holds " + std::to_string(g[i]) + " at " + std::to_string(i) +
                     "; expected a slot in [0, " + std::to_string(M) + ")");
  }
}

GemmDims check_grouped_gemm(const char* op, const Tensor& X, const char* x_name, bool x_rows_tokens_ok,
                            const Tensor& W, const GroupedGemmArgs& args, const Tensor& Y, const char* y_name,
                            int64_t y_cols) {
  // X is the row operand: [T,K] (token rows, when x_rows_tokens_ok and permute_x) or [M,K].
  check_tensor(op, x_name, X, {kAny, kAny}, kFloat);
  const Device& dev = X.device;
  check_tensor(op, "W", W, {kAny, kAny, kAny}, kFloat, &dev);
  check_same_dtype(op, "W", W, x_name, X);
  const int E = static_cast<int>(W.shape[0]);
  if (E < 1) fail(op, "argument 'W' must hold at least one expert");
  check_tensor(op, "expert_offsets", args.expert_offsets, {E + 1}, kInt32, &dev);
  if (args.top_k < 1) fail(op, "argument 'top_k' must be >= 1, got " + std::to_string(args.top_k));
  const bool need_gather = args.permute_x || args.permute_y;
  GemmDims d{};
  d.E = E;
  d.top_k = args.top_k;
  if (need_gather) {
    check_tensor(op, "gather_indices", args.gather_indices, {kAny}, kInt32, &dev);
    d.M = args.gather_indices.shape[0];
  } else {
    d.M = Y.defined() && Y.ndim == 2 ? Y.shape[0] : X.shape[0];
  }
  if (d.M % args.top_k != 0)
    fail(op, "the number of routed rows (" + std::to_string(d.M) + ") must be a multiple of top_k (" +
                 std::to_string(args.top_k) + ")");
  d.T = d.M / args.top_k;
  if (d.M >= (int64_t{1} << 31)) fail(op, "more than 2^31 routed rows are not supported");
  const int64_t x_rows = (args.permute_x && x_rows_tokens_ok) ? d.T : d.M;
  if (X.shape[0] != x_rows)
    fail(op, std::string("argument '") + x_name + "' expected " + std::to_string(x_rows) + " rows (" +
                 (x_rows == d.T ? "tokens, permute_x" : "routed rows") + "), got " + X.describe());
  d.K = X.shape[1];
  d.N = y_cols;
  (void)Y;
  (void)y_name;
  check_routing_values(op, args.expert_offsets, need_gather ? &args.gather_indices : nullptr, d.M);
  return d;
}

void check_silu_mul(const char* op, const Tensor& Y1, const Tensor& A, const char* a_name) {
  check_tensor(op, "Y1", Y1, {kAny, kAny}, kFloat);
  if (Y1.shape[1] % 2 != 0) fail(op, "argument 'Y1' must have an even number of columns [gate | up], got " + Y1.describe());
  check_tensor(op, a_name, A, {Y1.shape[0], Y1.shape[1] / 2}, kFloat, &Y1.device);
}

RouteDims check_topk_combine(const char* op, const Tensor& Y2, const Tensor& weights, const Tensor& out,
                             const char* out_name) {
  check_tensor(op, "topk_weights", weights, {kAny, kAny}, kFloat);
  const int64_t T = weights.shape[0], k = weights.shape[1];
  if (k < 1) fail(op, "argument 'topk_weights' must have at least one column");
  check_tensor(op, "Y2", Y2, {T * k, kAny}, kFloat, &weights.device);
  check_tensor(op, out_name, out, {T, Y2.shape[1]}, kFloat, &weights.device);
  return {T, 0, static_cast<int>(k)};
}

void check_config(const MoeConfig& c) {
  const char* op = "MoeConfig";
  if (c.hidden_size < 1) fail(op, "hidden_size must be >= 1, got " + std::to_string(c.hidden_size));
  if (c.intermediate_size < 1) fail(op, "intermediate_size must be >= 1, got " + std::to_string(c.intermediate_size));
  if (c.num_experts < 1) fail(op, "num_experts must be >= 1, got " + std::to_string(c.num_experts));
  if (c.top_k < 1 || c.top_k > c.num_experts)
    fail(op, "top_k must be in [1, num_experts = " + std::to_string(c.num_experts) + "], got " + std::to_string(c.top_k));
  if (!is_floating(c.dtype)) fail(op, std::string("dtype must be a floating type, got ") + dtype_name(c.dtype));
  check_tiling("MoeConfig.kernels.forward", c.kernels.forward, /*multicast=*/true);
  check_tiling("MoeConfig.kernels.backward_dx", c.kernels.backward_dx, /*multicast=*/true);
  check_tiling("MoeConfig.kernels.backward_dw", c.kernels.backward_dw, /*multicast=*/false);
}

void check_tiling(const char* what, const GemmTiling& t, bool multicast) {
  const int kernel = static_cast<int>(t.kernel);
  if (kernel < 0 || kernel > 2) fail(what, "kernel must be automatic, wgmma or portable, got " + std::to_string(kernel));
  const bool portable = t.kernel == GemmKernel::portable;
  if (t.block_n != 0 && t.block_n != 128 && !(t.block_n == 256 && !portable))
    fail(what, std::string("block_n must be 0 (heuristic), 128") + (portable ? "" : " or 256") +
                   (portable ? " for the portable kernel" : "") + ", got " + std::to_string(t.block_n));
  const int max_cluster = multicast && !portable ? 2 : 1;
  if (t.cluster_m < 0 || t.cluster_m > max_cluster)
    fail(what, "cluster_m must be in [0, " + std::to_string(max_cluster) + "]" +
                   (max_cluster == 1 ? (portable ? " for the portable kernel" : " (dW has no shared weight tile)") : "") +
                   ", got " + std::to_string(t.cluster_m));
}

int64_t check_tokens(const char* op, const MoeConfig& c, const Tensor& x) {
  check_config(c);
  check_tensor(op, "x", x, {kAny, c.hidden_size}, mask(c.dtype));
  const int64_t T = x.shape[0];
  if (T * c.top_k >= (int64_t{1} << 31)) fail(op, "argument 'x': T*top_k must be < 2^31");
  return T;
}

void check_weights(const char* op, const MoeConfig& c, const MoeWeights& w, const Device& dev, bool with_gate) {
  const DTypeMask dt = mask(c.dtype);
  const int64_t H = c.hidden_size, I = c.intermediate_size, E = c.num_experts;
  if (with_gate) check_tensor(op, "gate", w.gate, {E, H}, dt, &dev);
  check_tensor(op, "gate_up_proj", w.gate_up_proj, {E, 2 * I, H}, dt, &dev);
  check_tensor(op, "down_proj", w.down_proj, {E, H, I}, dt, &dev);
}

void check_expert_saved(const char* op, const MoeConfig& c, int64_t T, const MoeSaved& s, const Device& dev,
                        bool backward) {
  const int64_t M = T * c.top_k;
  check_tensor(op, "saved.gather_indices", s.gather_indices, {M}, kInt32, &dev);
  check_tensor(op, "saved.m_sizes", s.m_sizes, {c.num_experts}, kInt32, &dev);
  check_tensor(op, "saved.expert_offsets", s.expert_offsets, {c.num_experts + 1}, kInt32, &dev);
  if (backward && !s.gate_up_out.defined())
    fail(op, "argument 'saved.gate_up_out' is required: the forward must keep it for backward "
             "(moe_saved_views with keep_gate_up = true), got none");
  if (s.gate_up_out.defined())  // optional in forward (inference)
    check_tensor(op, "saved.gate_up_out", s.gate_up_out, {M, 2 * c.intermediate_size}, mask(c.dtype), &dev);
}

void check_saved(const char* op, const MoeConfig& c, int64_t T, const MoeSaved& s, const Device& dev, bool backward) {
  check_tensor(op, "saved.topk_weights", s.topk_weights, {T, c.top_k}, mask(c.dtype), &dev);
  check_tensor(op, "saved.topk_ids", s.topk_ids, {T, c.top_k}, kInt32, &dev);
  check_expert_saved(op, c, T, s, dev, backward);
}

void check_workspace(const char* op, const Workspace& ws, size_t needed) {
  if (ws.bytes < needed || (needed > 0 && ws.data == nullptr))
    fail(op, "argument 'workspace' needs " + std::to_string(needed) + " bytes, got " + std::to_string(ws.bytes));
  if (reinterpret_cast<uintptr_t>(ws.data) % 256 != 0) fail(op, "argument 'workspace' must be 256-byte aligned");
}

}  // namespace fusedmoe::detail
