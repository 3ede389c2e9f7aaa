// Elementwise ops of the CPU backend: SiLU·mul and its backward, the top-k combine and its backward.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../activation.hpp"
#include "../backend.hpp"
#include "dtype_visit.hpp"
#include "parallel.hpp"

namespace fusedmoe::detail::cpu {

namespace {
// Compute type: double for float64 tensors, float otherwise.
template <class Fn>
void with_acc(std::initializer_list<const Tensor*> ts, Fn&& fn) {
  for (const Tensor* t : ts)
    if (t->defined() && t->dtype == DType::f64) return fn(double{});
  fn(float{});
}
}  // namespace

// Each op below works a row at a time through row buffers in the compute type (load_span / store_span: one dtype
// dispatch per row span, the same values and the same summation order as element-wise loads).

void silu_mul(const Tensor& Y1, const Tensor& A, Stream) {
  const int64_t M = Y1.shape[0], I = A.shape[1];
  with_acc({&Y1, &A}, [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    parallel_row_chunks(M, I, [&](int64_t begin, int64_t end) {
      std::vector<Acc> g(I), u(I), a(I);
      for (int64_t m = begin; m < end; ++m) {
        load_span(Y1, m * 2 * I, I, g.data());
        load_span(Y1, m * 2 * I + I, I, u.data());
        for (int64_t c = 0; c < I; ++c) a[c] = act::silu(g[c]) * u[c];
        store_span(A, m * I, I, a.data());
      }
    });
  });
}

void silu_mul_backward(const Tensor& dA, const Tensor& Y1, const Tensor& dY1, Stream) {
  const int64_t M = Y1.shape[0], I = dA.shape[1];
  with_acc({&dA, &Y1, &dY1}, [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    parallel_row_chunks(M, I, [&](int64_t begin, int64_t end) {
      std::vector<Acc> g(I), u(I), d(I), dg(I), du(I);
      for (int64_t m = begin; m < end; ++m) {
        load_span(Y1, m * 2 * I, I, g.data());
        load_span(Y1, m * 2 * I + I, I, u.data());
        load_span(dA, m * I, I, d.data());
        for (int64_t c = 0; c < I; ++c) act::silu_mul_grad(g[c], u[c], d[c], dg[c], du[c]);
        store_span(dY1, m * 2 * I, I, dg.data());
        store_span(dY1, m * 2 * I + I, I, du.data());
      }
    });
  });
}

void routed_silu_backward(const Routing& r, const Tensor& dA_raw, const Tensor& Y1, const Tensor& weights,
                          const Tensor& dY1, const Tensor& scaled_act, const Tensor& d_weights, Stream) {
  const int64_t M = Y1.shape[0], I = Y1.shape[1] / 2;
  const int32_t* gather = r.gather_indices.ptr<const int32_t>();
  with_acc({&Y1}, [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    visit_float(Y1.dtype, [&](auto store_tag) {
      using S = decltype(store_tag);
      parallel_row_chunks(M, I, [&](int64_t begin, int64_t end) {
        std::vector<Acc> g(I), u(I), a(I), raw(I), scaled(I), dg(I), du(I);
        for (int64_t m = begin; m < end; ++m) {
          const int64_t slot = gather[m];
          const Acc w = static_cast<Acc>(load_as_double(weights, slot));
          load_span(Y1, m * 2 * I, I, g.data());
          load_span(Y1, m * 2 * I + I, I, u.data());
          // A as forward stored it (rounded to the activation dtype): dw = ⟨dOut, Y2⟩ = ⟨dA_raw, A⟩ exactly.
          for (int64_t c = 0; c < I; ++c)
            a[c] = static_cast<Acc>(num::Conv<S>::load(num::Conv<S>::store(act::silu(g[c]) * u[c])));
          if (scaled_act.defined()) {
            for (int64_t c = 0; c < I; ++c) scaled[c] = w * a[c];
            store_span(scaled_act, m * I, I, scaled.data());
          }
          if (!dA_raw.defined()) continue;
          load_span(dA_raw, m * I, I, raw.data());
          Acc dw = 0;
          for (int64_t c = 0; c < I; ++c) dw += raw[c] * a[c];
          if (dY1.defined()) {
            for (int64_t c = 0; c < I; ++c) act::silu_mul_grad(g[c], u[c], w * raw[c], dg[c], du[c]);
            store_span(dY1, m * 2 * I, I, dg.data());
            store_span(dY1, m * 2 * I + I, I, du.data());
          }
          if (d_weights.defined()) store_from(d_weights, slot, dw);
        }
      });
    });
  });
}

void topk_combine(const Tensor& Y2, const Tensor& weights, const Tensor& out, Stream) {
  const int64_t T = weights.shape[0], k = weights.shape[1], H = Y2.shape[1];
  with_acc({&Y2, &weights, &out}, [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    parallel_row_chunks(T, H * k, [&](int64_t begin, int64_t end) {
      std::vector<Acc> w(k), y(H), sum(H);
      for (int64_t t = begin; t < end; ++t) {
        load_span(weights, t * k, k, w.data());
        std::fill(sum.begin(), sum.end(), Acc(0));
        for (int64_t j = 0; j < k; ++j) {  // the slots in order: a fixed summation order per element
          load_span(Y2, (t * k + j) * H, H, y.data());
          for (int64_t h = 0; h < H; ++h) sum[h] += w[j] * y[h];
        }
        store_span(out, t * H, H, sum.data());
      }
    });
  });
}

void topk_combine_backward(const Tensor& dOut, const Tensor& Y2, const Tensor& weights, const Tensor& dY2,
                           const Tensor& d_weights, Stream) {
  const int64_t T = weights.shape[0], k = weights.shape[1], H = Y2.shape[1];
  with_acc({&dOut, &Y2, &weights}, [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    parallel_row_chunks(T, H * k, [&](int64_t begin, int64_t end) {
      std::vector<Acc> d(H), y(H), scaled(H);
      for (int64_t t = begin; t < end; ++t) {
        load_span(dOut, t * H, H, d.data());
        for (int64_t j = 0; j < k; ++j) {
          const int64_t f = t * k + j;
          const Acc w = static_cast<Acc>(load_as_double(weights, f));
          load_span(Y2, f * H, H, y.data());
          Acc dot = 0;
          for (int64_t h = 0; h < H; ++h) dot += d[h] * y[h];
          if (dY2.defined()) {
            for (int64_t h = 0; h < H; ++h) scaled[h] = w * d[h];
            store_span(dY2, f * H, H, scaled.data());
          }
          if (d_weights.defined()) store_from(d_weights, f, dot);
        }
      }
    });
  });
}

}  // namespace fusedmoe::detail::cpu
