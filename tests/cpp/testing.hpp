// Test helpers: host tensors with fresh random contents, and float64 reference loops of the math in
// DESIGN.md §3–§4, written independently of the library.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "../../src/numeric.hpp"
#include "fusedmoe/fusedmoe.hpp"

namespace fmt {

using namespace fusedmoe;

inline std::mt19937_64& rng() {
  static std::mt19937_64 gen = [] {
    const uint64_t seed = std::random_device{}();
    std::printf("[testing] random seed %llu\n", static_cast<unsigned long long>(seed));
    return std::mt19937_64(seed);
  }();
  return gen;
}

// A host tensor that owns its memory.
struct HostTensor {
  std::vector<unsigned char> mem;
  Tensor t;
  HostTensor() = default;
  HostTensor(DType dt, std::initializer_list<int64_t> shape) {
    int64_t n = 1;
    for (int64_t s : shape) n *= s;
    mem.assign(static_cast<size_t>(n) * dtype_size(dt) + 1, 0);
    t = Tensor::contiguous(mem.data(), dt, shape);
  }
  // Copies own their memory: the view is re-pointed at the copy.
  HostTensor(const HostTensor& o) : mem(o.mem), t(o.t) { t.data = mem.data(); }
  HostTensor& operator=(const HostTensor& o) {
    mem = o.mem;
    t = o.t;
    t.data = mem.data();
    return *this;
  }
  HostTensor(HostTensor&&) = default;
  HostTensor& operator=(HostTensor&&) = default;
  int64_t numel() const { return t.numel(); }
  double get(int64_t i) const {
    switch (t.dtype) {
      case DType::f32: return static_cast<const float*>(t.data)[i];
      case DType::f64: return static_cast<const double*>(t.data)[i];
      case DType::bf16: return num::bf16_to_float(static_cast<const uint16_t*>(t.data)[i]);
      case DType::f16: return num::f16_to_float(static_cast<const uint16_t*>(t.data)[i]);
      case DType::i32: return static_cast<const int32_t*>(t.data)[i];
      case DType::i64: return static_cast<double>(static_cast<const int64_t*>(t.data)[i]);
    }
    return 0;
  }
  void set(int64_t i, double v) {
    switch (t.dtype) {
      case DType::f32: static_cast<float*>(t.data)[i] = static_cast<float>(v); break;
      case DType::f64: static_cast<double*>(t.data)[i] = v; break;
      case DType::bf16: static_cast<uint16_t*>(t.data)[i] = num::float_to_bf16(static_cast<float>(v)); break;
      case DType::f16: static_cast<uint16_t*>(t.data)[i] = num::float_to_f16(static_cast<float>(v)); break;
      case DType::i32: static_cast<int32_t*>(t.data)[i] = static_cast<int32_t>(v); break;
      case DType::i64: static_cast<int64_t*>(t.data)[i] = static_cast<int64_t>(v); break;
    }
  }
  int32_t i32(int64_t i) const { return static_cast<const int32_t*>(t.data)[i]; }
  std::vector<double> values() const {
    std::vector<double> v(static_cast<size_t>(numel()));
    for (int64_t i = 0; i < numel(); ++i) v[i] = get(i);
    return v;
  }
  HostTensor& randn(double scale = 1.0) {
    std::normal_distribution<double> d(0.0, scale);
    for (int64_t i = 0; i < numel(); ++i) set(i, d(rng()));
    return *this;
  }
  HostTensor& uniform(double lo, double hi) {
    std::uniform_real_distribution<double> d(lo, hi);
    for (int64_t i = 0; i < numel(); ++i) set(i, d(rng()));
    return *this;
  }
  // Poison: NaN for floats, -7 for ints, so unwritten elements are caught.
  HostTensor& poison() {
    for (int64_t i = 0; i < numel(); ++i) set(i, is_floating(t.dtype) ? NAN : -7.0);
    return *this;
  }
  bool all_finite() const {
    for (int64_t i = 0; i < numel(); ++i)
      if (!std::isfinite(get(i))) return false;
    return true;
  }
  bool bitwise_equal(const HostTensor& o) const { return t.nbytes() == o.t.nbytes() && std::memcmp(t.data, o.t.data, t.nbytes()) == 0; }
};

// The values of any host tensor view (e.g. one carved from saved memory) as float64.
inline std::vector<double> values_of(const Tensor& t) {
  HostTensor view;
  view.t = t;
  return view.values();
}

// ‖a − b‖ / ‖scale‖ (NaN anywhere gives NaN, which fails every comparison): with scale = b the relative
// error; with the size of the terms that produced b, the error where b itself may cancel.
inline double err_against(const std::vector<double>& a, const std::vector<double>& b, const std::vector<double>& scale) {
  double num = 0, den = 0;
  if (a.size() != b.size() || scale.size() != b.size()) return INFINITY;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return NAN;
    num += (a[i] - b[i]) * (a[i] - b[i]);
    den += scale[i] * scale[i];
  }
  if (den == 0) return num == 0 ? 0 : INFINITY;
  return std::sqrt(num / den);
}

