// The whole MoE block as a sequence of backend ops (DESIGN.md §3, §4).
#include "fusedmoe/block.hpp"

#include <algorithm>
#include <vector>

#include "contract.hpp"
#include "dispatch.hpp"

namespace fusedmoe {

using namespace detail;

void MoeConfig::validate() const { check_config(*this); }

double MoeConfig::forward_flops(int64_t tokens) const {
  return 6.0 * static_cast<double>(tokens) * top_k * static_cast<double>(hidden_size) *
         static_cast<double>(intermediate_size);
}

double MoeConfig::backward_flops(int64_t tokens, bool with_dW) const {
  return (with_dW ? 2.0 : 1.0) * forward_flops(tokens);
}

MoeConfig qwen3_30b_a3b_config() { return MoeConfig{2048, 768, 128, 8, true, DType::bf16}; }
MoeConfig qwen3_235b_a22b_config() { return MoeConfig{4096, 1536, 128, 8, true, DType::bf16}; }

namespace {

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Lays out consecutive tensors in one allocation: first with data == nullptr to count bytes, then for real.
class Carver {
 public:
  Carver(void* base, Device device) : base_(static_cast<char*>(base)), device_(device) {}
  Tensor take(DType dtype, std::initializer_list<int64_t> shape) {
    Tensor t = Tensor::contiguous(base_ ? base_ + used_ : nullptr, dtype, shape, device_);
    used_ += align_up(t.nbytes());
    return t;
  }
  // A tensor over the bytes from offset `from` (an earlier used() value), which may already hold tensors whose
  // lifetime ends before this one's begins; the layout grows where it is the longer.
  Tensor overlay(size_t from, DType dtype, std::initializer_list<int64_t> shape) {
    Tensor t = Tensor::contiguous(base_ ? base_ + from : nullptr, dtype, shape, device_);
    used_ = std::max(used_, from + align_up(t.nbytes()));
    return t;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  Device device_;
  size_t used_ = 0;
};

MoeSaved carve_saved(const MoeConfig& c, int64_t T, bool keep_gate_up, Carver& cv) {
  const int64_t M = T * c.top_k;
  MoeSaved s;
  s.topk_weights = cv.take(c.dtype, {T, c.top_k});
  s.topk_ids = cv.take(DType::i32, {T, c.top_k});
  s.gather_indices = cv.take(DType::i32, {M});
  s.m_sizes = cv.take(DType::i32, {c.num_experts});
  s.expert_offsets = cv.take(DType::i32, {c.num_experts + 1});
  if (keep_gate_up) s.gate_up_out = cv.take(c.dtype, {M, 2 * c.intermediate_size});
  return s;
}

// unit_counter: the expert GEMMs' work-unit counter (GemmNT), for one GEMM at a time.
struct ForwardScratch { Tensor act, down_out, sort_counts, unit_counter; };
ForwardScratch carve_forward(const MoeConfig& c, int64_t T, Carver& cv) {
  const int64_t M = T * c.top_k;
  return {cv.take(c.dtype, {M, c.intermediate_size}), cv.take(c.dtype, {M, c.hidden_size}),
          cv.take(DType::i32, {sort_scratch_elements(M, c.num_experts)}), cv.take(DType::i32, {1})};
}

// What the experts' backward computes, from the gradients wanted.
struct ExpertsPlan {
  bool d_weights;  // dw = ⟨dA_raw, A⟩
  bool d_gate_up;  // dY1: needed for dx and d_gate_up_proj
  bool act;        // w·A materialised: needed for d_down_proj
  bool d_act_raw;  // dA_raw = dOut·W2: needed for dw and dY1
  bool dx;         // dx: its k-slot products need [M, H] of scratch
};
ExpertsPlan plan_experts(const MoeExpertGrads& g) {
  ExpertsPlan p{};
  p.d_weights = g.d_topk_weights.defined();
  p.d_gate_up = g.dx.defined() || g.d_gate_up_proj.defined();
  p.act = g.d_down_proj.defined();
  p.d_act_raw = p.d_weights || p.d_gate_up;
  p.dx = g.dx.defined();
  return p;
}

// Reductions feeding dw and the router stay in float32 (float64 for float64 inputs).
DType acc_dtype(const MoeConfig& c) { return c.dtype == DType::f64 ? DType::f64 : DType::f32; }

struct ExpertsScratch { Tensor d_act_raw, d_gate_up, act, dx_slots, dgate_partials, unit_counter; };
// dgate_partials: [chunks, E, H] float32 for the router's split dgate reduction (block backward; chunks = 0: none),
// which runs right after routed_silu_backward: over dA_raw, dead by then, where it fits there.
ExpertsScratch carve_experts_backward(const MoeConfig& c, int64_t T, const ExpertsPlan& p, Carver& cv,
                                      int64_t dgate_chunks = 0) {
  const int64_t M = T * c.top_k, I = c.intermediate_size;
  ExpertsScratch s;
  if (p.d_act_raw || p.dx) s.unit_counter = cv.take(DType::i32, {1});  // the dA and dX GEMMs' (GemmNN)
  if (p.d_gate_up) s.d_gate_up = cv.take(c.dtype, {M, 2 * I});
  // dA_raw (a GEMM output, fp32-accumulated) is stored in the activation dtype like Y1, A and dY1: it is the
  // dA GEMM's largest write and routed_silu_backward's largest read, and dw sums its products in float32.
  const size_t dead_by_dx = cv.used();
  if (p.d_act_raw) s.d_act_raw = cv.take(c.dtype, {M, I});
  if (p.act) s.act = cv.take(c.dtype, {M, I});
  if (dgate_chunks > 0) {
    const size_t bytes = static_cast<size_t>(dgate_chunks * c.num_experts * c.hidden_size) * sizeof(float);
    s.dgate_partials = p.d_act_raw && bytes <= s.d_act_raw.nbytes()
                           ? cv.overlay(dead_by_dx, DType::f32, {dgate_chunks, c.num_experts, c.hidden_size})
                           : cv.take(DType::f32, {dgate_chunks, c.num_experts, c.hidden_size});
  }
  // dX's k-slot products ([M, H]) are written after dW2 and routed_silu_backward have read dA_raw and w·A for
  // the last time: they reuse that region (grown to M·H where 2I < H) rather than a pool allocation besides it.
  if (p.dx) s.dx_slots = cv.overlay(dead_by_dx, c.dtype, {M, c.hidden_size});
  return s;
}

// The block's backward: the router's scratch, then the experts' scratch. The router's logit gradient is kept in
// the activation dtype for 16-bit configs, the dtype its GEMMs run in on tensor cores. Its dgate reduction may be
// split into row chunks whose float32 partials ([max_split_k(T), E, H]) sit in the experts' scratch.
struct RouterScratch { Tensor d_weights, d_logits; };
bool wants_router(const MoeGrads& g) { return g.dx.defined() || g.d_gate.defined(); }
RouterScratch carve_router_backward(const MoeConfig& c, int64_t T, bool router, Carver& cv) {
  RouterScratch s;
  if (router) {
    s.d_weights = cv.take(acc_dtype(c), {T, c.top_k});
    const bool half = c.dtype == DType::bf16 || c.dtype == DType::f16;
    s.d_logits = cv.take(half ? c.dtype : acc_dtype(c), {T, c.num_experts});
  }
  return s;
}
int64_t dgate_split_chunks(int64_t T, bool d_gate) {
  const int64_t chunks = max_split_k(T);
  return d_gate && chunks > 1 ? chunks : 0;
}
MoeExpertGrads expert_grads_of(const MoeGrads& g, const Tensor& d_weights) {
  return {g.dx, d_weights, g.d_gate_up_proj, g.d_down_proj};
}

Routing routing_of(const MoeConfig& c, int64_t T, const MoeSaved& s) {
  Routing r;
  r.expert_offsets = s.expert_offsets;
  r.gather_indices = s.gather_indices;
  r.num_experts = c.num_experts;
  r.top_k = c.top_k;
  r.T = T;
  r.M = T * c.top_k;
  return r;
}

}  // namespace

size_t moe_saved_bytes(const MoeConfig& cfg, int64_t tokens, bool keep_gate_up) {
  check_config(cfg);
  Carver cv(nullptr, {});
  carve_saved(cfg, tokens, keep_gate_up, cv);
  return cv.used();
}

MoeSaved moe_saved_views(const MoeConfig& cfg, int64_t tokens, void* memory, Device device, bool keep_gate_up) {
  check_config(cfg);
  if (memory == nullptr) fail("moe_saved_views", "argument 'memory' is null");
  if (reinterpret_cast<uintptr_t>(memory) % kAlign != 0) fail("moe_saved_views", "argument 'memory' must be 256-byte aligned");
  Carver cv(memory, device);
  return carve_saved(cfg, tokens, keep_gate_up, cv);
}

size_t moe_forward_workspace_bytes(const MoeConfig& cfg, int64_t tokens) {
  check_config(cfg);
  Carver cv(nullptr, {});
  carve_forward(cfg, tokens, cv);
  return cv.used();
}

size_t moe_experts_backward_workspace_bytes(const MoeConfig& cfg, int64_t tokens, const MoeExpertGrads& wanted) {
  check_config(cfg);
  Carver cv(nullptr, {});
  carve_experts_backward(cfg, tokens, plan_experts(wanted), cv);
  return cv.used();
}

size_t moe_backward_workspace_bytes(const MoeConfig& cfg, int64_t tokens, const MoeGrads& wanted) {
  check_config(cfg);
  Carver cv(nullptr, {});
  const RouterScratch r = carve_router_backward(cfg, tokens, wants_router(wanted), cv);
  Carver experts(nullptr, {});
  carve_experts_backward(cfg, tokens, plan_experts(expert_grads_of(wanted, r.d_weights)), experts,
                         dgate_split_chunks(tokens, wanted.d_gate.defined()));
  return cv.used() + experts.used();
}

namespace {

void check_routing(const char* op, const MoeConfig& c, int64_t T, const Tensor& weights, const Tensor& ids,
                   const Device& dev) {
  check_tensor(op, "topk_weights", weights, {T, c.top_k}, kFloat, &dev);
  check_tensor(op, "topk_ids", ids, {T, c.top_k}, kInt32, &dev);
}

// The experts' forward, arguments checked. logits: the router's, for the routing (route_topk) and the sort in one
// backend call (the block's forward); null: topk_weights and topk_ids are given, only the sort runs.
void experts_forward(const MoeConfig& cfg, int64_t T, const Tensor& x, const Tensor& topk_weights,
                     const Tensor& topk_ids, const MoeWeights& w, const Tensor& out, const MoeSaved& saved,
                     Workspace ws, Stream s, const Tensor* logits = nullptr) {
  const Device dev = x.device;
  Carver cv(ws.data, dev);
  const ForwardScratch tmp = carve_forward(cfg, T, cv);
  const Routing r = routing_of(cfg, T, saved);
  if (logits != nullptr)
    FUSEDMOE_DISPATCH(dev, route_and_sort, *logits, cfg.top_k, cfg.norm_topk_prob, topk_weights, topk_ids,
                      cfg.num_experts, saved.gather_indices, saved.m_sizes, saved.expert_offsets, tmp.sort_counts, s);
  else
    FUSEDMOE_DISPATCH(dev, sort_by_expert, topk_ids, cfg.num_experts, saved.gather_indices, saved.m_sizes,
                      saved.expert_offsets, tmp.sort_counts, s);
  // GEMM1 with the token gather fused into its row loads: Y1 = x[gather/k] · W1ᵀ (expert order), and
  // A = silu(gate)·up of Y1 (fused into the GEMM's epilogue where the backend can). Without saved.gate_up_out
  // (inference) only A is produced.
  FUSEDMOE_DISPATCH(dev, gemm_nt, r,
                    GemmNT{x, RowMap::token, w.gate_up_proj, saved.gate_up_out, RowMap::identity, {}, tmp.act,
                           cfg.kernels.forward, tmp.unit_counter}, s);
  // GEMM2 with the scatter to slot order fused into its stores.
  FUSEDMOE_DISPATCH(dev, gemm_nt, r, GemmNT{tmp.act, RowMap::identity, w.down_proj, tmp.down_out, RowMap::slot, {}, {},
                                            cfg.kernels.forward, tmp.unit_counter}, s);
  FUSEDMOE_DISPATCH(dev, topk_combine, tmp.down_out, topk_weights, out, s);
}

// What the block's backward runs inside the experts' backward: the router's gradients, as soon as dw is known.
struct RouterStep {
  const Tensor* logits = nullptr;  // null: none (the experts' backward alone)
  const RouterScratch* scratch = nullptr;
  const Tensor* gate = nullptr;
  Tensor d_gate;
};

// The experts' backward, arguments checked. With a router step, the router's part of dx is written first and the
// experts' k-slot sums are added to it: the router's dx GEMM then stores its tiles without reading dx back.
void experts_backward(const MoeConfig& cfg, int64_t T, const Tensor& d_out, const Tensor& x, const Tensor& topk_weights,
                      const MoeWeights& w, const MoeSaved& saved, const MoeExpertGrads& g, Workspace ws, Stream s,
                      const RouterStep& router = {}) {
  const Device dev = x.device;
  const ExpertsPlan p = plan_experts(g);
  Carver cv(ws.data, dev);
  const ExpertsScratch tmp =
      carve_experts_backward(cfg, T, p, cv, router.logits ? dgate_split_chunks(T, router.d_gate.defined()) : 0);
  const Routing r = routing_of(cfg, T, saved);
  const Tensor& Y1 = saved.gate_up_out;
  // dA_raw[i] = dOut[t_i] · W2[e(i)]; then dw, dY1 and w·A in one elementwise pass.
  if (p.d_act_raw)
    FUSEDMOE_DISPATCH(dev, gemm_nn, r, GemmNN{d_out, RowMap::token, w.down_proj, tmp.d_act_raw, RowMap::identity, false,
                                              cfg.kernels.backward_dx, {}, tmp.unit_counter}, s);
  if (p.d_act_raw || p.act)
    FUSEDMOE_DISPATCH(dev, routed_silu_backward, r, tmp.d_act_raw, Y1, topk_weights, tmp.d_gate_up, tmp.act,
                      g.d_topk_weights, s);
  if (router.logits) {  // dw -> d_logits -> dgate and the router's dx
    FUSEDMOE_DISPATCH(dev, route_topk_backward, *router.logits, saved.topk_ids, router.scratch->d_weights,
                      cfg.norm_topk_prob, router.scratch->d_logits, s);
    FUSEDMOE_DISPATCH(dev, router_logits_backward, router.scratch->d_logits, x, *router.gate, g.dx, router.d_gate,
                      /*accumulate_dx=*/false, tmp.dgate_partials, s);
  }
  if (g.d_down_proj.defined())  // dW2[e] = Σ (w·dOut[t_i])ᵀ · A[i] = Σ dOut[t_i]ᵀ · (w·A[i])
    FUSEDMOE_DISPATCH(dev, gemm_tn, r, GemmTN{d_out, RowMap::token, tmp.act, RowMap::identity, g.d_down_proj,
                                              cfg.kernels.backward_dw}, s);
  if (g.d_gate_up_proj.defined())  // dW1[e] = Σ dY1[i]ᵀ · x[t_i]
    FUSEDMOE_DISPATCH(dev, gemm_tn, r, GemmTN{tmp.d_gate_up, RowMap::identity, x, RowMap::token, g.d_gate_up_proj,
                                              cfg.kernels.backward_dw}, s);
  if (g.dx.defined())  // dx[t] = Σ_j dY1[row(t,j)] · W1[e]
    FUSEDMOE_DISPATCH(dev, gemm_nn, r, GemmNN{tmp.d_gate_up, RowMap::identity, w.gate_up_proj, g.dx, RowMap::token,
                                              /*accumulate=*/router.logits != nullptr, cfg.kernels.backward_dx,
                                              tmp.dx_slots, tmp.unit_counter}, s);
}

void check_expert_grads(const char* op, const MoeConfig& c, int64_t T, const MoeExpertGrads& g, const Device& dev) {
  const DTypeMask dt = mask(c.dtype);
  const int64_t H = c.hidden_size, I = c.intermediate_size, E = c.num_experts;
  if (g.dx.defined()) check_tensor(op, "grads.dx", g.dx, {T, H}, dt, &dev);
  if (g.d_topk_weights.defined())
    check_tensor(op, "grads.d_topk_weights", g.d_topk_weights, {T, c.top_k}, mask(acc_dtype(c)) | dt, &dev);
  if (g.d_gate_up_proj.defined()) check_tensor(op, "grads.d_gate_up_proj", g.d_gate_up_proj, {E, 2 * I, H}, dt, &dev);
  if (g.d_down_proj.defined()) check_tensor(op, "grads.d_down_proj", g.d_down_proj, {E, H, I}, dt, &dev);
}

Workspace after(Workspace ws, size_t used) {
  return {ws.data ? static_cast<char*>(ws.data) + used : nullptr, ws.bytes >= used ? ws.bytes - used : 0};
}

}  // namespace

void moe_experts_forward(const MoeConfig& cfg, const Tensor& x, const Tensor& topk_weights, const Tensor& topk_ids,
                         const MoeWeights& w, const Tensor& out, const MoeSaved& saved, Workspace ws, Stream s) {
  const char* op = "moe_experts_forward";
  const int64_t T = check_tokens(op, cfg, x);
  const Device dev = x.device;
  check_routing(op, cfg, T, topk_weights, topk_ids, dev);
  check_weights(op, cfg, w, dev, false);
  check_tensor(op, "out", out, {T, cfg.hidden_size}, mask(cfg.dtype), &dev);
  check_expert_saved(op, cfg, T, saved, dev, false);
  check_workspace(op, ws, moe_forward_workspace_bytes(cfg, T));
  experts_forward(cfg, T, x, topk_weights, topk_ids, w, out, saved, ws, s);
}

void moe_experts_backward(const MoeConfig& cfg, const Tensor& d_out, const Tensor& x, const Tensor& topk_weights,
                          const MoeWeights& w, const MoeSaved& saved, const MoeExpertGrads& g, Workspace ws,
                          Stream s) {
  const char* op = "moe_experts_backward";
  const int64_t T = check_tokens(op, cfg, x);
  const Device dev = x.device;
  check_tensor(op, "d_out", d_out, {T, cfg.hidden_size}, mask(cfg.dtype), &dev);
  check_tensor(op, "topk_weights", topk_weights, {T, cfg.top_k}, kFloat, &dev);
  check_weights(op, cfg, w, dev, false);
  check_expert_saved(op, cfg, T, saved, dev, true);
  check_expert_grads(op, cfg, T, g, dev);
  check_workspace(op, ws, moe_experts_backward_workspace_bytes(cfg, T, g));
  check_routing_values(op, saved.expert_offsets, &saved.gather_indices, T * cfg.top_k);
  experts_backward(cfg, T, d_out, x, topk_weights, w, saved, g, ws, s);
}

void moe_forward(const MoeConfig& cfg, const Tensor& x, const MoeWeights& w, const Tensor& out,
                 const Tensor& logits, const MoeSaved& saved, Workspace ws, Stream s) {
  const char* op = "moe_forward";
  const int64_t T = check_tokens(op, cfg, x);
  const Device dev = x.device;
  const DTypeMask dt = mask(cfg.dtype);
  check_weights(op, cfg, w, dev, true);
  check_tensor(op, "out", out, {T, cfg.hidden_size}, dt, &dev);
  check_tensor(op, "router_logits", logits, {T, cfg.num_experts}, dt, &dev);
  check_saved(op, cfg, T, saved, dev, false);
  check_workspace(op, ws, moe_forward_workspace_bytes(cfg, T));
  // The router's split-K partials (if its backend splits) go to the forward scratch's GEMM2 output, dead until then.
  Carver cv(ws.data, dev);
  FUSEDMOE_DISPATCH(dev, router_logits, x, w.gate, logits, carve_forward(cfg, T, cv).down_out, s);
  experts_forward(cfg, T, x, saved.topk_weights, saved.topk_ids, w, out, saved, ws, s, &logits);
}

void moe_backward(const MoeConfig& cfg, const Tensor& d_out, const Tensor& x, const MoeWeights& w,
                  const Tensor& logits, const MoeSaved& saved, const MoeGrads& g, Workspace ws, Stream s) {
  const char* op = "moe_backward";
  const int64_t T = check_tokens(op, cfg, x);
  const Device dev = x.device;
  const DTypeMask dt = mask(cfg.dtype);
  check_tensor(op, "d_out", d_out, {T, cfg.hidden_size}, dt, &dev);
  check_weights(op, cfg, w, dev, true);
  check_tensor(op, "router_logits", logits, {T, cfg.num_experts}, dt, &dev);
  check_saved(op, cfg, T, saved, dev, true);
  if (g.d_gate.defined()) check_tensor(op, "grads.d_gate", g.d_gate, {cfg.num_experts, cfg.hidden_size}, dt, &dev);
  check_expert_grads(op, cfg, T, {g.dx, {}, g.d_gate_up_proj, g.d_down_proj}, dev);
  check_workspace(op, ws, moe_backward_workspace_bytes(cfg, T, g));
  check_routing_values(op, saved.expert_offsets, &saved.gather_indices, T * cfg.top_k);

  const bool router = wants_router(g);
  Carver cv(ws.data, dev);
  const RouterScratch rs = carve_router_backward(cfg, T, router, cv);
  const RouterStep step = router ? RouterStep{&logits, &rs, &w.gate, g.d_gate} : RouterStep{};
  experts_backward(cfg, T, d_out, x, saved.topk_weights, w, saved, expert_grads_of(g, rs.d_weights),
                   after(ws, cv.used()), s, step);
}

}  // namespace fusedmoe
