// Grouped GEMMs of the CPU backend: one matmul job per expert over addressed rows (gather/scatter
// maps become row-offset tables; transposes become swapped offset tables).
#include <vector>

#include "../backend.hpp"
#include "dtype_visit.hpp"
#include "gemm.hpp"

namespace fusedmoe::detail::cpu {

namespace {

int64_t mapped_row(const Routing& r, RowMap map, int64_t i) {
  switch (map) {
    case RowMap::identity: return i;
    case RowMap::token: return r.gather_indices.ptr<const int32_t>()[i] / r.top_k;
    case RowMap::slot: return r.gather_indices.ptr<const int32_t>()[i];
  }
  return i;
}

// Element offsets of the row each routed row i addresses in a matrix with leading dimension `ld`.
std::vector<int64_t> routed_row_offsets(const Routing& r, RowMap map, int64_t ld) {
  std::vector<int64_t> v(static_cast<size_t>(r.M));
  for (int64_t i = 0; i < r.M; ++i) v[i] = mapped_row(r, map, i) * ld;
  return v;
}

// s(i) = scale[gather[i]] for every routed row, or empty when no scale is given.
std::vector<double> routed_scales(const Routing& r, const Tensor& slot_scale) {
  std::vector<double> v;
  if (!slot_scale.defined()) return v;
  v.resize(static_cast<size_t>(r.M));
  for (int64_t i = 0; i < r.M; ++i) v[i] = load_as_double(slot_scale, mapped_row(r, RowMap::slot, i));
  return v;
}

const double* at(const std::vector<double>& v, int64_t i) { return v.empty() ? nullptr : v.data() + i; }

bool any_f64(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t->defined() && t->dtype == DType::f64) return true;
  return false;
}

}  // namespace

void gemm_nt(const Routing& r, const GemmNT& g_in, Stream) {
  const int64_t N = g_in.W.shape[1], K = g_in.W.shape[2];
  // act only (no Y): Y goes to scratch, as SiLU·mul reads it afterwards.
  std::vector<char> y_scratch;
  GemmNT g = g_in;
  if (!g.Y.defined()) {
    y_scratch.resize(static_cast<size_t>(r.M * N) * dtype_size(g.act.dtype));
    g.Y = Tensor::contiguous(y_scratch.data(), g.act.dtype, {r.M, N});
  }
  const int32_t* offs = r.expert_offsets.ptr<const int32_t>();
  const auto x_rows = routed_row_offsets(r, g.x_map, K);
  const auto y_rows = routed_row_offsets(r, g.y_map, N);
  const auto scales = routed_scales(r, g.slot_scale);
  const auto unit_k = strided_offsets(K, 1), unit_n = strided_offsets(N, 1), w_rows = strided_offsets(N, K);
  std::vector<MatmulJob> jobs;
  for (int e = 0; e < r.num_experts; ++e) {
    const int64_t o = offs[e], m = offs[e + 1] - offs[e];
    if (m == 0) continue;
    MatmulJob j;
    j.M = m, j.N = N, j.K = K;
    j.A = {g.X.data, g.X.dtype, x_rows.data() + o, unit_k.data(), at(scales, o), nullptr};
    // B(k, n) = W[e][n][k]
    j.B = {advance(g.W.data, g.W.dtype, e * N * K), g.W.dtype, unit_k.data(), w_rows.data(), nullptr, nullptr};
    j.C = {g.Y.data, g.Y.dtype, y_rows.data() + o, unit_n.data(), false};
    jobs.push_back(j);
  }
  run_matmuls(jobs, any_f64({&g.X, &g.W, &g.Y}));
  if (g.act.defined()) silu_mul(g.Y, g.act, {});
}