inline double rel_err(const std::vector<double>& a, const std::vector<double>& b) { return err_against(a, b, b); }

inline double tolerance(DType dt) {
  switch (dt) {
    case DType::f64: return 1e-12;
    case DType::f32: return 1e-5;
    default: return 1e-2;
  }
}

// ‖actual − expected‖ / ‖expected‖ ≤ tol; NaN fails. Chainable with << like any EXPECT.
#define EXPECT_CLOSE(actual, expected, tol) \
  EXPECT_LE(::fmt::rel_err((actual), (expected)), (tol)) << "relative error (NaN fails) "

// ---------------- float64 reference of the block ----------------

inline double sigmoid(double g) { return 1.0 / (1.0 + std::exp(-g)); }

struct RefProblem {
  int64_t T, H, I, E, k;
  bool norm;
  std::vector<double> x, gate, w1, w2;  // [T,H], [E,H], [E,2I,H], [E,H,I]
};

struct RefRouting {
  std::vector<double> probs;   // [T,E] softmax of the given logits
  std::vector<int32_t> ids;    // [T,k]
  std::vector<double> weights; // [T,k]
};

inline std::vector<double> ref_softmax(const std::vector<double>& logits, int64_t T, int64_t E) {
  std::vector<double> p(logits.size());
  for (int64_t t = 0; t < T; ++t) {
    double mx = -INFINITY, s = 0;
    for (int64_t e = 0; e < E; ++e) mx = std::max(mx, logits[t * E + e]);
    for (int64_t e = 0; e < E; ++e) s += (p[t * E + e] = std::exp(logits[t * E + e] - mx));
    for (int64_t e = 0; e < E; ++e) p[t * E + e] /= s;
  }
  return p;
}

// Routing with the given expert choices (the library's), weights recomputed in float64.
inline RefRouting ref_routing(const std::vector<double>& logits, const std::vector<int32_t>& ids, int64_t T, int64_t E,
                              int64_t k, bool norm) {
  RefRouting r;
  r.probs = ref_softmax(logits, T, E);
  r.ids = ids;
  r.weights.resize(static_cast<size_t>(T * k));
  for (int64_t t = 0; t < T; ++t) {
    double s = 0;
    for (int64_t j = 0; j < k; ++j) s += r.probs[t * E + ids[t * k + j]];
    for (int64_t j = 0; j < k; ++j) r.weights[t * k + j] = r.probs[t * E + ids[t * k + j]] / (norm ? s : 1.0);
  }
  return r;
}

struct RefForward {
  std::vector<double> out;                 // [T,H]
  std::vector<std::vector<double>> g, u;   // per slot: [I]
  std::vector<std::vector<double>> y2;     // per slot: [H]
};

inline RefForward ref_forward(const RefProblem& p, const RefRouting& r) {
  RefForward f;
  const int64_t T = p.T, H = p.H, I = p.I, k = p.k;
  f.out.assign(static_cast<size_t>(T * H), 0.0);
  f.g.resize(T * k), f.u.resize(T * k), f.y2.resize(T * k);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = t * k + j, e = r.ids[s];
      auto& g = f.g[s];
      auto& u = f.u[s];
      g.assign(I, 0), u.assign(I, 0);
      for (int64_t c = 0; c < I; ++c)
        for (int64_t h = 0; h < H; ++h) {
          g[c] += p.x[t * H + h] * p.w1[(e * 2 * I + c) * H + h];
          u[c] += p.x[t * H + h] * p.w1[(e * 2 * I + I + c) * H + h];
        }
      auto& y2 = f.y2[s];
      y2.assign(H, 0);
      for (int64_t h = 0; h < H; ++h) {
        for (int64_t c = 0; c < I; ++c) y2[h] += g[c] * sigmoid(g[c]) * u[c] * p.w2[(e * H + h) * I + c];
        f.out[t * H + h] += r.weights[s] * y2[h];
      }
    }
  return f;
}

