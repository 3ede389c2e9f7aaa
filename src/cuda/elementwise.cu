// Elementwise kernels: SiLU·mul forward/backward, the routed backward pass that yields dw, dY1 and w·A
// in one read of Y1, and the top-k combine forward/backward. Reductions use fixed-order trees.
#include <algorithm>
#include <cstdint>

#include "../activation.hpp"
#include "common.cuh"

namespace fusedmoe::detail::cuda {

namespace {

constexpr int kThreads = 256;

// Row kernels: one block per row, threads striding over the columns (no per-element index division).
template <class S, class O>
__global__ void silu_mul_kernel(const S* Y1, O* A, int64_t I) {
  const int64_t m = blockIdx.x;
  const S* y = Y1 + m * 2 * I;
  for (int64_t c = threadIdx.x; c < I; c += blockDim.x)
    A[m * I + c] = from_f32<O>(act::silu(to_f32(y[c])) * to_f32(y[I + c]));
}

template <class D, class S, class O>
__global__ void silu_mul_backward_kernel(const D* dA, const S* Y1, O* dY1, int64_t I) {
  const int64_t m = blockIdx.x;
  const S* y = Y1 + m * 2 * I;
  O* dy = dY1 + m * 2 * I;
  for (int64_t c = threadIdx.x; c < I; c += blockDim.x) {
    float dg, du;
    act::silu_mul_grad(to_f32(y[c]), to_f32(y[I + c]), to_f32(dA[m * I + c]), dg, du);
    dy[c] = from_f32<O>(dg);
    dy[I + c] = from_f32<O>(du);
  }
}

// Threads for a row kernel over `cols` columns: enough warps to cover a row once, at most kThreads.
unsigned row_threads(int64_t cols) { return static_cast<unsigned>(std::min<int64_t>(kThreads, (cols + 31) / 32 * 32)); }

// Sum over the block in a fixed tree (deterministic).
__device__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) v += __shfl_xor_sync(0xffffffffu, v, d);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  __syncthreads();
  return total;
}

// One block per routed row.
template <class S, class W, class R, class DW>
__global__ void routed_silu_backward_kernel(const DeviceRouting rt, const R* dA_raw, const S* Y1, const W* weights,
                                            S* dY1, S* scaled_act, DW* d_weights, int64_t I) {
  const int64_t m = blockIdx.x;
  const int64_t slot = rt.slot(m);
  const float w = to_f32(weights[slot]);
  float dw = 0.f;
  for (int64_t c = threadIdx.x; c < I; c += blockDim.x) {
    const float g = to_f32(Y1[m * 2 * I + c]), u = to_f32(Y1[m * 2 * I + I + c]);
    const float a = to_f32(from_f32<S>(act::silu(g) * u));  // A as forward stored it
    if (scaled_act) scaled_act[m * I + c] = from_f32<S>(w * a);
    if (dA_raw) {
      const float raw = to_f32(dA_raw[m * I + c]);
      dw += raw * a;
      if (dY1) {
        float dg, du;
        act::silu_mul_grad(g, u, w * raw, dg, du);
        dY1[m * 2 * I + c] = from_f32<S>(dg);
        dY1[m * 2 * I + I + c] = from_f32<S>(du);
      }
    }
  }
  if (dA_raw && d_weights) {
    dw = block_sum(dw);
    if (threadIdx.x == 0) d_weights[slot] = from_f32<DW>(dw);
  }
}

// One block per token: out[t] = Σ_j w[t, j] · Y2[t·k + j], j ascending.
template <class Y, class W, class O>
__global__ void topk_combine_kernel(const Y* Y2, const W* weights, O* out, int k, int64_t H) {
  const int64_t t = blockIdx.x;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float s = 0.f;
    for (int j = 0; j < k; ++j) s += to_f32(weights[t * k + j]) * to_f32(Y2[(t * k + j) * H + h]);
    out[t * H + h] = from_f32<O>(s);
  }
}

template <class G, class W, class O>
__global__ void topk_combine_grad_y_kernel(const G* dOut, const W* weights, O* dY2, int64_t T, int k, int64_t H) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= T * k * H) return;
  const int64_t f = idx / H, h = idx % H;
  dY2[idx] = from_f32<O>(to_f32(weights[f]) * to_f32(dOut[(f / k) * H + h]));
}

template <class G, class Y, class O>
__global__ void topk_combine_grad_w_kernel(const G* dOut, const Y* Y2, O* dw, int k, int64_t H) {
  const int64_t f = blockIdx.x;
  float s = 0.f;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) s += to_f32(dOut[(f / k) * H + h]) * to_f32(Y2[f * H + h]);
  s = block_sum(s);
  if (threadIdx.x == 0) dw[f] = from_f32<O>(s);
}

template <class T> const T* cptr(const Tensor& t) { return t.defined() ? t.ptr<const T>() : nullptr; }
template <class T> T* mptr(const Tensor& t) { return t.defined() ? t.ptr<T>() : nullptr; }
// Dtype of an optional tensor for dispatch (any float when undefined).
DType dtype_or(const Tensor& t, DType fallback) { return t.defined() ? t.dtype : fallback; }

}  // namespace

