// Router ops of the CPU backend: logits GEMM, softmax/top-k/renormalise, stable sort by expert, and
// their backward.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "../backend.hpp"
#include "../contract.hpp"
#include "dtype_visit.hpp"
#include "gemm.hpp"
#include "parallel.hpp"

namespace fusedmoe::detail::cpu {

namespace {
bool any_f64(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t->defined() && t->dtype == DType::f64) return true;
  return false;
}

// Softmax of one logits row in Acc (float32, or float64 for float64 inputs), as torch computes it.
template <class Acc>
void softmax_row(const Tensor& logits, int64_t t, int64_t E, Acc* p) {
  Acc mx = -INFINITY;
  bool nan = false;
  for (int64_t e = 0; e < E; ++e) {
    p[e] = static_cast<Acc>(load_as_double(logits, t * E + e));
    if (std::isnan(p[e])) nan = true;
    mx = std::max(mx, p[e]);
  }
  if (nan) {  // a NaN logit makes the whole row NaN, as in torch.softmax
    std::fill(p, p + E, static_cast<Acc>(NAN));
    return;
  }
  Acc sum = 0;
  for (int64_t e = 0; e < E; ++e) sum += (p[e] = std::exp(p[e] - mx));
  for (int64_t e = 0; e < E; ++e) p[e] /= sum;
}

// Top-k order: larger first, NaN above every number (as torch.topk), ties to the lower expert id.
template <class Acc>
bool ranks_before(const Acc* p, int32_t a, int32_t b) {
  const bool na = std::isnan(p[a]), nb = std::isnan(p[b]);
  if (na != nb) return na;
  if (!na && p[a] != p[b]) return p[a] > p[b];
  return a < b;
}
}  // namespace

void router_logits(const Tensor& x, const Tensor& gate, const Tensor& logits, const Tensor&, Stream) {
  const int64_t T = x.shape[0], H = x.shape[1], E = gate.shape[0];
  const auto x_rows = strided_offsets(T, H), unit_h = strided_offsets(H, 1), gate_rows = strided_offsets(E, H);
  const auto unit_e = strided_offsets(E, 1), logit_rows = strided_offsets(T, E);
  MatmulJob j;
  j.M = T, j.N = E, j.K = H;
  j.A = {x.data, x.dtype, x_rows.data(), unit_h.data(), nullptr, nullptr};
  j.B = {gate.data, gate.dtype, unit_h.data(), gate_rows.data(), nullptr, nullptr};  // B(h, e) = gate[e][h]
  j.C = {logits.data, logits.dtype, logit_rows.data(), unit_e.data(), false};
  run_matmuls({j}, any_f64({&x, &gate, &logits}));
}

void route_topk(const Tensor& logits, int top_k, bool norm, const Tensor& weights, const Tensor& ids, Stream) {
  const int64_t T = logits.shape[0], E = logits.shape[1];
  auto run = [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    parallel_for((T + 255) / 256, [&](int64_t chunk, int) {
      std::vector<Acc> p(static_cast<size_t>(E));
      std::vector<int32_t> order(static_cast<size_t>(E));
      for (int64_t t = chunk * 256; t < std::min(T, (chunk + 1) * 256); ++t) {
        softmax_row<Acc>(logits, t, E, p.data());
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                          [&](int32_t a, int32_t b) { return ranks_before(p.data(), a, b); });
        Acc sum = 0;
        for (int j = 0; j < top_k; ++j) sum += p[order[j]];
        for (int j = 0; j < top_k; ++j) {
          const Acc w = norm ? p[order[j]] / sum : p[order[j]];
          store_from(weights, t * top_k + j, w);
          ids.ptr<int32_t>()[t * top_k + j] = order[j];
        }
      }
    });
  };
  if (logits.dtype == DType::f64) run(double{}); else run(float{});
}

void sort_by_expert(const Tensor& ids, int E, const Tensor& gather, const Tensor& m_sizes, const Tensor& offsets,
                    const Tensor&, Stream) {
  const int64_t M = ids.numel();
  const int32_t* id = ids.ptr<const int32_t>();
  int32_t* count = m_sizes.ptr<int32_t>();
  int32_t* offs = offsets.ptr<int32_t>();
  std::fill(count, count + E, 0);
  for (int64_t f = 0; f < M; ++f) {
    if (id[f] < 0 || id[f] >= E)
      fail("sort_by_expert", "argument 'topk_ids' holds " + std::to_string(id[f]) + " at slot " + std::to_string(f) +
                                 "; expected an expert id in [0, " + std::to_string(E) + ")");
    ++count[id[f]];
  }
  offs[0] = 0;
  for (int e = 0; e < E; ++e) offs[e + 1] = offs[e] + count[e];
  std::vector<int32_t> cursor(offs, offs + E);
  int32_t* g = gather.ptr<int32_t>();
  for (int64_t f = 0; f < M; ++f) g[cursor[id[f]]++] = static_cast<int32_t>(f);  // stable: slots ascending
}