void gemm_nn(const Routing& r, const GemmNN& g, Stream) {
  const int64_t N = g.W.shape[1], K = g.W.shape[2];
  const int32_t* offs = r.expert_offsets.ptr<const int32_t>();
  const bool f64 = any_f64({&g.dY, &g.W, &g.dX});
  // Summing the k slots of a token: compute per slot into scratch, then add in slot order (deterministic).
  const bool sum_slots = g.dx_map == RowMap::token;
  const DType acc = f64 ? DType::f64 : DType::f32;
  std::vector<char> scratch;
  Tensor dst = g.dX;
  if (sum_slots) {
    scratch.resize(static_cast<size_t>(r.M * K) * dtype_size(acc));
    dst = Tensor::contiguous(scratch.data(), acc, {r.M, K});
  }
  const auto dy_rows = routed_row_offsets(r, g.dy_map, N);
  const auto dx_rows = routed_row_offsets(r, sum_slots ? RowMap::slot : g.dx_map, K);
  const auto unit_n = strided_offsets(N, 1), unit_k = strided_offsets(K, 1), w_rows = strided_offsets(N, K);
  std::vector<MatmulJob> jobs;
  for (int e = 0; e < r.num_experts; ++e) {
    const int64_t o = offs[e], m = offs[e + 1] - offs[e];
    if (m == 0) continue;
    MatmulJob j;
    j.M = m, j.N = K, j.K = N;
    j.A = {g.dY.data, g.dY.dtype, dy_rows.data() + o, unit_n.data(), nullptr, nullptr};
    // B(n, k) = W[e][n][k]
    j.B = {advance(g.W.data, g.W.dtype, e * N * K), g.W.dtype, w_rows.data(), unit_k.data(), nullptr, nullptr};
    j.C = {dst.data, dst.dtype, dx_rows.data() + o, unit_k.data(), g.accumulate && !sum_slots};
    jobs.push_back(j);
  }
  run_matmuls(jobs, f64);
  if (!sum_slots) return;
  auto sum_over_slots = [&](auto acc_tag) {
    using A = decltype(acc_tag);
    const A* src = static_cast<const A*>(dst.data);
    for (int64_t t = 0; t < r.T; ++t)
      for (int64_t c = 0; c < K; ++c) {
        A sum = 0;
        for (int j = 0; j < r.top_k; ++j) sum += src[(t * r.top_k + j) * K + c];
        if (g.accumulate) sum += static_cast<A>(load_as_double(g.dX, t * K + c));
        store_from(g.dX, t * K + c, sum);
      }
  };
  if (f64) sum_over_slots(double{}); else sum_over_slots(float{});
}

void gemm_tn(const Routing& r, const GemmTN& g, Stream) {
  const int64_t N = g.dW.shape[1], K = g.dW.shape[2];
  const int32_t* offs = r.expert_offsets.ptr<const int32_t>();
  const auto dy_rows = routed_row_offsets(r, g.dy_map, N);
  const auto x_rows = routed_row_offsets(r, g.x_map, K);
  const auto unit_n = strided_offsets(N, 1), unit_k = strided_offsets(K, 1), w_rows = strided_offsets(N, K);
  std::vector<MatmulJob> jobs;
  for (int e = 0; e < r.num_experts; ++e) {
    const int64_t o = offs[e], m = offs[e + 1] - offs[e];
    MatmulJob j;  // experts without rows still run: K = 0 writes their zeros
    j.M = N, j.N = K, j.K = m;
    j.A = {g.dY.data, g.dY.dtype, unit_n.data(), dy_rows.data() + o, nullptr, nullptr};  // A(n, i)
    j.B = {g.X.data, g.X.dtype, x_rows.data() + o, unit_k.data(), nullptr, nullptr};          // B(i, k)
    j.C = {advance(g.dW.data, g.dW.dtype, e * N * K), g.dW.dtype, w_rows.data(), unit_k.data(), false};
    jobs.push_back(j);
  }
  run_matmuls(jobs, any_f64({&g.dY, &g.X, &g.dW}));
}

}  // namespace fusedmoe::detail::cpu