void silu_mul(const Tensor& Y1, const Tensor& A, Stream s) {
  const int64_t M = Y1.shape[0], I = A.shape[1];
  if (M * I == 0) return;
  visit_float(Y1.dtype, [&](auto s_tag) {
    visit_float(A.dtype, [&](auto o_tag) {
      using S = decltype(s_tag);
      using O = decltype(o_tag);
      silu_mul_kernel<S, O><<<static_cast<unsigned>(M), row_threads(I), 0, stream_of(s)>>>(Y1.ptr<const S>(),
                                                                                             A.ptr<O>(), I);
      check_launch("silu_mul_kernel");
    });
  });
}

void silu_mul_backward(const Tensor& dA, const Tensor& Y1, const Tensor& dY1, Stream s) {
  const int64_t M = Y1.shape[0], I = dA.shape[1];
  if (M * I == 0) return;
  visit_float(dA.dtype, [&](auto d_tag) {
    visit_float(Y1.dtype, [&](auto s_tag) {
      visit_float(dY1.dtype, [&](auto o_tag) {
        using D = decltype(d_tag);
        using S = decltype(s_tag);
        using O = decltype(o_tag);
        silu_mul_backward_kernel<D, S, O><<<static_cast<unsigned>(M), row_threads(I), 0, stream_of(s)>>>(
            dA.ptr<const D>(), Y1.ptr<const S>(), dY1.ptr<O>(), I);
        check_launch("silu_mul_backward_kernel");
      });
    });
  });
}

void routed_silu_backward(const Routing& r, const Tensor& dA_raw, const Tensor& Y1, const Tensor& weights,
                          const Tensor& dY1, const Tensor& scaled_act, const Tensor& d_weights, Stream s) {
  const int64_t M = Y1.shape[0], I = Y1.shape[1] / 2;
  if (M == 0) return;
  for (const Tensor* t : {&dY1, &scaled_act})
    if (t->defined() && t->dtype != Y1.dtype) throw Error("routed_silu_backward: outputs must have Y1's dtype");
  visit_float(Y1.dtype, [&](auto s_tag) {
    visit_float(weights.dtype, [&](auto w_tag) {
      visit_float(dtype_or(dA_raw, DType::f32), [&](auto r_tag) {
        visit_float(dtype_or(d_weights, DType::f32), [&](auto dw_tag) {
          using S = decltype(s_tag);
          using W = decltype(w_tag);
          using R = decltype(r_tag);
          using DW = decltype(dw_tag);
          routed_silu_backward_kernel<S, W, R, DW><<<static_cast<unsigned>(M), kThreads, 0, stream_of(s)>>>(
              device_routing(r), cptr<R>(dA_raw), Y1.ptr<const S>(), weights.ptr<const W>(), mptr<S>(dY1),
              mptr<S>(scaled_act), mptr<DW>(d_weights), I);
          check_launch("routed_silu_backward_kernel");
        });
      });
    });
  });
}

void topk_combine(const Tensor& Y2, const Tensor& weights, const Tensor& out, Stream s) {
  const int64_t T = weights.shape[0], H = Y2.shape[1];
  const int k = static_cast<int>(weights.shape[1]);
  if (T * H == 0) return;
  visit_float(Y2.dtype, [&](auto y_tag) {
    visit_float(weights.dtype, [&](auto w_tag) {
      visit_float(out.dtype, [&](auto o_tag) {
        using Y = decltype(y_tag);
        using W = decltype(w_tag);
        using O = decltype(o_tag);
        topk_combine_kernel<Y, W, O><<<static_cast<unsigned>(T), row_threads(H), 0, stream_of(s)>>>(
            Y2.ptr<const Y>(), weights.ptr<const W>(), out.ptr<O>(), k, H);
        check_launch("topk_combine_kernel");
      });
    });
  });
}

void topk_combine_backward(const Tensor& dOut, const Tensor& Y2, const Tensor& weights, const Tensor& dY2,
                           const Tensor& d_weights, Stream s) {
  const int64_t T = weights.shape[0], H = Y2.shape[1];
  const int k = static_cast<int>(weights.shape[1]);
  if (T == 0) return;
  visit_float(dOut.dtype, [&](auto g_tag) {
    using G = decltype(g_tag);
    if (dY2.defined() && H > 0)
      visit_float(weights.dtype, [&](auto w_tag) {
        visit_float(dY2.dtype, [&](auto o_tag) {
          using W = decltype(w_tag);
          using O = decltype(o_tag);
          topk_combine_grad_y_kernel<G, W, O><<<blocks_for(T * k * H, kThreads), kThreads, 0, stream_of(s)>>>(
              dOut.ptr<const G>(), weights.ptr<const W>(), dY2.ptr<O>(), T, k, H);
          check_launch("topk_combine_grad_y_kernel");
        });
      });
    if (d_weights.defined())
      visit_float(Y2.dtype, [&](auto y_tag) {
        visit_float(d_weights.dtype, [&](auto o_tag) {
          using Y = decltype(y_tag);
          using O = decltype(o_tag);
          topk_combine_grad_w_kernel<G, Y, O><<<static_cast<unsigned>(T * k), kThreads, 0, stream_of(s)>>>(
              dOut.ptr<const G>(), Y2.ptr<const Y>(), d_weights.ptr<O>(), k, H);
          check_launch("topk_combine_grad_w_kernel");
        });
      });
  });
}

}  // namespace fusedmoe::detail::cuda
