// Elementwise ops of the CPU backend: SiLU·mul and its backward, the top-k combine and its backward.
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

void silu_mul(const Tensor& Y1, const Tensor& A, Stream) {
  const int64_t M = Y1.shape[0], I = A.shape[1];
  with_acc({&Y1, &A}, [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    parallel_rows(M, I, [&](int64_t m) {
      for (int64_t c = 0; c < I; ++c) {
        const Acc g = static_cast<Acc>(load_as_double(Y1, m * 2 * I + c));
        const Acc u = static_cast<Acc>(load_as_double(Y1, m * 2 * I + I + c));
        store_from(A, m * I + c, act::silu(g) * u);
      }
    });
  });
}

void silu_mul_backward(const Tensor& dA, const Tensor& Y1, const Tensor& dY1, Stream) {
  const int64_t M = Y1.shape[0], I = dA.shape[1];
  with_acc({&dA, &Y1, &dY1}, [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    parallel_rows(M, I, [&](int64_t m) {
      for (int64_t c = 0; c < I; ++c) {
        const Acc g = static_cast<Acc>(load_as_double(Y1, m * 2 * I + c));
        const Acc u = static_cast<Acc>(load_as_double(Y1, m * 2 * I + I + c));
        const Acc d = static_cast<Acc>(load_as_double(dA, m * I + c));
        Acc dg, du;
        act::silu_mul_grad(g, u, d, dg, du);
        store_from(dY1, m * 2 * I + c, dg);
        store_from(dY1, m * 2 * I + I + c, du);
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
      parallel_rows(M, I, [&](int64_t m) {
        const int64_t slot = gather[m];
        const Acc w = static_cast<Acc>(load_as_double(weights, slot));
        Acc dw = 0;
        for (int64_t c = 0; c < I; ++c) {
          const Acc g = static_cast<Acc>(load_as_double(Y1, m * 2 * I + c));
          const Acc u = static_cast<Acc>(load_as_double(Y1, m * 2 * I + I + c));
          // A as forward stored it (rounded to the activation dtype): dw = ⟨dOut, Y2⟩ = ⟨dA_raw, A⟩ exactly.
          const Acc a = static_cast<Acc>(num::Conv<S>::load(num::Conv<S>::store(act::silu(g) * u)));
          if (scaled_act.defined()) store_from(scaled_act, m * I + c, w * a);
          if (!dA_raw.defined()) continue;
          const Acc raw = static_cast<Acc>(load_as_double(dA_raw, m * I + c));
          dw += raw * a;
          if (dY1.defined()) {
            Acc dg, du;
            act::silu_mul_grad(g, u, w * raw, dg, du);
            store_from(dY1, m * 2 * I + c, dg);
            store_from(dY1, m * 2 * I + I + c, du);
          }
        }
        if (d_weights.defined() && dA_raw.defined()) store_from(d_weights, slot, dw);
      });
    });
  });
}

void topk_combine(const Tensor& Y2, const Tensor& weights, const Tensor& out, Stream) {
  const int64_t T = weights.shape[0], k = weights.shape[1], H = Y2.shape[1];
  with_acc({&Y2, &weights, &out}, [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    parallel_rows(T, H * k, [&](int64_t t) {
      for (int64_t h = 0; h < H; ++h) {
        Acc sum = 0;
        for (int64_t j = 0; j < k; ++j)
          sum += static_cast<Acc>(load_as_double(weights, t * k + j)) *
                 static_cast<Acc>(load_as_double(Y2, (t * k + j) * H + h));
        store_from(out, t * H + h, sum);
      }
    });
  });
}

void topk_combine_backward(const Tensor& dOut, const Tensor& Y2, const Tensor& weights, const Tensor& dY2,
                           const Tensor& d_weights, Stream) {
  const int64_t T = weights.shape[0], k = weights.shape[1], H = Y2.shape[1];
  with_acc({&dOut, &Y2, &weights}, [&](auto acc_tag) {
    using Acc = decltype(acc_tag);
    parallel_rows(T, H * k, [&](int64_t t) {
      for (int64_t j = 0; j < k; ++j) {
        const int64_t f = t * k + j;
        const Acc w = static_cast<Acc>(load_as_double(weights, f));
        Acc dot = 0;
        for (int64_t h = 0; h < H; ++h) {
          const Acc d = static_cast<Acc>(load_as_double(dOut, t * H + h));
          dot += d * static_cast<Acc>(load_as_double(Y2, f * H + h));
          if (dY2.defined()) store_from(dY2, f * H + h, w * d);
        }
        if (d_weights.defined()) store_from(d_weights, f, dot);
      }
    });
  });
}

}  // namespace fusedmoe::detail::cpu