// dgate_terms: dgate with every term taken by magnitude (the weight gradients' dot products ⟨dout, y2⟩, the
// renormalisation and the softmax backward p·(dp − Σ p·dp)): the scale of the rounding errors in dgate, which
// cancellation can make far larger than dgate itself.
struct RefGrads { std::vector<double> dx, dgate, dw1, dw2, dgate_terms; };

inline RefGrads ref_backward(const RefProblem& p, const RefRouting& r, const RefForward& f,
                             const std::vector<double>& dout) {
  const int64_t T = p.T, H = p.H, I = p.I, E = p.E, k = p.k;
  RefGrads gr;
  gr.dx.assign(T * H, 0), gr.dgate.assign(E * H, 0), gr.dw1.assign(E * 2 * I * H, 0), gr.dw2.assign(E * H * I, 0);
  gr.dgate_terms.assign(E * H, 0);
  std::vector<double> dlogits(T * E, 0), dlogit_terms(T * E, 0);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> dw(k, 0), dw_terms(k, 0);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t s = t * k + j, e = r.ids[s];
      const double w = r.weights[s];
      for (int64_t h = 0; h < H; ++h)
        dw[j] += dout[t * H + h] * f.y2[s][h], dw_terms[j] += std::abs(dout[t * H + h] * f.y2[s][h]);
      std::vector<double> da(I, 0);
      for (int64_t c = 0; c < I; ++c) {
        const double a = f.g[s][c] * sigmoid(f.g[s][c]) * f.u[s][c];
        for (int64_t h = 0; h < H; ++h) {
          da[c] += w * dout[t * H + h] * p.w2[(e * H + h) * I + c];
          gr.dw2[(e * H + h) * I + c] += w * dout[t * H + h] * a;
        }
      }
      for (int64_t c = 0; c < I; ++c) {
        const double g = f.g[s][c], u = f.u[s][c], sg = sigmoid(g);
        const double dg = da[c] * u * sg * (1 + g * (1 - sg)), du = da[c] * g * sg;
        for (int64_t h = 0; h < H; ++h) {
          gr.dw1[(e * 2 * I + c) * H + h] += dg * p.x[t * H + h];
          gr.dw1[(e * 2 * I + I + c) * H + h] += du * p.x[t * H + h];
          gr.dx[t * H + h] += dg * p.w1[(e * 2 * I + c) * H + h] + du * p.w1[(e * 2 * I + I + c) * H + h];
        }
      }
    }
    // Router: back through renormalisation and softmax.
    std::vector<double> dp(E, 0), dp_terms(E, 0);
    double s = 0, dot = 0, dot_terms = 0;
    for (int64_t j = 0; j < k; ++j) s += r.probs[t * E + r.ids[t * k + j]];
    for (int64_t j = 0; j < k; ++j) dot += dw[j] * r.weights[t * k + j], dot_terms += dw_terms[j] * r.weights[t * k + j];
    for (int64_t j = 0; j < k; ++j) {
      dp[r.ids[t * k + j]] = p.norm ? (dw[j] - dot) / s : dw[j];
      dp_terms[r.ids[t * k + j]] = p.norm ? (dw_terms[j] + dot_terms) / s : dw_terms[j];
    }
    double pdp = 0, pdp_terms = 0;
    for (int64_t e = 0; e < E; ++e) pdp += r.probs[t * E + e] * dp[e], pdp_terms += r.probs[t * E + e] * dp_terms[e];
    for (int64_t e = 0; e < E; ++e) {
      dlogits[t * E + e] = r.probs[t * E + e] * (dp[e] - pdp);
      dlogit_terms[t * E + e] = r.probs[t * E + e] * (dp_terms[e] + pdp_terms);
    }
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t h = 0; h < H; ++h) {
        gr.dgate[e * H + h] += dlogits[t * E + e] * p.x[t * H + h];
        gr.dgate_terms[e * H + h] += dlogit_terms[t * E + e] * std::abs(p.x[t * H + h]);
        gr.dx[t * H + h] += dlogits[t * E + e] * p.gate[e * H + h];
      }
  return gr;
}

// ---------------- running the library's block on host tensors ----------------

