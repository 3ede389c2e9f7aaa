// fusedmoe._C: the C++ API over DLPack tensors (any framework; no PyTorch needed to build).
// Arrays arrive as nanobind ndarrays (shape, element strides, dtype, device) and become fusedmoe::Tensor
// views; the caller passes its CUDA stream as an integer. Errors surface as ValueError.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <string>

#include "fusedmoe/fusedmoe.hpp"

namespace nb = nanobind;
using namespace fusedmoe;

namespace {

using Array = nb::ndarray<nb::ro>;
using OptArray = std::optional<Array>;

DType dtype_of(const nb::dlpack::dtype& d, const char* name) {
  using code = nb::dlpack::dtype_code;
  const auto c = static_cast<code>(d.code);
  if (d.lanes == 1) {
    if (c == code::Float && d.bits == 32) return DType::f32;
    if (c == code::Float && d.bits == 64) return DType::f64;
    if (c == code::Float && d.bits == 16) return DType::f16;
    if (c == code::Bfloat && d.bits == 16) return DType::bf16;
    if (c == code::Int && d.bits == 32) return DType::i32;
    if (c == code::Int && d.bits == 64) return DType::i64;
  }
  throw Error(std::string("argument '") + name + "' has an unsupported dtype (code " + std::to_string(d.code) +
              ", " + std::to_string(d.bits) + " bits)");
}

Device device_of(const Array& a, const char* name) {
  if (a.device_type() == nb::device::cpu::value) return Device::cpu();
  if (a.device_type() == nb::device::cuda::value) return Device::cuda(a.device_id());
  throw Error(std::string("argument '") + name + "' is on an unsupported device type " +
              std::to_string(a.device_type()));
}

Tensor view(const Array& a, const char* name) {
  if (a.ndim() > static_cast<size_t>(kMaxDims))
    throw Error(std::string("argument '") + name + "' has " + std::to_string(a.ndim()) + " dimensions; at most 4");
  Tensor t;
  t.data = const_cast<void*>(a.data());
  t.dtype = dtype_of(a.dtype(), name);
  t.ndim = static_cast<int>(a.ndim());
  for (int d = 0; d < t.ndim; ++d) {
    t.shape[d] = static_cast<int64_t>(a.shape(d));
    t.strides[d] = static_cast<int64_t>(a.stride(d));
  }
  t.device = device_of(a, name);
  return t;
}
Tensor view(const OptArray& a, const char* name) { return a ? view(*a, name) : Tensor{}; }

// The block's weights (the experts alone take no router: gate = nullptr).
MoeWeights weights_of(const Array* gate, const Array& w1, const Array& w2) {
  return {gate ? view(*gate, "gate") : Tensor{}, view(w1, "gate_up_proj"), view(w2, "down_proj")};
}

Stream stream_of(uintptr_t s) { return Stream{reinterpret_cast<void*>(s)}; }

// A 256-byte-aligned region of at least `needed` bytes inside a buffer of `bytes` bytes at `address` (allocated
// with 256 spare).
void* aligned_region(uintptr_t address, size_t bytes, size_t needed, const char* name) {
  const uintptr_t aligned = (address + 255) / 256 * 256;
  if (needed > 0 && (aligned - address) + needed > bytes)
    throw Error(std::string("argument '") + name + "' needs " + std::to_string(needed) +
                " bytes after 256-byte alignment, got " + std::to_string(bytes));
  return reinterpret_cast<void*>(aligned);
}
void* aligned_region(const Array& buf, size_t needed, const char* name) {
  return aligned_region(reinterpret_cast<uintptr_t>(buf.data()), buf.nbytes(), needed, name);
}

Workspace workspace_of(const Array& buf, size_t needed) {
  return {aligned_region(buf, needed, "workspace"), needed};
}

MoeSaved saved_of(const OptArray& topk_weights, const OptArray& topk_ids, const Array& gather, const Array& m_sizes,
                  const Array& offsets, const OptArray& y1) {
  MoeSaved s;
  s.topk_weights = view(topk_weights, "topk_weights");
  s.topk_ids = view(topk_ids, "topk_ids");
  s.gather_indices = view(gather, "gather_indices");
  s.m_sizes = view(m_sizes, "m_sizes");
  s.expert_offsets = view(offsets, "expert_offsets");
  s.gate_up_out = view(y1, "gate_up_out");
  return s;
}

// The saved state as one buffer (Python's eager path: one allocation in place of six), carved by moe_saved_views
// after 256-byte alignment. `extra` bytes after it: the forward's workspace where the caller passes none of its own
// (a call that keeps no state for backward: one allocation for both, and no Y1 when keep_gate_up is false).
MoeSaved saved_in(const MoeConfig& c, int64_t T, uintptr_t address, size_t bytes, Device device, size_t extra,
                  void** after, bool keep_gate_up) {
  const size_t need = moe_saved_bytes(c, T, keep_gate_up);
  void* base = aligned_region(address, bytes, need + extra, "saved");
  if (after != nullptr) *after = static_cast<char*>(base) + need;
  return moe_saved_views(c, T, base, device, keep_gate_up);
}

// The eager path's own allocations (Python's _ops makes them for this call: row-major, on x's device, shaped as the
// C++ side expects) arrive as addresses, not DLPack tensors: a conversion costs ~3 µs of host time each, in front of
// the first kernel. `like` gives dtype and device; address 0 marks an output not wanted (an undefined view).
Tensor own(uintptr_t address, const Tensor& like, std::initializer_list<int64_t> shape) {
  if (address == 0) return Tensor{};
  return Tensor::contiguous(reinterpret_cast<void*>(address), like.dtype, shape, like.device);
}

int64_t tokens_of(const Tensor& x) { return x.ndim ? x.shape[0] : 0; }

DType parse_dtype(const std::string& s) {
  if (s == "bfloat16") return DType::bf16;
  if (s == "float16") return DType::f16;
  if (s == "float32") return DType::f32;
  if (s == "float64") return DType::f64;
  throw Error("dtype must be one of bfloat16, float16, float32, float64; got '" + s + "'");
}

// A defined view with no memory marks a wanted output in workspace queries; undefined marks one not wanted.
// Kernel choices from Python: `families` (kernel, block_n, cluster_m) triples, or none at all (the heuristic).
std::vector<GemmTiling> tilings_of(const std::vector<int>& v, size_t families, const char* name) {
  if (v.empty()) return std::vector<GemmTiling>(families);
  if (v.size() != 3 * families)
    throw Error(std::string("argument '") + name + "' must be empty or hold " + std::to_string(families) +
                " (kernel, block_n, cluster_m) triple(s), got " + std::to_string(v.size()) + " ints");
  std::vector<GemmTiling> out;
  for (size_t f = 0; f < families; ++f)
    out.push_back(GemmTiling{static_cast<GemmKernel>(v[3 * f]), v[3 * f + 1], v[3 * f + 2]});
  return out;
}

Tensor wanted(bool on) {
  Tensor t;
  if (on) t.ndim = 1;
  return t;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "fusedmoe C++ core: the Qwen3-MoE block and its ops on the CPU and CUDA (sm_90a) backends";
  m.def("version", &version);
  m.def("cuda_available", &cuda_available, "True when a Hopper (sm_90) GPU is visible to this build");
  m.def("release_scratch_memory", &release_scratch_memory,
        "Hands the CUDA backend's cached scratch memory (kept between calls) back to the driver");
  m.def("built_with_cuda", [] {
#ifdef FUSEDMOE_WITH_CUDA
    return true;
#else
    return false;
#endif
  });

  nb::class_<MoeConfig>(m, "Config")
      .def("__init__",
           [](MoeConfig* c, int64_t hidden, int64_t intermediate, int experts, int top_k, bool norm,
              const std::string& dtype, const std::vector<int>& kernels) {
             new (c) MoeConfig{hidden, intermediate, experts, top_k, norm, parse_dtype(dtype)};
             // kernels: empty (the heuristic) or the forward, dX and dW choices.
             const std::vector<GemmTiling> t = tilings_of(kernels, 3, "kernels");
             c->kernels = {t[0], t[1], t[2]};
             c->validate();
           },
           nb::arg("hidden_size"), nb::arg("intermediate_size"), nb::arg("num_experts"), nb::arg("top_k"),
           nb::arg("norm_topk_prob"), nb::arg("dtype"), nb::arg("kernels") = std::vector<int>{})
      .def_ro("hidden_size", &MoeConfig::hidden_size)
      .def_ro("intermediate_size", &MoeConfig::intermediate_size)
      .def_ro("num_experts", &MoeConfig::num_experts)
      .def_ro("top_k", &MoeConfig::top_k)
      .def_ro("norm_topk_prob", &MoeConfig::norm_topk_prob)
      .def("forward_flops", &MoeConfig::forward_flops)
      .def("backward_flops", &MoeConfig::backward_flops);

  // ---- ops ----
  m.def("router_logits", [](const Array& x, const Array& gate, const Array& logits, uintptr_t s) {
    nb::gil_scoped_release g;
    router_logits(view(x, "x"), view(gate, "gate"), view(logits, "logits"), stream_of(s));
  });
  m.def("route_topk", [](const Array& logits, int k, bool norm, const Array& w, const Array& ids, uintptr_t s) {
    nb::gil_scoped_release g;
    route_topk(view(logits, "logits"), k, norm, view(w, "topk_weights"), view(ids, "topk_ids"), stream_of(s));
  });
  m.def("route_topk_backward", [](const Array& logits, const Array& ids, const Array& dw, bool norm, const Array& dl,
                                  uintptr_t s) {
    nb::gil_scoped_release g;
    route_topk_backward(view(logits, "logits"), view(ids, "topk_ids"), view(dw, "d_topk_weights"), norm,
                        view(dl, "d_logits"), stream_of(s));
  });
  m.def("router_logits_backward", [](const Array& dl, const Array& x, const Array& gate, const OptArray& dx,
                                     const OptArray& dgate, bool acc, uintptr_t s) {
    nb::gil_scoped_release g;
    router_logits_backward(view(dl, "d_logits"), view(x, "x"), view(gate, "gate"), view(dx, "dx"),
                           view(dgate, "dgate"), acc, stream_of(s));
  }, nb::arg("d_logits"), nb::arg("x"), nb::arg("gate"), nb::arg("dx").none(), nb::arg("dgate").none(),
     nb::arg("accumulate_dx"), nb::arg("stream"));
  m.def("sort_by_expert", [](const Array& ids, int E, const Array& gather, const Array& m_sizes, const Array& offsets,
                             uintptr_t s) {
    nb::gil_scoped_release g;
    sort_by_expert(view(ids, "topk_ids"), E, view(gather, "gather_indices"), view(m_sizes, "m_sizes"),
                   view(offsets, "expert_offsets"), stream_of(s));
  });
  // tiling: empty (the heuristic) or (kernel, block_n, cluster_m).
  auto args_of = [](const Array& offsets, const OptArray& gather, int k, bool px, bool py,
                    const std::vector<int>& tiling) {
    return GroupedGemmArgs{view(offsets, "expert_offsets"), view(gather, "gather_indices"), k, px, py,
                           tilings_of(tiling, 1, "tiling")[0]};
  };
  m.def("grouped_gemm", [args_of](const Array& X, const Array& W, const Array& offsets, const OptArray& gather, int k,
                                  bool px, bool py, const Array& Y, const OptArray& row_weights, uintptr_t s,
                                  const std::vector<int>& tiling) {
    nb::gil_scoped_release g;
    grouped_gemm(view(X, "X"), view(W, "W"), args_of(offsets, gather, k, px, py, tiling), view(Y, "Y"),
                 view(row_weights, "row_weights"), stream_of(s));
  }, nb::arg("X"), nb::arg("W"), nb::arg("expert_offsets"), nb::arg("gather_indices").none(), nb::arg("top_k"),
     nb::arg("permute_x"), nb::arg("permute_y"), nb::arg("Y"), nb::arg("row_weights").none(), nb::arg("stream"),
     nb::arg("tiling") = std::vector<int>{});
  m.def("grouped_gemm_dX", [args_of](const Array& dY, const Array& W, const Array& offsets, const OptArray& gather,
                                     int k, bool px, bool py, const Array& dX, uintptr_t s,
                                     const std::vector<int>& tiling) {
    nb::gil_scoped_release g;
    grouped_gemm_dX(view(dY, "dY"), view(W, "W"), args_of(offsets, gather, k, px, py, tiling), view(dX, "dX"), stream_of(s));
  }, nb::arg("dY"), nb::arg("W"), nb::arg("expert_offsets"), nb::arg("gather_indices").none(), nb::arg("top_k"),
     nb::arg("permute_x"), nb::arg("permute_y"), nb::arg("dX"), nb::arg("stream"), nb::arg("tiling") = std::vector<int>{});
  m.def("grouped_gemm_dW", [args_of](const Array& X, const Array& dY, const Array& offsets, const OptArray& gather,
                                     int k, bool px, bool py, const Array& dW, uintptr_t s,
                                     const std::vector<int>& tiling) {
    nb::gil_scoped_release g;
    grouped_gemm_dW(view(X, "X"), view(dY, "dY"), args_of(offsets, gather, k, px, py, tiling), view(dW, "dW"), stream_of(s));
  }, nb::arg("X"), nb::arg("dY"), nb::arg("expert_offsets"), nb::arg("gather_indices").none(), nb::arg("top_k"),
     nb::arg("permute_x"), nb::arg("permute_y"), nb::arg("dW"), nb::arg("stream"), nb::arg("tiling") = std::vector<int>{});
  m.def("silu_mul", [](const Array& Y1, const Array& A, uintptr_t s) {
    nb::gil_scoped_release g;
    silu_mul(view(Y1, "Y1"), view(A, "A"), stream_of(s));
  });
  m.def("silu_mul_backward", [](const Array& dA, const Array& Y1, const Array& dY1, uintptr_t s) {
    nb::gil_scoped_release g;
    silu_mul_backward(view(dA, "dA"), view(Y1, "Y1"), view(dY1, "dY1"), stream_of(s));
  });
  m.def("topk_combine", [](const Array& Y2, const Array& w, const Array& out, uintptr_t s) {
    nb::gil_scoped_release g;
    topk_combine(view(Y2, "Y2"), view(w, "topk_weights"), view(out, "out"), stream_of(s));
  });

  // ---- the block ----
  m.def("moe_saved_bytes", &moe_saved_bytes, nb::arg("cfg"), nb::arg("tokens"), nb::arg("keep_gate_up") = true);
  m.def("moe_forward_workspace_bytes", &moe_forward_workspace_bytes);
  m.def("moe_backward_workspace_bytes", [](const MoeConfig& c, int64_t T, bool dx, bool dgate, bool dw1, bool dw2) {
    return moe_backward_workspace_bytes(c, T, MoeGrads{wanted(dx), wanted(dgate), wanted(dw1), wanted(dw2)});
  });
  m.def("moe_experts_backward_workspace_bytes", [](const MoeConfig& c, int64_t T, bool dx, bool dtw, bool dw1,
                                                   bool dw2) {
    return moe_experts_backward_workspace_bytes(c, T, MoeExpertGrads{wanted(dx), wanted(dtw), wanted(dw1), wanted(dw2)});
  });
  m.def("moe_forward", [](const MoeConfig& c, const Array& x, const Array& gate, const Array& w1, const Array& w2,
                          const Array& out, const Array& logits, const Array& tw, const Array& ids,
                          const Array& gather, const Array& m_sizes, const Array& offsets, const Array& y1,
                          const Array& ws, uintptr_t s) {
    const Tensor xv = view(x, "x");
    const size_t need = moe_forward_workspace_bytes(c, tokens_of(xv));
    nb::gil_scoped_release g;
    moe_forward(c, xv, weights_of(&gate, w1, w2), view(out, "out"),
                view(logits, "router_logits"), saved_of(tw, ids, gather, m_sizes, offsets, y1), workspace_of(ws, need),
                stream_of(s));
  });
  m.def("moe_backward", [](const MoeConfig& c, const Array& dout, const Array& x, const Array& gate, const Array& w1,
                           const Array& w2, const Array& logits, const Array& tw, const Array& ids,
                           const Array& gather, const Array& m_sizes, const Array& offsets, const Array& y1,
                           const OptArray& dx, const OptArray& dgate, const OptArray& dw1, const OptArray& dw2,
                           const Array& ws, uintptr_t s) {
    const MoeGrads grads{view(dx, "dx"), view(dgate, "d_gate"), view(dw1, "d_gate_up_proj"), view(dw2, "d_down_proj")};
    const Tensor xv = view(x, "x");
    const size_t need = moe_backward_workspace_bytes(c, tokens_of(xv), grads);
    nb::gil_scoped_release g;
    moe_backward(c, view(dout, "d_out"), xv, weights_of(&gate, w1, w2),
                 view(logits, "router_logits"), saved_of(tw, ids, gather, m_sizes, offsets, y1), grads,
                 workspace_of(ws, need), stream_of(s));
  }, nb::arg("cfg"), nb::arg("d_out"), nb::arg("x"), nb::arg("gate"), nb::arg("gate_up_proj"), nb::arg("down_proj"),
     nb::arg("router_logits"), nb::arg("topk_weights"), nb::arg("topk_ids"), nb::arg("gather_indices"),
     nb::arg("m_sizes"), nb::arg("expert_offsets"), nb::arg("gate_up_out"), nb::arg("dx").none(),
     nb::arg("d_gate").none(), nb::arg("d_gate_up_proj").none(), nb::arg("d_down_proj").none(), nb::arg("workspace"),
     nb::arg("stream"));
  // The eager path (python/fusedmoe/_ops.py): x, gate and the expert weights as DLPack tensors, its own buffers as
  // addresses (see own()): out [T,H] and router_logits [T,E] in x's dtype, the saved state (and, with workspace 0,
  // the workspace after it) in `saved_bytes` bytes at `saved`.
  m.def("moe_forward_packed", [](const MoeConfig& c, const Array& x, const Array& gate, const Array& w1,
                                 const Array& w2, uintptr_t out, uintptr_t logits, uintptr_t saved, size_t saved_bytes,
                                 uintptr_t ws, size_t ws_bytes, uintptr_t s, bool keep_gate_up) {
    const Tensor xv = view(x, "x");
    const int64_t T = tokens_of(xv);
    const size_t need = moe_forward_workspace_bytes(c, T);
    void* after = nullptr;
    const MoeSaved state = saved_in(c, T, saved, saved_bytes, xv.device, ws ? 0 : need, &after, keep_gate_up);
    const Workspace work{ws ? aligned_region(ws, ws_bytes, need, "workspace") : after, need};
    nb::gil_scoped_release g;
    moe_forward(c, xv, weights_of(&gate, w1, w2), own(out, xv, {T, c.hidden_size}),
                own(logits, xv, {T, c.num_experts}), state, work, stream_of(s));
  }, nb::arg("cfg"), nb::arg("x"), nb::arg("gate"), nb::arg("gate_up_proj"), nb::arg("down_proj"), nb::arg("out"),
     nb::arg("router_logits"), nb::arg("saved"), nb::arg("saved_bytes"), nb::arg("workspace"),
     nb::arg("workspace_bytes"), nb::arg("stream"), nb::arg("keep_gate_up") = true);
  // Its backward: d_out, x and the weights as DLPack tensors; router_logits and the state (the forward's), the
  // gradients (row-major, shaped like x, gate, gate_up_proj and down_proj; 0: not wanted) and the workspace as
  // addresses.
  m.def("moe_backward_packed", [](const MoeConfig& c, const Array& dout, const Array& x, const Array& gate,
                                  const Array& w1, const Array& w2, uintptr_t logits, uintptr_t saved,
                                  size_t saved_bytes, uintptr_t dx, uintptr_t dgate, uintptr_t dw1, uintptr_t dw2,
                                  uintptr_t ws, size_t ws_bytes, uintptr_t s) {
    const Tensor xv = view(x, "x");
    const MoeWeights weights = weights_of(&gate, w1, w2);
    const int64_t T = tokens_of(xv), H = c.hidden_size, I = c.intermediate_size, E = c.num_experts;
    const MoeGrads grads{own(dx, xv, {T, H}), own(dgate, weights.gate, {E, H}),
                         own(dw1, weights.gate_up_proj, {E, 2 * I, H}), own(dw2, weights.down_proj, {E, H, I})};
    const MoeSaved state = saved_in(c, T, saved, saved_bytes, xv.device, 0, nullptr, true);
    const size_t need = moe_backward_workspace_bytes(c, T, grads);
    const Workspace work{aligned_region(ws, ws_bytes, need, "workspace"), need};
    nb::gil_scoped_release g;
    moe_backward(c, view(dout, "d_out"), xv, weights, own(logits, xv, {T, c.num_experts}), state, grads, work,
                 stream_of(s));
  }, nb::arg("cfg"), nb::arg("d_out"), nb::arg("x"), nb::arg("gate"), nb::arg("gate_up_proj"), nb::arg("down_proj"),
     nb::arg("router_logits"), nb::arg("saved"), nb::arg("saved_bytes"), nb::arg("dx"), nb::arg("d_gate"),
     nb::arg("d_gate_up_proj"), nb::arg("d_down_proj"), nb::arg("workspace"), nb::arg("workspace_bytes"),
     nb::arg("stream"));
  m.def("moe_experts_forward", [](const MoeConfig& c, const Array& x, const Array& tw, const Array& ids,
                                  const Array& w1, const Array& w2, const Array& out, const Array& gather,
                                  const Array& m_sizes, const Array& offsets, const OptArray& y1, const Array& ws,
                                  uintptr_t s) {
    const Tensor xv = view(x, "x");
    const size_t need = moe_forward_workspace_bytes(c, tokens_of(xv));
    nb::gil_scoped_release g;
    moe_experts_forward(c, xv, view(tw, "topk_weights"), view(ids, "topk_ids"),
                        weights_of(nullptr, w1, w2), view(out, "out"),
                        saved_of(std::nullopt, std::nullopt, gather, m_sizes, offsets, y1), workspace_of(ws, need),
                        stream_of(s));
  }, nb::arg("cfg"), nb::arg("x"), nb::arg("topk_weights"), nb::arg("topk_ids"), nb::arg("gate_up_proj"),
     nb::arg("down_proj"), nb::arg("out"), nb::arg("gather_indices"), nb::arg("m_sizes"), nb::arg("expert_offsets"),
     nb::arg("gate_up_out").none(), nb::arg("workspace"), nb::arg("stream"));
  m.def("moe_experts_backward", [](const MoeConfig& c, const Array& dout, const Array& x, const Array& tw,
                                   const Array& w1, const Array& w2, const Array& gather, const Array& m_sizes,
                                   const Array& offsets, const Array& y1, const OptArray& dx, const OptArray& dtw,
                                   const OptArray& dw1, const OptArray& dw2, const Array& ws, uintptr_t s) {
    const MoeExpertGrads grads{view(dx, "dx"), view(dtw, "d_topk_weights"), view(dw1, "d_gate_up_proj"),
                               view(dw2, "d_down_proj")};
    const Tensor xv = view(x, "x");
    const size_t need = moe_experts_backward_workspace_bytes(c, tokens_of(xv), grads);
    nb::gil_scoped_release g;
    moe_experts_backward(c, view(dout, "d_out"), xv, view(tw, "topk_weights"),
                         weights_of(nullptr, w1, w2),
                         saved_of(std::nullopt, std::nullopt, gather, m_sizes, offsets, y1), grads,
                         workspace_of(ws, need), stream_of(s));
  }, nb::arg("cfg"), nb::arg("d_out"), nb::arg("x"), nb::arg("topk_weights"), nb::arg("gate_up_proj"),
     nb::arg("down_proj"), nb::arg("gather_indices"), nb::arg("m_sizes"), nb::arg("expert_offsets"),
     nb::arg("gate_up_out"), nb::arg("dx").none(), nb::arg("d_topk_weights").none(), nb::arg("d_gate_up_proj").none(),
     nb::arg("d_down_proj").none(), nb::arg("workspace"), nb::arg("stream"));
}