void route_and_sort(const Tensor& logits, int top_k, bool norm, const Tensor& weights, const Tensor& ids, int E,
                    const Tensor& gather, const Tensor& m_sizes, const Tensor& offsets, const Tensor& scratch,
                    Stream s) {
  cpu::route_topk(logits, top_k, norm, weights, ids, s);
  cpu::sort_by_expert(ids, E, gather, m_sizes, offsets, scratch, s);
}

void route_topk_backward(const Tensor& logits, const Tensor& ids, const Tensor& d_weights, bool norm,
                         const Tensor& d_logits, Stream) {
  const int64_t T = logits.shape[0], E = logits.shape[1], k = ids.shape[1];
  auto run = [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    parallel_for((T + 255) / 256, [&](int64_t chunk, int) {
      std::vector<Acc> p(static_cast<size_t>(E)), dp(static_cast<size_t>(k));
      for (int64_t t = chunk * 256; t < std::min(T, (chunk + 1) * 256); ++t) {
        softmax_row<Acc>(logits, t, E, p.data());
        const int32_t* id = ids.ptr<const int32_t>() + t * k;
        Acc sum = 0, dot = 0;  // with renormalisation w_j = p_j / s: dp_j = (dw_j − Σ_l dw_l w_l) / s
        for (int64_t j = 0; j < k; ++j) sum += p[id[j]];
        for (int64_t j = 0; j < k; ++j) dot += static_cast<Acc>(load_as_double(d_weights, t * k + j)) * p[id[j]] / sum;
        for (int64_t j = 0; j < k; ++j) {
          const Acc dw = static_cast<Acc>(load_as_double(d_weights, t * k + j));
          dp[j] = norm ? (dw - dot) / sum : dw;
        }
        // softmax backward: dlogit_e = p_e (dp_e − Σ_j p_j dp_j), with dp zero off the selected experts.
        Acc pdp = 0;
        for (int64_t j = 0; j < k; ++j) pdp += p[id[j]] * dp[j];
        for (int64_t e = 0; e < E; ++e) store_from(d_logits, t * E + e, -p[e] * pdp);
        for (int64_t j = 0; j < k; ++j) store_from(d_logits, t * E + id[j], p[id[j]] * (dp[j] - pdp));
      }
    });
  };
  if (any_f64({&logits, &d_weights, &d_logits})) run(double{}); else run(float{});
}

void router_logits_backward(const Tensor& d_logits, const Tensor& x, const Tensor& gate, const Tensor& dx,
                            const Tensor& dgate, bool accumulate_dx, const Tensor& /*split_scratch: no split here*/,
                            Stream) {
  const int64_t T = x.shape[0], H = x.shape[1], E = gate.shape[0];
  const bool f64 = any_f64({&d_logits, &x, &gate, &dx, &dgate});
  const auto unit_e = strided_offsets(E, 1), unit_h = strided_offsets(H, 1);
  const auto logit_rows = strided_offsets(T, E), h_rows_t = strided_offsets(T, H), h_rows_e = strided_offsets(E, H);
  std::vector<MatmulJob> jobs;
  if (dgate.defined()) {  // dgate[e, h] = Σ_t dlogits[t, e] · x[t, h]
    MatmulJob j;
    j.M = E, j.N = H, j.K = T;
    j.A = {d_logits.data, d_logits.dtype, unit_e.data(), logit_rows.data(), nullptr, nullptr};
    j.B = {x.data, x.dtype, h_rows_t.data(), unit_h.data(), nullptr, nullptr};
    j.C = {dgate.data, dgate.dtype, h_rows_e.data(), unit_h.data(), false};
    jobs.push_back(j);
  }
  if (dx.defined()) {  // dx[t, h] (+)= Σ_e dlogits[t, e] · gate[e, h]
    MatmulJob j;
    j.M = T, j.N = H, j.K = E;
    j.A = {d_logits.data, d_logits.dtype, logit_rows.data(), unit_e.data(), nullptr, nullptr};
    j.B = {gate.data, gate.dtype, h_rows_e.data(), unit_h.data(), nullptr, nullptr};
    j.C = {dx.data, dx.dtype, h_rows_t.data(), unit_h.data(), accumulate_dx};
    jobs.push_back(j);
  }
  run_matmuls(jobs, f64);
}

}  // namespace fusedmoe::detail::cpu