struct BlockTensors {
  MoeConfig cfg;
  int64_t T;
  HostTensor x, gate, w1, w2, out, logits;
  std::vector<unsigned char> saved_mem;
  MoeSaved saved;

  BlockTensors(const MoeConfig& c, int64_t tokens) : cfg(c), T(tokens) {
    const int64_t H = c.hidden_size, I = c.intermediate_size, E = c.num_experts;
    x = HostTensor(c.dtype, {T, H});
    gate = HostTensor(c.dtype, {E, H});
    w1 = HostTensor(c.dtype, {E, 2 * I, H});
    w2 = HostTensor(c.dtype, {E, H, I});
    out = HostTensor(c.dtype, {T, H});
    logits = HostTensor(c.dtype, {T, E});
    x.randn(1.0);
    gate.randn(0.5 / std::sqrt(static_cast<double>(H)) * 4);
    w1.randn(1.0 / std::sqrt(static_cast<double>(H)));
    w2.randn(1.0 / std::sqrt(static_cast<double>(I)));
    saved_mem.assign(moe_saved_bytes(c, T) + 256, 0);
    saved = moe_saved_views(c, T, aligned(saved_mem), Device::cpu());
  }
  static void* aligned(std::vector<unsigned char>& v) {
    return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(v.data()) + 255) / 256 * 256);
  }
  MoeWeights weights() const { return {gate.t, w1.t, w2.t}; }
  void forward() {
    std::vector<unsigned char> ws(moe_forward_workspace_bytes(cfg, T) + 256);
    out.poison();
    logits.poison();
    moe_forward(cfg, x.t, weights(), out.t, logits.t, saved, {aligned(ws), ws.size() - 256});
  }
  std::vector<int32_t> ids() const {
    const int32_t* p = saved.topk_ids.ptr<const int32_t>();
    return std::vector<int32_t>(p, p + T * cfg.top_k);
  }
  RefProblem ref_problem() const {
    return {T, cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.top_k, cfg.norm_topk_prob,
            x.values(), gate.values(), w1.values(), w2.values()};
  }
};

}  // namespace fmt

namespace fmt {

// ---------------- one forward + backward of the block on any device ----------------

inline void poison_bytes(void* p, size_t n, const Device& d) {
  std::vector<unsigned char> ff(n, 0xFF);  // all-ones: NaN in every float dtype, -1 in int32
  copy_bytes(p, d, ff.data(), Device::cpu(), n);
}

// A device copy of a host tensor (or a poisoned device tensor of the same shape and dtype).
struct DeviceCopy {
  Buffer buf;
  Tensor t;
  DeviceCopy(const HostTensor& h, const Device& d, bool upload = true) : buf(h.t.nbytes() + 16, d) {
    t = h.t;
    t.data = buf.data();
    t.device = d;
    if (upload) copy_bytes(t.data, d, h.t.data, Device::cpu(), h.t.nbytes());
    else poison_bytes(t.data, h.t.nbytes(), d);
  }
  HostTensor download() const {
    HostTensor h;
    h.mem.resize(t.nbytes() + 1);
    h.t = t;
    h.t.data = h.mem.data();
    h.t.device = Device::cpu();
    copy_bytes(h.t.data, Device::cpu(), t.data, t.device, t.nbytes());
    return h;
  }
};

struct BlockResult {
  HostTensor out, logits, topk_weights, topk_ids, dx, dgate, dw1, dw2;
  std::vector<int32_t> ids() const {
    const int32_t* p = topk_ids.t.ptr<const int32_t>();
    return std::vector<int32_t>(p, p + topk_ids.numel());
  }
};

// A random output gradient [T, H] for the block's backward.
inline HostTensor random_dout(const BlockTensors& b) {
  HostTensor dout(b.cfg.dtype, {b.T, b.cfg.hidden_size});
  dout.randn();
  return dout;
}

// The block's inputs, outputs (poisoned), saved state and workspaces on `dev`; forward() and backward() run
// the public API on them (all gradients).
struct DeviceBlock {
  MoeConfig c;
  int64_t T;
  Device dev;
  DeviceCopy x, gate, w1, w2, dO, out, logits, dx, dgate, dw1, dw2;
  Buffer saved_mem;
  MoeSaved saved;
  Buffer fws, bws;
  DeviceBlock(const BlockTensors& b, const HostTensor& dout, const Device& d)
      : c(b.cfg), T(b.T), dev(d), x(b.x, d), gate(b.gate, d), w1(b.w1, d), w2(b.w2, d), dO(dout, d),
        out(b.out, d, false), logits(b.logits, d, false), dx(b.x, d, false), dgate(b.gate, d, false),
        dw1(b.w1, d, false), dw2(b.w2, d, false), saved_mem(moe_saved_bytes(b.cfg, b.T), d),
        fws(moe_forward_workspace_bytes(b.cfg, b.T) + 256, d),
        bws(moe_backward_workspace_bytes(b.cfg, b.T, grads()) + 256, d) {
    poison_bytes(saved_mem.data(), saved_mem.bytes(), d);
    saved = moe_saved_views(c, T, saved_mem.data(), d);
  }
  MoeWeights weights() const { return {gate.t, w1.t, w2.t}; }
  MoeGrads grads() const { return {dx.t, dgate.t, dw1.t, dw2.t}; }
  void forward(Stream s = {}) { moe_forward(c, x.t, weights(), out.t, logits.t, saved, {fws.data(), fws.bytes()}, s); }
  void backward(Stream s = {}) {
    moe_backward(c, dO.t, x.t, weights(), logits.t, saved, grads(), {bws.data(), bws.bytes()}, s);
  }
  HostTensor fetch(const Tensor& t) const {
    HostTensor h;
    h.mem.resize(t.nbytes() + 1);
    h.t = t;
    h.t.data = h.mem.data();
    h.t.device = Device::cpu();
    copy_bytes(h.t.data, Device::cpu(), t.data, dev, t.nbytes());
    return h;
  }
};

// An inference forward on `dev` (a state without gate_up_out: Y1 neither kept nor written) gives the training
// forward's out and router_logits bitwise, in a smaller state; a backward from it is refused, naming the view.
inline void expect_inference_forward_matches(const MoeConfig& c, int64_t T, const Device& dev) {
  BlockTensors b(c, T);
  const HostTensor dout = random_dout(b);
  DeviceBlock d(b, dout, dev);
  d.forward();
  EXPECT_LT(moe_saved_bytes(c, T, false), moe_saved_bytes(c, T));
  Buffer state(moe_saved_bytes(c, T, false), dev);
  poison_bytes(state.data(), state.bytes(), dev);
  const MoeSaved inference = moe_saved_views(c, T, state.data(), dev, false);
  ASSERT_FALSE(inference.gate_up_out.defined());
  DeviceCopy out(b.out, dev, false), logits(b.logits, dev, false);
  moe_forward(c, d.x.t, d.weights(), out.t, logits.t, inference, {d.fws.data(), d.fws.bytes()});
  EXPECT_TRUE(out.download().bitwise_equal(d.out.download()));
  EXPECT_TRUE(logits.download().bitwise_equal(d.logits.download()));
  try {
    moe_backward(c, d.dO.t, d.x.t, d.weights(), logits.t, inference, d.grads(), {d.bws.data(), d.bws.bytes()});
    ADD_FAILURE() << "expected fusedmoe::Error for a backward from an inference forward's state";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("saved.gate_up_out"), std::string::npos) << e.what();
  }
}

// Runs moe_forward then moe_backward (all gradients) on `dev` with every output poisoned first.
inline BlockResult run_block(const BlockTensors& b, const HostTensor& dout, const Device& dev) {
  DeviceBlock d(b, dout, dev);
  d.forward();
  d.backward();
  return {d.out.download(), d.logits.download(), d.fetch(d.saved.topk_weights), d.fetch(d.saved.topk_ids),
          d.dx.download(), d.dgate.download(), d.dw1.download(), d.dw2.download()};
}

// Every output against the float64 reference computed with the same expert choices (DESIGN.md §5).
inline void expect_block_matches_reference(const BlockTensors& b, const HostTensor& dout, const BlockResult& res) {
  const MoeConfig& c = b.cfg;
  const int64_t T = b.T, H = c.hidden_size, E = c.num_experts, k = c.top_k;
  for (const HostTensor* h : {&res.out, &res.logits, &res.dx, &res.dgate, &res.dw1, &res.dw2})
    ASSERT_TRUE(h->all_finite()) << "an output element was not written (still NaN) or overflowed";
  const RefProblem p = b.ref_problem();
  std::vector<double> ref_logits(T * E, 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e)
      for (int64_t h = 0; h < H; ++h) ref_logits[t * E + e] += p.x[t * H + h] * p.gate[e * H + h];
  EXPECT_CLOSE(res.logits.values(), ref_logits, tolerance(c.dtype));
  const auto ids = res.ids();
  const RefRouting r = ref_routing(res.logits.values(), ids, T, E, k, c.norm_topk_prob);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<bool> chosen(E, false);
    for (int64_t j = 0; j < k; ++j) {
      ASSERT_TRUE(ids[t * k + j] >= 0 && ids[t * k + j] < E) << "expert id out of range";
      ASSERT_FALSE(chosen[ids[t * k + j]]) << "token " << t << " picked an expert twice";
      chosen[ids[t * k + j]] = true;
    }
    double min_in = 1, max_out = 0;
    for (int64_t e = 0; e < E; ++e) {
      const double pe = r.probs[t * E + e];
      if (chosen[e]) min_in = std::min(min_in, pe); else max_out = std::max(max_out, pe);
    }
    EXPECT_GE(min_in, max_out - 1e-6) << "token " << t << ": not the top-k experts";
  }
  EXPECT_CLOSE(res.topk_weights.values(), r.weights, tolerance(c.dtype));
  const RefForward f = ref_forward(p, r);
  EXPECT_CLOSE(res.out.values(), f.out, tolerance(c.dtype));
  const RefGrads g = ref_backward(p, r, f, dout.values());
  // Router gradients pass through the softmax Jacobian, whose terms cancel (most with one token, or one
  // dominant expert and positive x): dgate's error is judged against the size of those terms. Judged against
  // dgate itself, 16-bit draws of T=1 reached 4% on the CPU oracle and on the GPU alike (3 in 400).
  EXPECT_CLOSE(res.dx.values(), g.dx, tolerance(c.dtype));
  EXPECT_LE(::fmt::err_against(res.dgate.values(), g.dgate, g.dgate_terms), tolerance(c.dtype))
      << "dgate: error against the size of its softmax-backward terms";
  EXPECT_CLOSE(res.dw1.values(), g.dw1, tolerance(c.dtype));
  EXPECT_CLOSE(res.dw2.values(), g.dw2, tolerance(c.dtype));
}

struct BlockCase {
  const char* name;
  DType dtype;
  int64_t T, H, I;
  int E, k;
  bool norm;
  bool one_expert;  // steer every token's first choice to expert 0
};
inline void PrintTo(const BlockCase& c, std::ostream* os) { *os << c.name; }

inline void steer_to_expert_zero(BlockTensors& b) {
  const int64_t H = b.cfg.hidden_size;
  b.x.uniform(0.5, 1.5);
  b.gate.randn(0.01 / std::sqrt(static_cast<double>(H)));
  for (int64_t h = 0; h < H; ++h) b.gate.set(h, 4.0 / H);  // expert 0's logit ≈ 4, the others ≈ 0
}

// The edge cases of DESIGN.md §5 that every backend must pass.
inline std::vector<BlockCase> edge_cases(bool with_wide_dtypes) {
  std::vector<BlockCase> v = {
      {"T1", DType::bf16, 1, 64, 32, 8, 2, false, false},  // norm=true with T=1 cancels in bf16
      {"OddSizes", DType::bf16, 5, 1000, 200, 10, 3, true, false},
      {"KEqualsE", DType::bf16, 40, 48, 24, 6, 6, true, false},
      {"K1Fp16", DType::f16, 33, 40, 20, 12, 1, false, false},
      {"OneExpert", DType::bf16, 30, 64, 40, 5, 1, false, true},
      {"EmptyExperts", DType::bf16, 3, 32, 16, 64, 2, false, false},
      {"Unaligned", DType::bf16, 21, 61, 27, 7, 3, true, false},
      {"ManyTiles", DType::bf16, 300, 136, 200, 6, 2, true, false},
      // CUDA: the router GEMM splits H (16 k-steps) into 2 slices, not 4: its partials must fit the forward
      // workspace's room (T·k·H 16-bit values; 4 slices of [T, E] float32 would need twice that).
      {"RouterSplitInRoom", DType::bf16, 200, 1024, 64, 256, 1, true, false},
  };
  if (with_wide_dtypes) {
    v.push_back({"KEqualsEF32", DType::f32, 40, 48, 24, 6, 6, true, false});
    v.push_back({"NoNormF32", DType::f32, 70, 72, 36, 7, 3, false, false});
    v.push_back({"F64", DType::f64, 12, 20, 10, 5, 2, true, false});
  }
  return v;
}

}  // namespace fmt
